"""Spin-echo signal equation, in one place for training (torch) and rendering (numpy).

    S(TE, TR) = PD * (1 - exp(-TR / T1)) * exp(-TE / T2)

TE, TR, T1 and T2 are in milliseconds.  Where T1 or T2 is zero (air, cortical bone,
background) the tissue gives no signal: the equation is evaluated with T1/T2 clamped
to a tiny positive value, so the result is finite (never NaN/inf) and tends to the
physical limit (T1 -> 0 gives full recovery, T2 -> 0 gives no signal).
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: Smallest relaxation time used in the exponentials (ms).  Avoids division by zero.
EPS_MS = 1e-6
#: Smallest E used when solving PD = c / E: a voxel that gives < 0.1 % of its PD as signal carries no usable PD
#: information (PD is then bounded, not exploded).  The networks and the evaluation oracle solve PD the same way.
MIN_WEIGHTING = 1e-3

#: The seed paper's five training contrasts (TE, TR) in ms.
SEED_CONTRASTS: tuple[tuple[float, float], ...] = (
    (75.0, 4500.0),
    (120.0, 4500.0),
    (8.0, 400.0),
    (8.0, 750.0),
    (8.0, 4500.0),
)
SEED_CONTRAST_NAMES: tuple[str, ...] = ("T2w_75", "T2w_120", "T1w_400", "T1w_750", "PDw")


def weighting(te: Any, tr: Any, t1: Any, t2: Any, xp: Any = np) -> Any:
    """Return E = (1 - exp(-TR/T1)) * exp(-TE/T2), the signal per unit PD.

    ``xp`` is the array module (numpy or torch); arguments broadcast.
    """
    if xp is np:
        t1 = np.maximum(np.asarray(t1, dtype=np.float64 if np.asarray(t1).dtype == np.float64 else np.float32), EPS_MS)
        t2 = np.maximum(np.asarray(t2, dtype=t1.dtype), EPS_MS)
        return (1.0 - np.exp(-np.asarray(tr) / t1)) * np.exp(-np.asarray(te) / t2)
    t1 = xp.clamp(t1, min=EPS_MS)
    t2 = xp.clamp(t2, min=EPS_MS)
    return (1.0 - xp.exp(-tr / t1)) * xp.exp(-te / t2)


def signal(pd: Any, te: Any, tr: Any, t1: Any, t2: Any, xp: Any = np) -> Any:
    """Spin-echo signal S = PD * (1 - exp(-TR/T1)) * exp(-TE/T2) (numpy or torch)."""
    return pd * weighting(te, tr, t1, t2, xp=xp)
