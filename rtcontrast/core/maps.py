"""The maps of one series: PD, T1, T2 and what the model read from the image.

A plain numpy container, kept apart from the onnxruntime runner so that rendering,
derivation and evaluation can use maps without loading an inference engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class QMaps:
    """Maps of one series, [N,H,W] float32, in the series' stored-value units (PD) and ms.

    The maps are arrays, or :class:`SlabFile` objects when the node spilled them to its
    job folder (read them by slabs of slices, ``maps.t1[a:b]``).
    """

    pd: np.ndarray
    t1: np.ndarray
    t2: np.ndarray
    te_tr_pred: np.ndarray  # [N,2] ms, identified per slice
    scale: float  # the series scale s used for the model input
    #: with data consistency: each input's gain relative to the first (estimated once for the volume)
    input_gains: list[float] | None = None
    #: qmap/3 models that export uncertainty: sd of ln T1 and ln T2, sd of PD (stored-value units); else None
    t1_log_sd: np.ndarray | None = None
    t2_log_sd: np.ndarray | None = None
    pd_sd: np.ndarray | None = None
    #: qmap/3: the field strength (T) given to the model, and whether it was assumed (header had none)
    field_t: float | None = None
    field_t_assumed: bool = False
    #: with data consistency: the fusion QA figures (rtcontrast.core.fusion; gains' source, misfit per input, bounds)
    fusion: dict | None = None


class SlabFile:
    """A float32 [N,H,W] map kept in a file, written and read a slab of slices at a time.

    Why (#13 item 3, memory): the three full-series maps of a 512x512x200 series are
    630 MB; held in memory while inference fills them they set the node's peak RSS.  A
    job's maps go to files in its work folder as the batches come out and are read back
    slab by slab (QA, windows, render, derive).  Plain ``readinto``/``write`` calls, not
    ``mmap``: mapped pages count in the process's RSS, the page cache does not.  Values
    are the float32 bytes themselves: what is read back is bit for bit what was written.

    Indexing: ``f[a:b]`` / ``f[i]`` along the first axis (contiguous; step 1) return new
    arrays; ``f[a:b] = values`` writes them.  ``np.asarray(f)`` reads the whole map (for a
    consumer that needs it whole: Parametric Maps, uncertainty QA).
    """

    def __init__(self, path: str | Path, shape: tuple[int, ...], dtype: np.dtype | type = np.float32) -> None:
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        with open(self.path, "wb") as f:
            f.truncate(self._row * self.shape[0])  # unwritten slices read as 0.0

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def __len__(self) -> int:
        return self.shape[0]

    def _span(self, key: Any) -> tuple[int, int, bool]:
        n = self.shape[0]
        if isinstance(key, (int, np.integer)):
            i = int(key) + (n if key < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {key} out of range for {n} slices")
            return i, i + 1, True
        if isinstance(key, slice):
            a, b, step = key.indices(n)
            if step != 1:
                raise IndexError("a SlabFile is read in contiguous slabs (step 1)")
            return a, max(a, b), False
        raise IndexError(f"a SlabFile is indexed by a slice or an int along its first axis, not {type(key).__name__}")

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):
            head = self[key[0]] if key else self[:]
            return head[key[1:]] if isinstance(key[0], (int, np.integer)) else head[(slice(None), *key[1:])]
        a, b, squeeze = self._span(key)
        out = np.empty((b - a, *self.shape[1:]), self.dtype)
        if b > a:
            with open(self.path, "rb") as f:
                f.seek(a * self._row)
                got = f.readinto(memoryview(out).cast("B"))
            if got != out.nbytes:
                raise OSError(f"{self.path}: short read ({got} of {out.nbytes} bytes)")
        return out[0] if squeeze else out

    def __setitem__(self, key: Any, value: Any) -> None:
        a, b, squeeze = self._span(key)
        shape = (b - a, *self.shape[1:])
        arr = np.ascontiguousarray(np.broadcast_to(np.asarray(value, dtype=self.dtype), shape[1:] if squeeze else shape))
        with open(self.path, "r+b") as f:
            f.seek(a * self._row)
            f.write(memoryview(arr).cast("B"))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"SlabFile({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"


def slab_allocator(folder: str | Path) -> Callable[[str, tuple[int, ...]], SlabFile]:
    """``out(name, shape)`` for :meth:`rtcontrast.core.inference.QMapModel.predict`: maps as files in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return lambda name, shape: SlabFile(folder / f"{name}.f32", shape)


def slab_ranges(n: int, per_slab: int) -> Iterator[tuple[int, int]]:
    """``(a, b)`` ranges of at most ``per_slab`` slices covering ``0..n``."""
    step = max(1, per_slab)
    for a in range(0, n, step):
        yield a, min(n, a + step)
