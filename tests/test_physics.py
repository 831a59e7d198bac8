"""The spin-echo equation against hand-computed values, in numpy and torch."""

import math

import numpy as np
import pytest

from rtcontrast.core.physics import SEED_CONTRASTS, signal, weighting


def test_hand_computed_values() -> None:
    # PD 0.8, T1 1000, T2 80 at TE 80 / TR 2000: 0.8 * (1 - e^-2) * e^-1
    assert signal(0.8, 80.0, 2000.0, 1000.0, 80.0) == pytest.approx(0.8 * (1 - math.exp(-2)) * math.exp(-1), rel=1e-6)
    # fat at 1.5 T, T1w 8/400: (1 - e^-(400/250)) * e^-(8/70)
    assert weighting(8.0, 400.0, 250.0, 70.0) == pytest.approx((1 - math.exp(-1.6)) * math.exp(-8 / 70), rel=1e-6)


def test_zero_relaxation_is_safe() -> None:
    out = signal(np.array([1.0, 1.0, 0.0]), 10.0, 500.0, np.array([0.0, 800.0, 0.0]), np.array([50.0, 0.0, 0.0]))
    assert np.all(np.isfinite(out))
    # T1 -> 0: full recovery; T2 -> 0: no signal
    assert out[0] == pytest.approx(math.exp(-10 / 50), rel=1e-6)
    assert out[1] == pytest.approx(0.0, abs=1e-12)
    assert out[2] == 0.0


def test_limits_and_monotonicity() -> None:
    # long TR, short TE -> PD weighting
    assert signal(0.7, 1e-3, 1e6, 900.0, 40.0) == pytest.approx(0.7, rel=1e-4)
    te = np.linspace(8, 150, 20)
    s = signal(1.0, te, 4500.0, 1200.0, 70.0)
    assert np.all(np.diff(s) < 0)
    tr = np.linspace(300, 6000, 20)
    s = signal(1.0, 8.0, tr, 1200.0, 70.0)
    assert np.all(np.diff(s) > 0)


def test_torch_matches_numpy() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    pd, t1, t2 = rng.uniform(0, 1, 50), rng.uniform(0, 4000, 50), rng.uniform(0, 2000, 50)
    for te, tr in SEED_CONTRASTS:
        ref = signal(pd, te, tr, t1, t2)
        got = signal(torch.tensor(pd), te, tr, torch.tensor(t1), torch.tensor(t2), xp=torch).numpy()
        np.testing.assert_allclose(got, ref, rtol=1e-6)
