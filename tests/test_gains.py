"""Gains between series of one session (rtcontrast.core.gains): three contrasts cannot tell a gain from T1/T2
(shown), so fat and free fluid fix them, whatever the network says; four contrasts fix them from the data."""

from __future__ import annotations

import numpy as np
import pytest

from rtcontrast.core.consistency import Settings, refine, volume_gains
from rtcontrast.core.gains import distinct_contrasts, fat_t1_ms
from rtcontrast.core.lsq import fit
from rtcontrast.research import phantom

T1W, T2W, PDW, T1W2 = (8.0, 400.0), (75.0, 4500.0), (8.0, 4500.0), (20.0, 900.0)


@pytest.fixture(scope="module")
def vol() -> phantom.Maps:
    return phantom.volume(4_100_011, n_slices=2, shape=(96, 96), pixel_mm=4.0, slice_mm=12.0, field_t=1.5)[0]


def _acquire(maps: phantom.Maps, contrasts: list[tuple[float, float]], gains: list[float]) -> np.ndarray:
    """Noisy series (SNR 80) each in its own gain, then each divided by its 99th percentile as the node does."""
    rng = np.random.default_rng(5)
    imgs = np.stack([phantom.acquire(maps, te, tr, rng, snr=80, bias_strength=0.0, gain=g).image
                     for (te, tr), g in zip(contrasts, gains)])
    return imgs


def _scaled(imgs: np.ndarray, gains: list[float]) -> tuple[np.ndarray, np.ndarray]:
    sc = np.percentile(imgs, 99, axis=(1, 2, 3))
    true = np.asarray(gains) / gains[0] * sc[0] / sc
    return (imgs / sc[:, None, None, None]).astype(np.float32), true


def _biased_network(maps: phantom.Maps, f1: float, f2: float) -> tuple[np.ndarray, ...]:
    """A network answer wrong by a constant factor (what a pelvis network does on other anatomy)."""
    return maps.pd, np.where(maps.t1 > 0, maps.t1 * f1, 0), np.where(maps.t2 > 0, maps.t2 * f2, 0)


def test_three_contrasts_absorb_any_gain_voxel_by_voxel(vol: phantom.Maps) -> None:
    """Why gains need physics: with three contrasts, a 25 % gain error on one input is fitted exactly by other
    T1/T2 (residual at the noise floor either way), yet every T1 moves."""
    imgs = _acquire(vol, [T1W, T2W, PDW], [1000.0, 1000.0, 1000.0])
    body = vol.labels > 0
    good = fit(imgs, np.array([T1W, T2W, PDW]), mask=body)
    bad_imgs = imgs.copy()
    bad_imgs[0] *= 1.25
    bad = fit(bad_imgs, np.array([T1W, T2W, PDW]), mask=body)
    for (pd, t1, t2), x in ((good, imgs), (bad, bad_imgs)):
        from rtcontrast.core.physics import signal
        res = np.stack([signal(pd, te, tr, t1, t2) for te, tr in (T1W, T2W, PDW)]) - x
        fat = (vol.labels == phantom.LABELS["fat"]) & (t1 > 0)
        assert np.median(np.abs(res[:, fat])) < 0.01 * np.median(x[:, fat])
    m = body & (vol.labels == phantom.LABELS["muscle"])
    assert np.median(bad[1][m] / good[1][m]) < 0.85  # T1 moved by far more than the noise


@pytest.mark.parametrize("bias", [(1.0, 1.0), (1.6, 0.8), (0.6, 1.3)])
def test_three_contrasts_gains_from_reference_tissues_not_from_the_network(vol: phantom.Maps, bias) -> None:
    gains = [900.0, 2600.0, 1500.0]
    x, true = _scaled(_acquire(vol, [T1W, T2W, PDW], gains), gains)
    pd, t1, t2 = _biased_network(vol, *bias)
    res = volume_gains(x, np.array([T1W, T2W, PDW]), np.ones(x.shape, bool), pd * 1000 / 1000, t1, t2, Settings(), 1.5)
    assert res.source == "physics: fat reference + fluid reference"
    np.testing.assert_allclose(res.gains, true, rtol=0.04)
    if bias != (1.0, 1.0):  # the 1.1 estimate (read from the network's T1/T2) is far off on the same data
        net = res.detail["network_gains"]
        assert np.max(np.abs(np.log(np.asarray(net) / true))) > 0.1


