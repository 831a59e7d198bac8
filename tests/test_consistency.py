"""Data consistency (rtcontrast.core.consistency): refined maps re-render every input; with three contrasts they
recover the truth from a poor start; one input is left alone; bad shapes are refused."""

from __future__ import annotations

import numpy as np
import pytest

from rtcontrast.research import phantom
from rtcontrast.core.consistency import Settings, input_gains, refine
from rtcontrast.core.physics import signal

T1W, PDW, T2W = (10.0, 450.0), (10.0, 4000.0), (90.0, 4000.0)


@pytest.fixture(scope="module")
def slice_maps() -> phantom.Maps:
    return phantom.random_slice(31337, shape=(96, 96), field_t=1.5)


def _inputs(maps: phantom.Maps, contrasts: list[tuple[float, float]], gains: list[float]) -> np.ndarray:
    """Noise-free inputs, each in its own scale (gain relative to the first)."""
    return np.stack([g * signal(maps.pd, te, tr, maps.t1, maps.t2) for g, (te, tr) in zip(gains, contrasts)])


def _perturbed(maps: phantom.Maps, sigma: float, seed: int = 0) -> tuple[np.ndarray, ...]:
    """The truth with independent log-normal errors per voxel: a network-like, unbiased but poor start."""
    rng = np.random.default_rng(seed)
    f = [np.exp(rng.normal(0, sigma, maps.pd.shape)) for _ in range(3)]
    return maps.pd * f[0], maps.t1 * f[1], maps.t2 * f[2]


def _tissue(maps: phantom.Maps) -> np.ndarray:
    return (maps.labels > 0) & (maps.t1 > 0) & (maps.pd > 0.05 * maps.pd.max())


def _median_err(a: np.ndarray, b: np.ndarray, m: np.ndarray) -> float:
    return float(np.median(np.abs(a[m] / b[m] - 1)))


def test_three_contrasts_recover_the_truth_from_a_poor_start(slice_maps: phantom.Maps) -> None:
    contrasts = [T1W, PDW, T2W]
    x = _inputs(slice_maps, contrasts, [1.0, 0.6, 1.7])
    pd0, t10, t20 = _perturbed(slice_maps, 0.25)
    m = _tissue(slice_maps)
    assert _median_err(t10, slice_maps.t1, m) > 0.12  # the start really is poor
    # known gains, a prior as wide as the start's errors: the data decide
    pd, t1, t2, _ = refine(x, np.array(contrasts), pd0, t10, t20, Settings(prior_sigma=1.0),
                           gains=np.array([1.0, 0.6, 1.7]))
    assert _median_err(t1, slice_maps.t1, m) < 0.01
    assert _median_err(t2, slice_maps.t2, m) < 0.01
    assert _median_err(pd, slice_maps.pd, m) < 0.01
    # the default prior is tighter (the network's typical error): still far better than the start
    _, t1d, _, _ = refine(x, np.array(contrasts), pd0, t10, t20, gains=np.array([1.0, 0.6, 1.7]))
    assert _median_err(t1d, slice_maps.t1, m) < 0.35 * _median_err(t10, slice_maps.t1, m)


def test_estimated_gains_from_an_unbiased_start(slice_maps: phantom.Maps) -> None:
    """Gains are not in the data; from maps with unbiased voxel errors they come out within a few per cent,
    and the refined T1/T2 are several times better than the start."""
    contrasts = [T1W, PDW, T2W]
    x = _inputs(slice_maps, contrasts, [1.0, 0.6, 1.7])
    start = _perturbed(slice_maps, 0.25, seed=3)
    m = _tissue(slice_maps)
    pd, t1, t2, gains = refine(x, np.array(contrasts), *start)
    assert gains[0] == 1.0
    np.testing.assert_allclose(gains[1:], [0.6, 1.7], rtol=0.05)
    for got, start_map, truth in ((t1, start[1], slice_maps.t1), (t2, start[2], slice_maps.t2)):
        assert _median_err(got, truth, m) < 0.35 * _median_err(start_map, truth, m)


