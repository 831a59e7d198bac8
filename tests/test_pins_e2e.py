"""End to end with pixel values: a phantom with known PD/T1/T2 goes scanner (dcmtk storescu)
-> node -> TPS (Orthanc on loopback), and what the TPS holds is compared with the signal
equation rendered from the phantom's truth.

Tolerances come from the model card (models/qmap-pelvis.json, held-out evaluation of an
input close to this one, T2w TE75/TR4500, NRMSE over the body normalised by the truth's
range): each rendered contrast must be within max(2 x the card's NRMSE, the card's
``self_nrmse_max`` target 0.02).  The factor 2 is for the matrix: this phantom is 128x128
at 2.5 mm (fast on CI), the card's is 256x256 at 1.6 mm; measured here 0.012-0.074,
i.e. at most 1.5 x the card.  QA runs with the protocol's DEFAULT thresholds and action
``hold``: a good spin-echo series must pass them, or nothing reaches the TPS and the test
fails.

What this catches that counting instances does not: TE/TR swapped, PD not multiplied
back by the series scale (images almost black), a wrong percentile for the series scale,
slices delivered at another slice's position, a wrong display window, map units.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from rtcontrast.core.physics import signal
from rtcontrast.node.service import Node
from rtcontrast.research import phantom
from tests.dicomgen import make_series, write_series
from tests.orthanc import Orthanc, orthanc  # noqa: F401  (fixture)
from tests.support import REPO, geometry, storescu

pytestmark = pytest.mark.network

SIZE, SLICES, TE, TR = 128, 6, 90.0, 4000.0
#: recipe key -> (TE, TR, model-card contrast whose NRMSE sets the tolerance, or None = own contrast)
RECIPES: dict[str, tuple[float, float, str | None]] = {
    "own": (TE, TR, None),
    "T2w75": (75.0, 4500.0, "T2w_75"),
    "T1w400": (8.0, 400.0, "T1w_400"),
    "PDw": (8.0, 4500.0, "PDw"),
}


def _card() -> dict[str, Any]:
    return json.loads((REPO / "models" / "qmap-pelvis.json").read_text())["evaluation"]


def tolerance(card_contrast: str | None) -> float:
    card = _card()
    floor = float(card["targets"]["self_nrmse_max"])
    if card_contrast is None:
        return floor
    return max(2.0 * float(card["inputs"]["T2w_75"]["render"][card_contrast]["nrmse"]), floor)


def nrmse(got: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """The card's NRMSE: RMS error over the body / range of the truth over the body."""
    err = (got.astype(np.float64) - truth)[mask]
    return float(np.sqrt(np.mean(err**2)) / (truth[mask].max() - truth[mask].min()))


def by_position(datasets: list[pydicom.Dataset], z_positions: list[float]) -> np.ndarray:
    """Pixel volume [N,H,W] ordered like the source slices, matched by ImagePositionPatient z."""
    out = np.zeros((len(z_positions), SIZE, SIZE), np.float64)
    seen = set()
    for ds in datasets:
        z = float(ds.ImagePositionPatient[2])
        (i,) = [k for k, zz in enumerate(z_positions) if abs(zz - z) < 1e-3]
        out[i] = ds.pixel_array * float(getattr(ds, "RescaleSlope", 1.0)) + float(getattr(ds, "RescaleIntercept", 0.0))
        seen.add(i)
    assert seen == set(range(len(z_positions)))
    return out


