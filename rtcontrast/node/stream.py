"""Stream a job's outputs: render -> derive -> outbox -> TPS, slab of slices by slab.

Why: the TPS is the slowest stage (it ingests a few tens of instances per second), so a
job that renders every recipe, then derives every instance, then writes all of them to
the outbox, then sends, keeps the TPS idle for most of the job and holds every derived
volume (and every derived dataset) in memory at once.  Here each slab of slices is
rendered, derived and written to the outbox, and the sender is woken, while the next
slab is computed: the first derived instance reaches the TPS seconds after the QA
decision, and memory is bounded by a slab, not by the volume.

What stays whole-series, and why:

* the QA decision (in :func:`rtcontrast.node.pipeline.run_job`) comes *before* anything is
  streamed, and a held series sends nothing: from the whole series' maps, or, for a long
  series, from a sample of its slices, the rest being inferred here slab by slab
  (``source``, :mod:`rtcontrast.node.gate`);
* every instance of a series carries the series' one window (WindowCenter/Width from
  percentiles over the whole series, or over the sample).  :func:`series_windows` computes them first in one
  slab-wise pass that keeps only a 65536-bin histogram per series (exactly the numbers
  the whole-volume writers give, :func:`rtcontrast.core.render.window_from_histogram`),
  so rendering costs two passes of the cheap per-voxel formula;
* Parametric Maps are one multi-frame object per quantity: derived whole, after the slabs.

Guarantees kept: nothing is ``delivered`` before its C-STORE succeeded (the outbox and
sender are unchanged); UIDs are deterministic, so a job re-run after a crash replaces
what it had queued or sent (the TPS replaces by SOP Instance UID: no duplicates).  A job
that fails while streaming withdraws its undelivered instances
(:meth:`rtcontrast.node.dispatch.outbox.Outbox.withdraw_pending`) and says so in its
reason; what the TPS may have received by then is in docs/admin.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset

from rtcontrast.core.maps import QMaps
from rtcontrast.core.render import (
    Window,
    render,
    to_uint16,
    u16_histogram,
    window_from_histogram,
)
from rtcontrast.dicom.derive import RecipeInfo, contrast_template, derive_slab
from rtcontrast.dicom.map_series import (
    derive_parametric_maps,
    map_slab_u16,
    map_template,
    map_to_u16,
    map_window,
)
from rtcontrast.dicom.volume import Volume

if TYPE_CHECKING:  # the pipeline imports this module
    from rtcontrast.node.pipeline import PipelineContext

__all__ = ["FIRST_SLAB_VOXELS", "SLAB_VOXELS", "Streamed", "classic_u16", "middle_slices", "read_slab", "recipe_u16",
           "series_windows", "slabs", "stream_outputs"]

#: Voxels per slab (16 slices of 256x256; 4 of 512x512).  Small enough that the first
#: slab reaches the TPS soon and a slab's datasets are a few MB; large enough that the
#: per-slab costs (one outbox transaction and directory fsync per destination, one
#: sender association) stay small against the slab's work.
SLAB_VOXELS = 1 << 20
MAP_QUANTITIES = ("T1", "T2", "PD")


#: Voxels of the first slab (2 slices of 256x256): it is what the time to the first image at
#: the TPS waits for, so it is small; the following slabs amortise their per-slab costs.
FIRST_SLAB_VOXELS = 1 << 17


def slabs(n: int, h: int, w: int, voxels: int | None = None, first: int | None = None) -> Iterator[tuple[int, int]]:
    """``(a, b)`` slice ranges covering ``0..n``: a first slab of about ``first`` voxels (default
    :data:`FIRST_SLAB_VOXELS`, never more than ``voxels``), then about ``voxels`` (:data:`SLAB_VOXELS`) each."""
    hw = max(1, h * w)
    step = max(1, (SLAB_VOXELS if voxels is None else voxels) // hw)
    a = 0
    if n:
        b = min(n, max(1, min(step, (FIRST_SLAB_VOXELS if first is None else first) // hw)))
        yield 0, b
        a = b
    for start in range(a, n, step):
        yield start, min(n, start + step)


def read_slab(maps: QMaps, a: int, b: int) -> QMaps:
    """Slices ``a..b-1`` of ``maps`` in memory (one read per map when the maps are files; views of arrays)."""
    return QMaps(pd=np.asarray(maps.pd[a:b]), t1=np.asarray(maps.t1[a:b]), t2=np.asarray(maps.t2[a:b]),
                 te_tr_pred=maps.te_tr_pred[a:b], scale=maps.scale)


def recipe_u16(slab: QMaps, te_ms: float, tr_ms: float) -> np.ndarray:
    """Stored pixels (uint16) of a recipe from maps in memory."""
    return to_uint16(render(slab, te_ms, tr_ms))


def render_slab(maps: QMaps, a: int, b: int, te_ms: float, tr_ms: float) -> np.ndarray:
    """Stored pixels (uint16) of slices ``a..b-1`` of a recipe."""
    return recipe_u16(read_slab(maps, a, b), te_ms, tr_ms)


def classic_slab(maps: QMaps, quantity: str, a: int, b: int, mask: np.ndarray | None) -> np.ndarray:
    """Stored pixels of slices ``a..b-1`` of a classic map image (PD relative to the series scale), masked."""
    return classic_u16(read_slab(maps, a, b), quantity, None if mask is None else mask[a:b])


def classic_u16(slab: QMaps, quantity: str, mask: np.ndarray | None) -> np.ndarray:
    """Stored pixels of a classic map image from maps already in memory (PD relative to the series scale)."""
    if quantity == "PD":
        u16 = map_to_u16(np.asarray(slab.pd) / np.float32(slab.scale), "PD")
    else:
        u16 = map_to_u16(np.asarray(slab.t1 if quantity == "T1" else slab.t2), quantity)
    return map_slab_u16(u16, quantity, mask)



def series_windows(
    maps: QMaps, recipes: list[RecipeInfo], classic: bool, mask: np.ndarray | None, voxels: int | None = None,
) -> tuple[dict[str, Window], dict[str, Window]]:
    """(center, width) of every recipe's series and of every classic map series, from one slab-wise pass."""
    n, h, w = maps.pd.shape
    hists = {r.key: np.zeros(65536, np.int64) for r in recipes}
    mhists = {q: np.zeros(65536, np.int64) for q in (MAP_QUANTITIES if classic else ())}
    for a, b in slabs(n, h, w, voxels):
        slab = read_slab(maps, a, b)
        for r in recipes:
            hists[r.key] += u16_histogram(recipe_u16(slab, r.te_ms, r.tr_ms))
        for q in mhists:
            mhists[q] += u16_histogram(classic_u16(slab, q, None if mask is None else mask[a:b]))
    windows = {k: window_from_histogram(hh) for k, hh in hists.items()}
    mwin = {q: map_window(hh) for q, hh in mhists.items()}
    return windows, mwin