def test_four_contrasts_gains_come_from_the_data_even_with_a_wrong_reference(vol: phantom.Maps) -> None:
    """Four distinct contrasts over-determine the voxels: the fit residual decides the gains, so a wrong field strength
    (fat reference 380 ms instead of ~330 ms) does not move them; with three it does (the reference is all there is)."""
    gains = [900.0, 2600.0, 1500.0, 700.0]
    c4 = [T1W, T2W, PDW, T1W2]
    x, true = _scaled(_acquire(vol, c4, gains), gains)
    pd, t1, t2 = _biased_network(vol, 1.4, 0.8)
    ok = np.ones(x.shape, bool)
    four = volume_gains(x, np.array(c4), ok, pd, t1, t2, Settings(), field_t=3.0)
    assert four.source == "data" and four.detail["distinct_contrasts"] == 4
    np.testing.assert_allclose(four.gains, true, rtol=0.03)
    three = volume_gains(x[:3], np.array(c4[:3]), ok[:3], pd, t1, t2, Settings(), field_t=3.0)
    assert abs(np.log(three.gains[2] / true[2])) > abs(np.log(four.gains[2] / true[2]))


def test_without_fat_or_fluid_the_source_says_network(vol: phantom.Maps) -> None:
    """A body without the reference tissues: the gains fall back to the network and the source says so (QA flags it)."""
    m = phantom.Maps(pd=np.where(vol.labels == phantom.LABELS["muscle"], vol.pd, 0).astype(np.float32),
                     t1=np.where(vol.labels == phantom.LABELS["muscle"], vol.t1, 0).astype(np.float32),
                     t2=np.where(vol.labels == phantom.LABELS["muscle"], vol.t2, 0).astype(np.float32),
                     labels=np.where(vol.labels == phantom.LABELS["muscle"], 2, 0).astype(np.uint8),
                     pixel_spacing=vol.pixel_spacing, field_t=1.5)
    x, _ = _scaled(_acquire(m, [T1W, T2W, PDW], [1000.0, 1000.0, 1000.0]), [1000.0, 1000.0, 1000.0])
    res = volume_gains(x, np.array([T1W, T2W, PDW]), np.ones(x.shape, bool), m.pd, m.t1, m.t2, Settings(), 1.5)
    assert res.source.startswith("network"), res.source
    assert res.detail["dropped"]


def test_design_helpers() -> None:
    assert distinct_contrasts(np.array([T1W, T2W, PDW, (8.1, 4510.0)])) == 3
    assert fat_t1_ms(1.5) == pytest.approx(330.0) and fat_t1_ms(3.0) == pytest.approx(380.0)
    assert fat_t1_ms(None) == pytest.approx(330.0)


def test_refine_without_gains_uses_the_physics_estimate(vol: phantom.Maps) -> None:
    gains = [900.0, 2600.0, 1500.0]
    x, true = _scaled(_acquire(vol, [T1W, T2W, PDW], gains), gains)
    pd, t1, t2 = _biased_network(vol, 1.5, 0.8)
    _, rt1, _, g = refine(x, np.array([T1W, T2W, PDW]), pd, t1, t2)  # the whole volume, as the node does
    np.testing.assert_allclose(g, true, rtol=0.06)
    m = vol.labels == phantom.LABELS["muscle"]
    assert np.median(np.abs(rt1[m] / vol.t1[m] - 1)) < 0.12  # the network's 50 % T1 error is gone


def test_two_contrasts_gain_from_fat_signal_ratio(vol: phantom.Maps) -> None:
    """T1w + T2w: no tissue can be recognised by a fit (a curve of solutions per voxel), so fat's signal ratio with
    literature fat T1/T2 gives the gain; a network 60 % off does not move it."""
    gains = [900.0, 2600.0]
    x, true = _scaled(_acquire(vol, [T1W, T2W], gains), gains)
    pd, t1, t2 = _biased_network(vol, 1.6, 0.8)
    res = volume_gains(x, np.array([T1W, T2W]), np.ones(x.shape, bool), pd, t1, t2, Settings(), 1.5)
    assert res.source == "physics: fat signal ratio (two contrasts)"
    np.testing.assert_allclose(res.gains, true, rtol=0.10)