def test_two_contrasts_reproduce_both_inputs(slice_maps: phantom.Maps) -> None:
    """Two contrasts cannot determine three unknowns; the refined maps must still re-render both inputs."""
    contrasts = [T1W, T2W]
    x = _inputs(slice_maps, contrasts, [1.0, 1.3])
    start = _perturbed(slice_maps, 0.25, seed=1)
    m = _tissue(slice_maps)
    # within the data term's sigma (the MAP fit trades misfit against the prior); estimated gains add their error
    for known, tol in ((np.array([1.0, 1.3]), Settings().data_sigma), (None, 1.5 * Settings().data_sigma)):
        pd, t1, t2, gains = refine(x, np.array(contrasts), *start, gains=known)
        for k, ((te, tr), g) in enumerate(zip(contrasts, gains)):
            before = _median_err(g * signal(start[0], te, tr, start[1], start[2]), x[k], m)
            after = _median_err(g * signal(pd, te, tr, t1, t2), x[k], m)
            assert after < tol < before, (k, before, after)


def test_one_input_and_background_are_left_alone(slice_maps: phantom.Maps) -> None:
    x = _inputs(slice_maps, [T2W], [1.0])
    start = _perturbed(slice_maps, 0.25, seed=2)
    pd, t1, t2, _ = refine(x, np.array([T2W]), *start)
    for got, before in zip((pd, t1, t2), start):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, before.astype(np.float32))
    x2 = _inputs(slice_maps, [T1W, T2W], [1.0, 1.0])
    pd, t1, t2, _ = refine(x2, np.array([T1W, T2W]), *start)
    bg = np.all(x2 <= Settings().background_frac, axis=0)
    assert bg.any()
    np.testing.assert_array_equal(t1[bg], start[1][bg].astype(np.float32))


def test_gain_estimate_is_exact_with_exact_maps_and_biased_with_biased_ones(slice_maps: phantom.Maps) -> None:
    """The gain is read through the maps: exact maps give it exactly; a T2 map 20 % too short gives a T2w gain that
    is too high (what the docs say: the gains come from the prior and carry its bias)."""
    x = _inputs(slice_maps, [T1W, T2W], [1.0, 1.5])
    m = _tissue(slice_maps)
    g = input_gains(x, np.array([T1W, T2W]), slice_maps.t1, slice_maps.t2, m)
    assert g[0] == 1.0 and abs(g[1] / 1.5 - 1) < 1e-4
    g_bad = input_gains(x, np.array([T1W, T2W]), slice_maps.t1, slice_maps.t2 * 0.8, m)
    assert g_bad[1] > 1.05 * 1.5


def test_inputs_outside_their_field_of_view_are_not_data(slice_maps: phantom.Maps) -> None:
    """A resampled partner is 0 outside its field of view: with ``valid`` those zeros are not fitted."""
    contrasts = [T1W, T2W]
    x = _inputs(slice_maps, contrasts, [1.0, 1.0])
    x[1, :, :48] = 0.0
    valid = np.ones(x.shape, bool)
    valid[1, :, :48] = False
    start = _perturbed(slice_maps, 0.1, seed=4)
    m = _tissue(slice_maps)
    left = m.copy()
    left[:, 48:] = False
    _, _, t2, _ = refine(x, np.array(contrasts), *start, gains=np.ones(2), valid=valid)
    _, _, t2_naive, _ = refine(x, np.array(contrasts), *start, gains=np.ones(2))
    assert _median_err(t2, slice_maps.t2, left) < 0.15 < _median_err(t2_naive, slice_maps.t2, left)


def test_bad_shapes_are_refused(slice_maps: phantom.Maps) -> None:
    x = _inputs(slice_maps, [T1W, T2W], [1.0, 1.0])
    with pytest.raises(ValueError, match="te_tr"):
        refine(x, np.array([T1W]), slice_maps.pd, slice_maps.t1, slice_maps.t2)
    with pytest.raises(ValueError, match="gains must be"):
        refine(x, np.array([T1W, T2W]), slice_maps.pd, slice_maps.t1, slice_maps.t2, gains=np.ones(3))
    with pytest.raises(ValueError, match="do not match"):
        refine(x, np.array([T1W, T2W]), slice_maps.pd[:10], slice_maps.t1, slice_maps.t2)
