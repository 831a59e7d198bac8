"""The broad tissue prior, the random-geometry and abdomen phantoms, and the non-ideal SE acquisition."""

from __future__ import annotations

import numpy as np
import pytest

from rtcontrast.research import abdomen_phantom
from rtcontrast.research import acquisition
from rtcontrast.research import random_phantom
from rtcontrast.research import tissue_prior
from rtcontrast.core.physics import signal


@pytest.mark.parametrize("name", [n for n, c in tissue_prior.TISSUES.items() if c.pd > 0])
def test_t1_rises_with_field(name: str) -> None:
    t1 = [tissue_prior.anchors_at(name, b)[1] for b in (1.0, 1.5, 2.0, 3.0)]
    assert all(a < b for a, b in zip(t1, t1[1:])), (name, t1)
    # the anchors are hit exactly at 1.5 T and 3 T
    c = tissue_prior.TISSUES[name]
    assert tissue_prior.anchors_at(name, 1.5)[1] == pytest.approx(c.t1_15)
    assert tissue_prior.anchors_at(name, 3.0)[1] == pytest.approx(c.t1_30)


def test_draws_are_physical_and_broad() -> None:
    rng = np.random.default_rng(0)
    draws = [tissue_prior.draw_class(3.0, rng)[1] for _ in range(3000)]
    pd, t1, t2 = (np.array(v) for v in zip(*draws))
    sig = pd > 0
    assert (t2[sig] < t1[sig]).all() and (pd <= 1.0).all() and (pd >= 0).all()
    # broad: fluid, fat and everything between are all drawn
    assert np.percentile(t1[sig], 5) < 500 and np.percentile(t1[sig], 95) > 3000
    assert np.percentile(t2[sig], 5) < 40 and np.percentile(t2[sig], 95) > 800
    # the same tissue is longer at 3 T on average (median over draws)
    r15 = np.median([tissue_prior.draw("muscle", 1.5, rng)[1] for _ in range(500)])
    r30 = np.median([tissue_prior.draw("muscle", 3.0, rng)[1] for _ in range(500)])
    assert 1.2 < r30 / r15 < 1.6


@pytest.mark.parametrize("geometry", random_phantom.GEOMETRIES)
@pytest.mark.parametrize("k", [5, 12, 30])
def test_random_label_maps_have_the_requested_classes(geometry: str, k: int) -> None:
    counts = []
    for seed in range(4):
        lab = random_phantom.label_map(np.random.default_rng(seed), (128, 128), k, geometry)
        present = np.unique(lab)
        assert present.min() >= 0 and present.max() < k  # never more than requested
        counts.append(len(present))
    # a class can fall outside the field of view (a Voronoi seed beyond the rotated frame, a blob painted over),
    # but most requested classes are there
    assert min(counts) >= int(0.6 * k) and np.mean(counts) >= 0.75 * k, (geometry, k, counts)


def test_random_maps_deterministic_and_values_follow_classes() -> None:
    a = random_phantom.random_maps(11, (64, 64), field_t=3.0, n_classes=8, geometry="voronoi")
    b = random_phantom.random_maps(11, (64, 64), field_t=3.0, n_classes=8, geometry="voronoi")
    np.testing.assert_array_equal(a.t1, b.t1)
    assert a.field_t == 3.0
    labels = set(np.unique(a.labels).tolist()) - {0, random_phantom.LABEL_BONE}
    assert 1 <= len(labels) <= 8
    assert all(lab >= random_phantom.LABEL_BASE for lab in labels)
    body = a.pd > 0
    assert (a.t1[body] > 0).all() and (a.t2[body] > 0).all() and (a.t1 <= 1e4).all()


def test_abdomen_has_its_organs_with_prior_values() -> None:
    seen = set()
    for seed in range(4):
        m = abdomen_phantom.abdomen_maps(seed, (128, 128), field_t=1.5)
        seen |= set(np.unique(m.labels).tolist())
        liver = m.labels == abdomen_phantom.ABDOMEN_LABELS["liver"]
        if liver.sum() > 20:
            assert 300 < np.median(m.t1[liver]) < 1000  # liver T1 at 1.5 T is short (~580 ms)
    for organ in ("liver", "spleen", "kidney", "marrow", "fat", "muscle"):
        assert abdomen_phantom.ABDOMEN_LABELS[organ] in seen, organ


def test_fast_spin_echo_blurs_short_t2_edges() -> None:
    # a short-T2 square in fluid: an echo train (later echoes at the k-space edge) blurs it; ideal SE does not
    pd = np.ones((64, 64), np.float32)
    t1 = np.full_like(pd, 3000.0)
    t2 = np.full_like(pd, 1500.0)
    t2[24:40, 24:40] = 30.0
    from rtcontrast.research.phantom import Maps

    maps = Maps(pd, t1, t2, np.ones_like(pd, np.uint8), (1.0, 1.0), 1.5)
    common = dict(echo_spacing_ms=10.0, phase_axis=0, k_fraction=1.0, snr=1e9, bias_strength=0.0, gain=1.0)
    ideal = acquisition.acquire_se(maps, 80.0, 4000.0, np.random.default_rng(0),
                                   acquisition.Nuisance(etl=1, **common)).clean
    fse = acquisition.acquire_se(maps, 80.0, 4000.0, np.random.default_rng(0),
                                 acquisition.Nuisance(etl=16, **common)).clean
    np.testing.assert_allclose(ideal, signal(pd, 80.0, 4000.0, t1, t2), rtol=1e-3, atol=1e-4)
    # edge sharpness along the phase-encode axis (rows) drops, the centre's contrast stays near the effective TE's
    assert np.abs(np.diff(fse[:, 32])).max() < 0.9 * np.abs(np.diff(ideal[:, 32])).max()
    assert fse[32, 32] == pytest.approx(ideal[32, 32], rel=0.5)


def test_low_resolution_smooths() -> None:
    rng = np.random.default_rng(1)
    m = random_phantom.random_maps(3, (64, 64), n_classes=10, geometry="voronoi")
    base = dict(etl=1, echo_spacing_ms=10.0, phase_axis=0, snr=1e9, bias_strength=0.0, gain=1.0)
    full = acquisition.acquire_se(m, 10, 500, rng, acquisition.Nuisance(k_fraction=1.0, **base)).clean
    low = acquisition.acquire_se(m, 10, 500, rng, acquisition.Nuisance(k_fraction=0.5, **base)).clean
    # the steepest edges get shallower (Gibbs ringing adds small oscillations, so not the mean gradient)
    assert np.percentile(np.abs(np.diff(low, axis=1)), 99.5) < 0.8 * np.percentile(np.abs(np.diff(full, axis=1)), 99.5)
