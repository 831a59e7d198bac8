"""Fusion through the node on anatomy the model never saw: three spin-echo series of a head phantom, each stored in
its own scale, go scanner (dcmtk storescu) -> node -> TPS (Orthanc) with classic T1/T2 maps.  Each series is a
target of its own (fusion.target: each), QA action hold with the default fusion thresholds: all three are sent
(good data pass), their maps agree whichever series is the target, the gains come from physics (fat, fluid), and
the maps are close to the truth.  A partner shifted by three voxels is held with a reason naming it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from rtcontrast.core.inference import QMapModel
from rtcontrast.research import phantom, phantom_head
from tests.dicomgen import Geometry, make_series, write_series
from tests.orthanc import Orthanc, orthanc  # noqa: F401  (fixture)
from tests.support import LENIENT_QA, REPO, storescu, wait_for

SIZE, N = 64, 4
CONTRASTS = [(8.0, 400.0, 700.0), (75.0, 4500.0, 2500.0), (8.0, 4500.0, 1400.0)]  # TE, TR, gain (own scale each)


@pytest.fixture(scope="module")
def model() -> QMapModel:  # the fusion model for make_node
    return QMapModel(REPO / "models" / "qmap-pelvis-fusion.onnx", "cpu")


def _head() -> tuple[phantom.Maps, np.ndarray]:
    maps, _ = phantom_head.volume(7_400_001, n_slices=N, shape=(SIZE, SIZE), pixel_mm=240.0 / SIZE, field_t=1.5)
    return maps, phantom.bias_field(np.random.default_rng(9), maps.pd.shape, 0.1)  # one coil: one bias field


def _write(tmp: Path, maps: phantom.Maps, bias: np.ndarray, uid_seed: str, shift: int = 0) -> list[list[Path]]:
    geom = Geometry(pixel_spacing=(240.0 / SIZE, 240.0 / SIZE), origin=(-120.0, -120.0, -12.0), slice_spacing=8.0,
                    slice_thickness=8.0)
    out = []
    for i, (te, tr, gain) in enumerate(CONTRASTS):
        img = phantom.acquire(maps, te, tr, np.random.default_rng(i), snr=60, bias_strength=0.0, gain=gain).image * bias
        if shift and i == 0:  # the T1w series moved by `shift` columns (patient motion)
            img = np.roll(img, shift, axis=2)
        dss = make_series(np.clip(img, 0, 65535), te=te, tr=tr, geometry=geom, uid_seed=uid_seed, series_number=10 + i,
                          series_description=f"SE TE{te:g} TR{tr:g}")  # MagneticFieldStrength 1.5
        out.append(write_series(dss, tmp / f"{uid_seed}-s{i}"))
    return out


def _protocol(orthanc_port: int, target: str) -> dict:
    return {
        "version": f"fusion-physics-{target}",
        "qa": {**LENIENT_QA, "action": "hold"},  # the single-series figures lenient, the fusion thresholds default
        "destinations": {"tps": {"dicom": {"host": "127.0.0.1", "port": orthanc_port, "ae_title": "ORTHANC",
                                           "connect_timeout_s": 2, "acse_timeout_s": 5}}},
        "recipes": [{"key": "T2w", "label": "T2w", "te_ms": 100, "tr_ms": 4000, "series_number": 901,
                     "destinations": ["tps"]}],
        "maps": {"classic": True, "destinations": ["tps"]},
        "fusion": {"enabled": True, "wait_for_partner_s": 30, "target": target},
    }


def test_three_series_in_own_scales_give_one_answer_close_to_the_truth(tmp_path: Path, orthanc: Orthanc,  # noqa: F811
                                                                     make_node) -> None:
    maps, bias = _head()
    series = _write(tmp_path, maps, bias, "fusion-physics")
    node = make_node(_protocol(orthanc.dicom_port, "each"), metrics={"enabled": False})
    # the study in one association, as a scanner sends it: three storescu runs one after the other raced the
    # node's 0.3 s release grace (a slow third start let the first two fuse without it)
    assert storescu(node.port, [p for files in series for p in files]).returncode == 0
    sop_to_series = {}
    for files in series:
        for p in files:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            sop_to_series[str(ds.SOPInstanceUID)] = str(ds.SeriesInstanceUID)

    def settled() -> list:
        jobs = [j for j in node.jobs.recent_jobs(10) if j.state in ("delivered", "held", "failed", "ineligible")]
        return jobs if len(jobs) == 3 and all(j.state == "delivered" for j in jobs) or \
            any(j.state in ("held", "failed") for j in jobs) else []

    jobs = wait_for(settled, 300, "three fused jobs delivered")
    assert all(j.state == "delivered" for j in jobs), [(j.state, j.reason) for j in jobs]
    for j in jobs:
        f = j.qa["fusion"]
        assert len(f["partners"]) == 2 and f["gain_source"] == "physics: fat reference + fluid reference", f
        assert j.qa["violations"] == []

    def maps_in_tps() -> dict:
        got: dict = {}
        for uid in orthanc.sop_instance_uids():
            ds = orthanc.dataset(uid)
            if int(ds.SeriesNumber) in (981, 982):
                target = sop_to_series[str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)]
                got.setdefault((target, int(ds.SeriesNumber)), []).append(ds)
        return got if len(got) == 6 and all(len(v) == N for v in got.values()) else {}

    got = wait_for(maps_in_tps, 120, "T1 and T2 maps of every target in Orthanc")
    vols = {k: np.stack([pydicom.pixels.apply_modality_lut(d.pixel_array, d).astype(np.float32)
                         for d in sorted(v, key=lambda d: float(d.ImagePositionPatient[2]))])
            for k, v in got.items()}
    targets = sorted({t for t, _ in vols})
    masks = phantom_head.major_masks(maps)
    body = maps.labels > 0
    for number, truth in ((981, maps.t1), (982, maps.t2)):
        ref = vols[(targets[0], number)]
        for t in targets[1:]:  # whichever series is the target: the same maps (to the map's 1 ms quantisation)
            assert np.median(np.abs(vols[(t, number)][body] - ref[body])) <= 1.0
        errs = {t: float(np.median(np.abs(ref[m & (truth > 0)] / truth[m & (truth > 0)] - 1)))
                for t, m in masks.items() if (m & (truth > 0)).any()}
        print(f"series {number}: median |error| per tissue through the node:",
              {t: round(100 * e, 1) for t, e in errs.items()})
        for tissue in ("wm", "fat", "lesion"):
            assert errs[tissue] < 0.12, (number, tissue, errs[tissue])


def test_shifted_partner_is_held_with_its_name(tmp_path: Path, orthanc: Orthanc, make_node) -> None:  # noqa: F811
    maps, bias = _head()
    series = _write(tmp_path, maps, bias, "fusion-shifted", shift=3)
    node = make_node(_protocol(orthanc.dicom_port, "t2w"), metrics={"enabled": False})
    for files in series:
        assert storescu(node.port, files).returncode == 0

    def held() -> list:
        return [j for j in node.jobs.recent_jobs(10) if j.state == "held"]

    jobs = wait_for(held, 300, "the T2w job held")
    reason = jobs[0].reason or ""
    assert "TE 8/TR 400 ms) is shifted 3.0 voxels" in reason, reason
    assert orthanc.sop_instance_uids() == [] or all(
        int(orthanc.dataset(u).SeriesNumber) not in (901, 981, 982) for u in orthanc.sop_instance_uids())
