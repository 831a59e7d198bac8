"""Fusion QA (rtcontrast.node.qa.fusion_violations on rtcontrast.core.fusion figures) with the shipped qmap/2 model:
a good set of three series in different scales passes the default thresholds; a partner shifted by three voxels, or
a partner whose declared scale (DICOM / shared_scale) is wrong, fails with a reason naming the input and the number;
the maps do not depend on which series is the target."""

from __future__ import annotations

import numpy as np
import pytest

from rtcontrast.core.consistency import Settings
from rtcontrast.core.inference import QMapModel
from rtcontrast.node.qa import fusion_violations
from rtcontrast.research import phantom
from rtcontrast.settings.protocol import ProtocolConfig
from tests.support import REPO

C = [(75.0, 4500.0), (8.0, 400.0), (8.0, 4500.0)]
GAINS = [1500.0, 900.0, 2600.0]


@pytest.fixture(scope="module")
def model() -> QMapModel:
    return QMapModel(REPO / "models" / "qmap-pelvis-fusion.onnx", "cpu")


@pytest.fixture(scope="module")
def case() -> tuple[phantom.Maps, list[np.ndarray]]:
    maps, _ = phantom.volume(2_000_077, n_slices=6, shape=(64, 64), pixel_mm=6.0, slice_mm=8.0, field_t=1.5)
    imgs = [phantom.acquire(maps, te, tr, np.random.default_rng(i), snr=60, bias_strength=0.1, gain=g).image
            for i, ((te, tr), g) in enumerate(zip(C, GAINS))]
    return maps, imgs


def _run(model: QMapModel, imgs: list[np.ndarray], contrasts=C, **kw):
    return model.predict_multi([(im, *c) for im, c in zip(imgs, contrasts)], consistency=kw.pop("cfg", Settings()),
                               field_t=1.5, **kw)


def test_good_set_passes_and_any_target_gives_the_same_maps(model: QMapModel, case) -> None:
    maps, imgs = case
    q = _run(model, imgs)
    assert q.fusion["gain_source"].startswith("physics"), q.fusion["gain_source"]
    assert fusion_violations(q.fusion, ProtocolConfig()) == []
    body = maps.labels > 0
    for perm in ((1, 0, 2), (2, 1, 0)):  # another series as the target (first), the others in another order
        p = _run(model, [imgs[i] for i in perm], [C[i] for i in perm])
        np.testing.assert_allclose(p.t1[body], q.t1[body], rtol=1e-3)
        np.testing.assert_allclose(p.t2[body], q.t2[body], rtol=1e-3)
        # PD in each target's own stored units: the ratio is the targets' gain ratio, the same everywhere
        pos = body & (q.pd > 0)
        ratio = p.pd[pos] / q.pd[pos]
        assert np.std(ratio) / np.mean(ratio) < 1e-3
    # as accurate as the same fit with the true gains (at 64x64 and SNR 60 both are noise-limited per voxel)
    k = _run(model, imgs, known_gains=(GAINS, "truth"))
    for name in ("fat", "muscle", "marrow"):
        m = maps.labels == phantom.LABELS[name]
        for got, ref, truth in ((q.t1, k.t1, maps.t1), (q.t2, k.t2, maps.t2)):
            assert np.median(np.abs(got[m] / truth[m] - 1)) < np.median(np.abs(ref[m] / truth[m] - 1)) + 0.03, name


def test_partner_shifted_by_three_voxels_is_named(model: QMapModel, case) -> None:
    _, imgs = case
    q = _run(model, [imgs[0], np.roll(imgs[1], 3, axis=2), imgs[2]])
    v = fusion_violations(q.fusion, ProtocolConfig())
    assert any("input 2 (TE 8/TR 400 ms) is shifted 3.0 voxels" in s for s in v), v


def test_wrong_declared_scale_is_named(model: QMapModel, case) -> None:
    """shared_scale: true, but the PDw series was stored at another gain: the reference tissues contradict it."""
    _, imgs = case
    q = _run(model, imgs, cfg=Settings(shared_scale=True))
    assert q.fusion["gain_source"].startswith("protocol: shared_scale")
    v = fusion_violations(q.fusion, ProtocolConfig())
    assert any(s.startswith("fusion: gain of input 3 (TE 8/TR 4500 ms) from protocol: shared_scale") for s in v), v
    # the same declaration is right when the series really share a scale: no gain violation
    same = [im * (GAINS[0] / g) for im, g in zip(imgs, GAINS)]
    q2 = _run(model, same, cfg=Settings(shared_scale=True))
    assert not [s for s in fusion_violations(q2.fusion, ProtocolConfig()) if "gain of input" in s]
    # DICOM factors (e.g. Philips scale slopes) that are right pass too, and the source says DICOM
    q3 = _run(model, imgs, known_gains=(GAINS, "DICOM: Philips private scale slope (2005,100E)"))
    assert q3.fusion["gain_source"].startswith("DICOM")
    assert not [s for s in fusion_violations(q3.fusion, ProtocolConfig()) if "gain of input" in s]
