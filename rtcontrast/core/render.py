"""Render synthetic spin-echo contrasts from maps and turn them into 16-bit pixels.

The rendered image is in the input series' intensity scale (PD carries the input's
units), so a synthetic image at the input's own TE/TR looks like the input.  Pixels are
stored as uint16 without rescale (a non-identity rescale in MR upsets TPS windowing);
values above 65535 are clipped, which only happens for inputs that already used the
full 16-bit range.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rtcontrast.core.physics import signal
from rtcontrast.core.maps import QMaps

U16_MAX = 65535


@dataclass(frozen=True)
class Window:
    """A display window (DICOM WindowCenter/WindowWidth)."""

    center: float
    width: float


def render(maps: QMaps, te_ms: float, tr_ms: float) -> np.ndarray:
    """S(TE, TR) for every voxel, float32, in the input's intensity scale."""
    return signal(maps.pd, np.float32(te_ms), np.float32(tr_ms), maps.t1, maps.t2).astype(np.float32)


def to_uint16(image: np.ndarray) -> np.ndarray:
    """Round and clip to the uint16 range."""
    return np.clip(np.rint(image), 0, U16_MAX).astype(np.uint16)


def window_from_percentiles(pixels: np.ndarray, low: float = 1.0, high: float = 99.5) -> Window:
    """A window spanning the ``low``..``high`` percentiles of the non-zero voxels."""
    nz = pixels[pixels > 0]
    if nz.size == 0:
        return Window(center=0.5, width=1.0)
    lo, hi = (float(v) for v in np.percentile(nz, [low, high]))
    width = max(hi - lo, 1.0)
    return Window(center=lo + width / 2, width=width)


#: Voxels per block of :func:`self_nrmse` (16 slices of 256x256, 4 of 512x512).
NRMSE_BLOCK_VOXELS = 16 * 256 * 256


def self_nrmse(maps: QMaps, pixels: np.ndarray, te_ms: float, tr_ms: float, block_slices: int | None = None) -> float:
    """QA residual: NRMSE of re-rendering the input's own contrast against the input.

    Normalised by the input's series scale, over voxels above 5 % of it (the body).
    Computed ``block_slices`` slices at a time (default: :data:`NRMSE_BLOCK_VOXELS` voxels,
    at most 16 slices): a whole-volume render allocates several temporaries of the volume's
    size (hundreds of MB for a 512x512x200 series), a block about 20 bytes a voxel.
    """
    if block_slices is None:
        block_slices = max(1, min(16, NRMSE_BLOCK_VOXELS // max(1, int(np.prod(pixels.shape[1:])))))
    total, count = 0.0, 0
    for a in range(0, pixels.shape[0], max(1, block_slices)):
        b = a + max(1, block_slices)
        sub = QMaps(pd=maps.pd[a:b], t1=maps.t1[a:b], t2=maps.t2[a:b], te_tr_pred=maps.te_tr_pred[a:b], scale=maps.scale)
        px = pixels[a:b]
        mask = px > 0.05 * maps.scale
        if not mask.any():
            continue
        err = (render(sub, te_ms, tr_ms)[mask] - px[mask]).astype(np.float64)
        total += float(np.sum(err**2))
        count += int(err.size)
    if count == 0:
        return 0.0
    return float(np.sqrt(total / count) / maps.scale)


# -- windows of a streamed series: exact percentiles from a histogram of uint16 pixels --------------
#: Bins of a histogram of uint16 pixels (one per value).
U16_BINS = U16_MAX + 1


def u16_histogram(pixels: np.ndarray) -> np.ndarray:
    """Counts of every uint16 value in ``pixels`` (add the histograms of a series' slabs).

    Why: a streamed job sends its first slab before the last is rendered, yet every
    instance of a series carries the series' one window; the histogram gives the exact
    percentiles of the whole series from one slab-wise pass, without holding the volume.
    """
    return np.bincount(np.asarray(pixels, dtype=np.uint16).ravel(), minlength=U16_BINS).astype(np.int64)


def percentiles_from_histogram(hist: np.ndarray, qs: list[float]) -> list[float] | None:
    """``np.percentile(v[v > 0], qs)`` (linear method) for the values counted in ``hist``; None when none is > 0.

    The arithmetic follows numpy's own (virtual index q/100*(n-1), lerp from the nearer
    side), so the windows are the same numbers as the whole-volume ones.
    """
    counts = np.asarray(hist, dtype=np.int64).copy()
    counts[0] = 0
    n = int(counts.sum())
    if n == 0:
        return None
    cum = np.cumsum(counts)
    out = []
    for q in qs:
        virtual = (np.float64(q) / 100.0) * (n - 1)
        below = int(np.floor(virtual))
        above = min(below + 1, n - 1)
        a = float(np.searchsorted(cum, below, side="right"))  # value of the sorted element #below
        b = float(np.searchsorted(cum, above, side="right"))
        t = virtual - below
        diff = b - a
        out.append(float(b - diff * (1.0 - t)) if t >= 0.5 else float(a + diff * t))
    return out


def window_from_histogram(hist: np.ndarray, low: float = 1.0, high: float = 99.5) -> Window:
    """:func:`window_from_percentiles` of the pixels counted in ``hist`` (same numbers)."""
    p = percentiles_from_histogram(hist, [low, high])
    if p is None:
        return Window(center=0.5, width=1.0)
    lo, hi = p
    width = max(hi - lo, 1.0)
    return Window(center=lo + width / 2, width=width)