def test_phantom_through_node_to_tps_matches_the_signal_equation(
        tmp_path: Path, make_node: Callable[..., Node], orthanc: Orthanc) -> None:  # noqa: F811
    """Guards every stage a planner's pixel depends on, end to end (issue #17): render's
    equation and TE/TR, PD's units, the series scale, slice placement, the window, and the
    classic/Parametric map units (the input re-rendered from the maps the TPS received)."""
    maps, _ = phantom.volume(3, n_slices=SLICES, shape=(SIZE, SIZE), pixel_mm=320.0 / SIZE, slice_mm=4.0)
    acq = phantom.acquire(maps, TE, TR, np.random.default_rng(3), snr=60, bias_strength=0.1, gain=800)
    truth_pd = maps.pd.astype(np.float64) * acq.gain * acq.bias  # PD in the input's stored-value units
    body = maps.labels > 0
    src = make_series(acq.image, te=TE, tr=TR, geometry=geometry(SIZE), uid_seed="pins-e2e")
    z_src = [float(ds.ImagePositionPatient[2]) for ds in src]
    stored = np.stack([ds.pixel_array.astype(np.float64) for ds in src])  # what the scanner sent

    protocol = {
        "version": "pins-e2e",
        "qa": {"action": "hold"},  # default thresholds
        "destinations": {"tps": {"dicom": {"host": "127.0.0.1", "port": orthanc.dicom_port, "ae_title": orthanc.aet,
                                           "connect_timeout_s": 2, "acse_timeout_s": 5}}},
        "recipes": [{"key": k, "label": k, "te_ms": te, "tr_ms": tr, "series_number": 901 + i, "destinations": ["tps"]}
                    for i, (k, (te, tr, _)) in enumerate(RECIPES.items())],
        "maps": {"classic": True, "parametric": True, "destinations": ["tps"]},
    }
    node = make_node(protocol)
    res = storescu(node.port, write_series(src, tmp_path / "scanner", shuffle=True))
    assert res.returncode == 0, res.stderr
    assert node.wait_idle(120), "node did not finish"
    (job,) = node.jobs.recent_jobs()
    assert job.state == "delivered", (job.state, job.reason, job.qa)
    assert job.qa is not None and job.qa["violations"] == []

    got: dict[str, list[pydicom.Dataset]] = {}
    for s in orthanc.series():
        dss = [pydicom.dcmread(orthanc.save_instance(i, tmp_path / f"{i}.dcm")) for i in s["Instances"]]
        got[str(dss[0].SeriesNumber)] = dss
    assert len(got) == len(RECIPES) + 6

    # -- every synthetic contrast against the equation rendered from the truth
    for i, (key, (te, tr, card_contrast)) in enumerate(RECIPES.items()):
        dss = got[str(901 + i)]
        assert [(float(d.EchoTime), float(d.RepetitionTime)) for d in dss] == [(te, tr)] * SLICES
        px = by_position(dss, z_src)
        truth = signal(truth_pd, te, tr, maps.t1.astype(np.float64), maps.t2.astype(np.float64))
        err = nrmse(px, truth, body)
        assert err <= tolerance(card_contrast), (key, err, tolerance(card_contrast))
        # the stored window is the 1st..99.5th percentile of the series' non-zero pixels
        nz = px[px > 0]
        lo, hi = np.percentile(nz, [1.0, 99.5])
        assert float(dss[0].WindowWidth) == pytest.approx(hi - lo, rel=1e-3, abs=0.5)
        assert float(dss[0].WindowCenter) == pytest.approx((lo + hi) / 2, rel=1e-3, abs=0.5)
        if card_contrast is None:  # own contrast: the planner's image looks like the scan
            assert float(np.median(px[body] / np.maximum(stored[body], 1.0))) == pytest.approx(1.0, abs=0.03)

    # -- maps as the TPS stores them: units pinned by re-rendering the input from them
    s = float(np.percentile(stored[stored > 0], 99.0))  # the contract's series scale, by hand
    t1c, t2c, pdc = (by_position(got[str(n)], z_src) for n in (981, 982, 980))
    assert "ms" in got["981"][0].SeriesDescription and "relative" in got["980"][0].SeriesDescription
    again = signal(pdc / 1000.0 * s, TE, TR, t1c, t2c)  # classic PD: round(1000 * PD / s)
    assert nrmse(again, stored, body) <= 0.02
    med_t1 = float(np.median(t1c[maps.labels == phantom.LABELS["muscle"]]))
    true_t1 = float(np.median(maps.t1[maps.labels == phantom.LABELS["muscle"]]))
    assert med_t1 == pytest.approx(true_t1, rel=0.4)  # card: muscle T1 error 28 %; ms, not s or us

    pm = {str(d.SeriesNumber): d for n in ("990", "991", "992") for d in got[n]}
    pmaps = {}
    for num, q in (("990", "PD"), ("991", "T1"), ("992", "T2")):
        ds = pm[num]
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
        rwvm = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        assert rwvm.MeasurementUnitsCodeSequence[0].CodeValue == ("1" if q == "PD" else "ms")
        zs = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in ds.PerFrameFunctionalGroupsSequence]
        frames = ds.pixel_array
        pmaps[q] = np.stack([frames[zs.index(min(zs, key=lambda v: abs(v - z)))] for z in z_src]).astype(np.float64)
    again = signal(pmaps["PD"] * s, TE, TR, pmaps["T1"], pmaps["T2"])
    assert nrmse(again, stored, body) <= 0.02
    np.testing.assert_allclose(pmaps["T1"][body], t1c[body], atol=0.51)  # classic = rounded float