def middle_slices(maps: QMaps, recipes: list[RecipeInfo]) -> dict[str, np.ndarray]:
    """Each recipe rendered on the middle slice only, shaped like the volume for the QA preview.

    The preview shows slice N//2; a zero-stride view (:func:`numpy.broadcast_to`) gives
    it the volume's shape without rendering or holding the other slices.
    """
    n = maps.pd.shape[0]
    z = n // 2
    return {r.key: np.broadcast_to(render_slab(maps, z, z + 1, r.te_ms, r.tr_ms), (n, *maps.pd.shape[1:]))
            for r in recipes}


@dataclass
class Streamed:
    """What :func:`stream_outputs` did: instances queued per destination, per-stage seconds."""

    queued: dict[str, int] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=lambda: {"render": 0.0, "derive": 0.0, "enqueue": 0.0})
    first_queued_at: float | None = None  # time.perf_counter() when the first slab was in the outbox
    slabs: int = 0


def stream_outputs(
    ctx: PipelineContext,
    job_id: int,
    volume: Volume,
    maps: QMaps,
    recipes: list[tuple[RecipeInfo, list[str]]],
    windows: dict[str, Window],
    map_windows: dict[str, Window],
    mask: np.ndarray | None,
    *,
    co_sources: list[Volume],
    qa_note: str | None,
    flag: Callable[[list[Dataset]], None] | None,
    done: Streamed,
    voxels: int | None = None,
    source: Callable[[int, int], QMaps] | None = None,
) -> Streamed:
    """Render, derive and queue the job's outputs slab by slab; wake the sender after each slab.

    ``recipes``: each recipe with its destinations; classic maps go to
    ``protocol.maps.destinations`` with ``map_windows`` (empty: no classic maps).
    ``flag``: marks datasets sent with a QA warning (applied to every slab before it is
    queued).  ``done`` is filled as the slabs go (so a caller that sees an exception knows
    how far it got).  Parametric Maps, if the protocol asks for them, follow the slabs.
    ``source(a, b)``: the maps of slices ``a..b-1`` in memory (:meth:`rtcontrast.node.gate.SeriesInference.slab`
    infers them there); default: read from ``maps``.  Each slab is read (or inferred) once
    for every recipe and map.
    """
    p, node, model = ctx.protocol, ctx.node, ctx.model_identity
    t0 = time.perf_counter()
    co = tuple(co_sources)
    templates = {r.key: contrast_template(volume, r, node, model, windows[r.key], co_sources=co, qa_note=qa_note)
                 for r, _ in recipes}
    nums = p.maps.classic_series_numbers
    mtemplates = {q: map_template(volume, q, getattr(nums, q), node, model, map_windows[q], co_sources=co,
                                  masked=mask is not None, qa_note=qa_note) for q in map_windows}
    done.timings_s["derive"] += time.perf_counter() - t0
    n, h, w = maps.pd.shape
    for a, b in slabs(n, h, w, voxels):
        per_dest: dict[str, list[Dataset]] = {}
        t0 = time.perf_counter()
        slab = source(a, b) if source is not None else read_slab(maps, a, b)
        stage = "infer" if source is not None else "render"  # inferring the slab, or reading it back
        done.timings_s[stage] = done.timings_s.get(stage, 0.0) + time.perf_counter() - t0
        for r, dests in recipes:
            t0 = time.perf_counter()
            u16 = recipe_u16(slab, r.te_ms, r.tr_ms)
            t1 = time.perf_counter()
            dss = derive_slab(volume, templates[r.key], u16, a, node=node, key=r.key, model=model, co_sources=co)
            done.timings_s["render"] += t1 - t0
            done.timings_s["derive"] += time.perf_counter() - t1
            for d in dests:
                per_dest.setdefault(d, []).extend(dss)
        t0 = time.perf_counter()
        for q in map_windows:
            dss = derive_slab(volume, mtemplates[q], classic_u16(slab, q, None if mask is None else mask[a:b]), a,
                              node=node, key=f"map-{q}", model=model, co_sources=co)
            for d in p.maps.destinations:
                per_dest.setdefault(d, []).extend(dss)
        if flag is not None:
            flag(list({id(ds): ds for dss in per_dest.values() for ds in dss}.values()))
        done.timings_s["derive"] += time.perf_counter() - t0
        _enqueue(ctx, job_id, per_dest, done)
        done.slabs += 1
        if done.first_queued_at is None:
            done.first_queued_at = time.perf_counter()
    if p.maps.parametric:
        t0 = time.perf_counter()
        pn = p.maps.parametric_series_numbers
        pms = derive_parametric_maps(
            volume, {"T1": np.asarray(maps.t1), "T2": np.asarray(maps.t2),  # whole: one multi-frame object each
                     "PD": np.asarray(maps.pd) / np.float32(maps.scale)}, node, model,
            {"T1": pn.T1, "T2": pn.T2, "PD": pn.PD}, content_qualification=p.maps.content_qualification,
            co_sources=co, mask=mask, qa_note=qa_note)
        if flag is not None:
            flag(list(pms))
        done.timings_s["derive"] += time.perf_counter() - t0
        _enqueue(ctx, job_id, {d: list(pms) for d in p.maps.destinations}, done)
    return done


def _enqueue(ctx: PipelineContext, job_id: int, per_dest: dict[str, list[Dataset]], done: Streamed) -> None:
    t0 = time.perf_counter()
    for dest, dss in per_dest.items():
        if dss:
            ctx.outbox.enqueue(job_id, dest, dss)
            done.queued[dest] = done.queued.get(dest, 0) + len(dss)
    done.timings_s["enqueue"] += time.perf_counter() - t0
    if ctx.on_enqueued is not None:
        ctx.on_enqueued()  # the sender starts on this slab while the next one is computed
