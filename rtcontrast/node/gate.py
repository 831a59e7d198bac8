"""QA on a sample of slices first, then inference slab by slab while the outputs stream.

Why (issue #13, time to the first image at the TPS): inferring a whole series before
anything is sent takes ~6-11 s for 100 slices of 256x256 on two CPU cores, so the TPS
waited that long for its first instance, and the node's CPU sat idle while the TPS was
slow and the other way round.  The QA decision (hold, warn, send) rests on figures that
are medians and percentiles over the body (uncertainty, TE/TR identified per slice, map
percentiles) and on an RMS (self NRMSE): evenly spaced slices estimate them well.  So a
long series is judged on a sample (``qa.sample_slices``, default 16, always including the
middle slice the QA preview shows) before anything is rendered; a held series still
sends nothing.  The other slices are then inferred slab by slab inside the stream
(:func:`rtcontrast.node.stream.stream_outputs`), each slab rendered, derived and queued
while the sender delivers the previous one.

What the sample changes, and what it does not:

* stored pixel values are per voxel: a slice's maps come from the same network, input
  and *series* scale (computed over all slices, :meth:`SeriesInference.infer`), so every
  derived pixel is what whole-series inference gives;
* the series' display window (WindowCenter/Width) is taken from the sample's histogram,
  an estimate of the whole series' percentiles; it is the same for every instance;
* once every slice is inferred, QA is computed again over the whole series and recorded
  (``qa`` holds the whole series' figures, ``qa["gate"]`` the sample's that decided).
  If the whole series would have been held where the sample passed, the job ends
  ``held``, its undelivered instances are withdrawn and the reason says how many were
  queued: a TPS may then hold part of a series (docs/admin.md).

A short series (at most twice the sample) and a fused job are inferred whole first, as
before.  ``qa.sample_slices: 0`` turns the sample off (every series inferred whole
before the QA decision: the first image waits for the whole series' inference).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from rtcontrast.core.contract import series_scale
from rtcontrast.core.inference import QMapModel
from rtcontrast.core.maps import QMaps, slab_ranges
from rtcontrast.node.qa import compute_qa, non_finite_figures, qa_action, qa_violations, uncertainty_violations
from rtcontrast.settings.protocol import ProtocolConfig

__all__ = ["NonFiniteSlab", "SeriesInference", "judge_whole_series", "non_finite_counts", "sample_slices"]

_MAP_NAMES = ("pd", "t1", "t2", "t1_log_sd", "t2_log_sd", "pd_sd")


def sample_slices(n: int, count: int) -> np.ndarray | None:
    """``count`` evenly spaced slice indices from first to last, and the middle slice ``n // 2`` (the QA preview's).

    None when the series is inferred whole before QA: ``count`` is 0, or the series has at
    most ``2 * count`` slices (a sample of half the series or more saves little).
    """
    if count <= 0 or n <= 2 * count:
        return None
    idx = np.round(np.linspace(0, n - 1, count)).astype(np.int64)  # first and last slice included
    return np.unique(np.append(idx, n // 2))


class NonFiniteSlab(ValueError):
    """A slab inferred while streaming holds NaN or infinite voxels: the job fails (nothing of it stays queued)."""


def non_finite_counts(maps: QMaps) -> list[str]:
    """Which estimated maps hold NaN or infinite voxels, with the counts (checked before anything is rendered).

    Read slab by slab: the maps may be files in the job folder (:class:`~rtcontrast.core.maps.SlabFile`).
    """
    out = []
    for name, a in (("PD", maps.pd), ("T1", maps.t1), ("T2", maps.t2)):
        bad = 0
        for c, d in slab_ranges(a.shape[0], 8):
            slab = np.asarray(a[c:d])
            bad += int(slab.size - np.count_nonzero(np.isfinite(slab)))
        if bad:
            out.append(f"{name} map has {bad} non-finite voxel(s)")
    return out


class SeriesInference:
    """One series' inference, run on any slices in any order, with the whole series' scale.

    ``out(name, shape)`` allocates the full-series maps (the node's
    :func:`~rtcontrast.core.maps.slab_allocator`: files in the job folder); every inferred
    slice is written there, so the whole series' QA, the preview and Parametric Maps read
    them afterwards as from :meth:`QMapModel.predict`.
    """

    def __init__(self, model: QMapModel, pixels: np.ndarray, te_ms: float, tr_ms: float, field_t: float | None,
                 out: Callable[[str, tuple[int, ...]], Any]) -> None:
        self.model, self.pixels, self.te, self.tr = model, pixels, float(te_ms), float(tr_ms)
        self.field_t = field_t
        self.scale = float(series_scale(pixels, model.info.input_percentile))
        n, h, w = pixels.shape
        self.done = np.zeros(n, bool)
        names = ("pd", "t1", "t2", *model.uncertainty_outputs)
        files = {name: out(name, (n, h, w)) for name in names}
        self.maps = QMaps(pd=files["pd"], t1=files["t1"], t2=files["t2"], te_tr_pred=np.zeros((n, 2), np.float32),
                          scale=self.scale, t1_log_sd=files.get("t1_log_sd"), t2_log_sd=files.get("t2_log_sd"),
                          pd_sd=files.get("pd_sd"))

    def infer(self, idx: np.ndarray) -> QMaps:
        """Maps of slices ``idx`` (in memory), also written to the full-series maps."""
        idx = np.asarray(idx, np.int64)
        got = self.model.predict(self.pixels[idx], self.te, self.tr, field_t=self.field_t, scale=self.scale)
        if self.model.info.takes_field and not self.done.any():
            # the first call resolves (and logs) a missing field strength once; later calls pass what it used
            self.field_t = got.field_t
            self.maps.field_t, self.maps.field_t_assumed = got.field_t, got.field_t_assumed
        got.field_t, got.field_t_assumed = self.maps.field_t, self.maps.field_t_assumed
        self.maps.te_tr_pred[idx] = got.te_tr_pred
        runs = np.split(np.arange(idx.size), np.flatnonzero(np.diff(idx) != 1) + 1)
        for name in _MAP_NAMES:
            full, part = getattr(self.maps, name), getattr(got, name)
            if full is None:
                continue
            for run in runs:  # contiguous runs: one write each
                full[int(idx[run[0]]):int(idx[run[-1]]) + 1] = part[run[0]:run[-1] + 1]
        self.done[idx] = True
        return got

    def slab(self, a: int, b: int) -> QMaps:
        """Maps of slices ``a..b-1`` in memory: the slices not inferred yet are inferred (and written to the
        full-series maps), then the slab is read back whole, sample slices included.

        Raises :class:`NonFiniteSlab` when a map of the slab holds NaN or infinite voxels.
        """
        todo = np.flatnonzero(~self.done[a:b]) + a
        if todo.size:
            self.infer(todo)
        parts = {name: np.asarray(full[a:b]) for name in _MAP_NAMES if (full := getattr(self.maps, name)) is not None}
        slab = QMaps(pd=parts["pd"], t1=parts["t1"], t2=parts["t2"], te_tr_pred=self.maps.te_tr_pred[a:b],
                     scale=self.scale, t1_log_sd=parts.get("t1_log_sd"), t2_log_sd=parts.get("t2_log_sd"),
                     pd_sd=parts.get("pd_sd"), field_t=self.maps.field_t, field_t_assumed=self.maps.field_t_assumed)
        bad = non_finite_counts(slab)
        if bad:
            raise NonFiniteSlab(f"non-finite data in slices {a}-{b - 1}: " + "; ".join(bad))
        return slab


def judge_whole_series(qa: dict[str, Any], maps: QMaps, pixels: np.ndarray, te_ms: float, tr_ms: float,
                       protocol: ProtocolConfig) -> dict[str, Any]:
    """The whole series' QA figures, violations and action, once every slice is inferred.

    ``qa`` is the job's QA as the sample decided it (its ``uncertainty_limits`` apply here
    too).  Returns what is recorded as ``qa["whole_series"]``; ``action`` is ``failed`` when a
    figure is not finite.  The caller compares it with the sample's action.
    """
    whole = compute_qa(maps, pixels, te_ms, tr_ms)
    probe = dict(whole)
    if qa.get("uncertainty_limits"):
        probe["uncertainty_limits"] = qa["uncertainty_limits"]
    violations = qa_violations(probe, protocol)
    whole["violations"] = violations
    whole["action"] = qa_action(violations, uncertainty_violations(probe, protocol), protocol)
    broken = non_finite_figures(whole)
    if broken:
        whole["action"] = "failed"
    return whole
