"""The per-job stages: eligibility -> assemble -> infer -> render -> derive -> enqueue, with QA.

Why one function per job (:func:`run_job`) rather than a persistent stage machine: every
stage is deterministic (same files, same protocol, same model give the same pixels and,
through :mod:`rtcontrast.dicom.uids`, the same UIDs) and the outbox replaces rows of the same
SOP instance, so the simplest correct resume after a crash is to run an unfinished job
again from the start.  The job's state still moves through ``assembling``, ``inferring``,
``rendering``, ``deriving`` and ``queued`` so that ``node.py status`` and the audit show
where a job is (or where it died).

Outcomes (the job's final state here):

* ``ineligible``: the protocol's match rules refuse the series, or TE/TR are absent or
  outside the model's trained range; the reason names the attribute, the value and the
  range.  Nothing is produced.
* ``failed``: the files do not form a volume (:class:`~rtcontrast.dicom.volume.VolumeError`),
  a spooled file is missing, or derivation failed; the reason is the error message.  The
  received files stay in the spool.
* ``held``: QA exceeded a threshold and the protocol's ``qa.action`` is ``hold``: nothing
  is sent; the QA preview is written so an admin can decide (``node.py release``
  re-runs the job with ``hold_override``: sent, flagged as a QA warning).
* ``queued``: the derived instances are in the outbox for every destination; the node
  marks the job ``delivered`` once the outbox has delivered them all.

Streaming (issue #13): QA decides hold/warn/send before anything is rendered (a held
series sends nothing).  A short series, a fused job and a released one are inferred whole
first; a long one is judged on an evenly spaced sample of ``qa.sample_slices`` slices and
its other slices are inferred slab by slab as they stream (:mod:`rtcontrast.node.gate`;
QA over the whole series follows and stops the rest if it would have held).  The
outputs flow slab by slab, render -> derive -> outbox, and the sender is woken after
each slab, so the TPS receives the first instances while later slabs are computed
(:mod:`rtcontrast.node.stream`).  While streaming the job is ``deriving``; it becomes
``queued`` after its last slab, and only a ``queued`` job can become ``delivered``.  A job
that fails midway withdraws its undelivered instances and says how far it got.

Memory (issue #13): the whole series' maps (three float32 volumes, 630 MB for 512x512x200)
are not held in memory: inference writes them batch by batch to files in the job's folder
(``<var_dir>/jobs/<id>/maps``, :class:`~rtcontrast.core.maps.SlabFile`), QA, the windows
pass and the stream read them back by slabs, and the folder is removed when the job ends.

QA numbers (stored in ``job.qa`` and audited): ``self_nrmse`` (re-rendering the input
from the maps), the TE/TR identified from the image against the header (relative
error), map percentiles over the body, and the per-stage durations in seconds.

Logs carry the series UID and job id, never patient data.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from rtcontrast import __version__
from rtcontrast.core.consistency import Settings
from rtcontrast.core.inference import QMapModel
from rtcontrast.core.maps import QMaps, slab_allocator
from rtcontrast.dicom.derive import ModelIdentity, NodeIdentity, RecipeInfo
from rtcontrast.dicom.map_series import body_mask
from rtcontrast.dicom.grid import (
    Aligned,
    Candidate,
    align,
    field_strength_t,
    intensity_factors,
    choose_target,
    voxel_volume_mm3,
)
from rtcontrast.dicom.volume import Volume, VolumeError, assemble
from rtcontrast.node.dispatch.outbox import Outbox
from rtcontrast.node.store.jobs import JobRole, JobState, JobStore
from rtcontrast.settings.protocol import ProtocolConfig
from rtcontrast.dicom.eligibility import check_eligibility, header_te_tr
from rtcontrast.node.qa import (
    compute_qa,
    flag_datasets,
    non_finite_figures,
    qa_action,
    qa_violations,
    review_decision,
    uncertainty_violations,
)
from rtcontrast.node.gate import NonFiniteSlab, SeriesInference, judge_whole_series, non_finite_counts, sample_slices
from rtcontrast.node.stream import Streamed, middle_slices, series_windows, stream_outputs

__all__ = ["PipelineContext", "JobResult", "run_job", "node_identity", "model_identity", "STAGES"]

log = logging.getLogger(__name__)

#: Stages timed for every job (seconds in ``qa["timings_s"]``).
STAGES: tuple[str, ...] = ("assemble", "infer", "render", "derive", "enqueue")
#: Reason prefix of a job whose series is only an input to another series' fused job
#: (``fusion.target``); such a series still counts as a partner.
PARTNER_ONLY = "fusion input to"


@dataclass
class PipelineContext:
    """What a job needs: protocol, model, identities, and the durable stores.

    ``on_enqueued`` is called after instances were queued (the node wakes the sender).
    ``job_dir(job_id)`` names the job's folder for its QA preview (None: no preview).
    ``hold_override``: an admin released this job (``node.py release``), so a QA hold
    becomes a warning (the images are flagged, the job is sent).
    """

    protocol: ProtocolConfig
    model: QMapModel
    node: NodeIdentity
    jobs: JobStore
    outbox: Outbox
    on_enqueued: Callable[[], None] | None = None
    job_dir: Callable[[int], Path] | None = None
    hold_override: bool = False

    @property
    def model_identity(self) -> ModelIdentity:
        return model_identity(self.model)


@dataclass
class JobResult:
    """The outcome of :func:`run_job`."""

    job_id: int
    state: JobState
    reason: str | None = None
    qa: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    queued: dict[str, int] = field(default_factory=dict)  # destination -> instances


def model_identity(model: QMapModel) -> ModelIdentity:
    """The model as named in derived objects and in the job record."""
    return ModelIdentity(name=model.info.name, version=model.info.version, sha256=model.sha256)


def node_identity(
    *,
    ae_title: str,
    model: QMapModel,
    manufacturer: str = "rtcontrast",
    model_name: str = "rtcontrast node",
    station_name: str = "RTCONTRAST",
    device_serial_number: str = "RTC-0001",
    institution_name: str | None = None,
    uid_root: str | None = None,
) -> NodeIdentity:
    """General Equipment of derived objects; SoftwareVersions names rtcontrast and the model."""
    software = f"rtcontrast {__version__}; {model.info.name} {model.info.version}"
    return NodeIdentity(
        model_name=model_name,
        software_versions=software[:64],
        device_serial_number=device_serial_number,
        station_name=station_name,
        manufacturer=manufacturer,
        institution_name=institution_name,
        uid_root=uid_root,
        ae_title=ae_title,
    )


class _Stop(Exception):
    """End the job in ``state`` with ``reason`` (ineligible, failed, held); ``fields`` go to the job row."""

    def __init__(self, state: JobState, reason: str, **fields: Any) -> None:
        super().__init__(reason)
        self.state = JobState(state)
        self.reason = reason
        self.fields = fields


# ----------------------------------------------------------------------------- stages


class SeriesRefused(Exception):
    """A series cannot be used (as a job's input or as a fusion partner): the state its own job gets, and why."""

    def __init__(self, state: JobState, reason: str) -> None:
        super().__init__(reason)
        self.state = state
        self.reason = reason


@dataclass
class CheckedSeries:
    """A received series that passed every check a job needs: eligible, one volume, TE/TR in the model's range."""

    volume: Volume
    te: float
    tr: float


def load_checked_series(ctx: PipelineContext, members: list[Any], frame_of_reference: str | None = None) -> CheckedSeries:
    """Spooled files -> eligibility (with the calling AE) -> [same frame of reference] -> volume -> TE/TR in range.

    One loader for the job's own series and for its fusion partners, so a partner passes
    exactly the checks a job would.  Raises :class:`SeriesRefused` with the state and reason.
    """
    paths = [m.path for m in members]
    if not paths:
        raise SeriesRefused(JobState.FAILED, "the job has no instances")
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise SeriesRefused(JobState.FAILED, f"{len(missing)} spooled file(s) missing, e.g. {missing[0]}")
    header = _first_header(paths)
    calling_ae = next((m.calling_ae for m in members if m.calling_ae), None)
    ok, why = check_eligibility(header, ctx.protocol, calling_ae=calling_ae, own=ctx.node)
    if not ok:
        raise SeriesRefused(JobState.INELIGIBLE, why)
    if frame_of_reference is not None and str(header.get("FrameOfReferenceUID", "")) != frame_of_reference:
        raise SeriesRefused(JobState.INELIGIBLE, "different frame of reference")
    try:
        volume = assemble(paths)
    except VolumeError as exc:
        raise SeriesRefused(JobState.FAILED, f"volume: {exc}") from exc
    te, tr = _timing_from(volume, header)
    bad = check_range(ctx.model, te, tr)
    if bad:
        raise SeriesRefused(JobState.INELIGIBLE, bad)
    assert te is not None and tr is not None
    return CheckedSeries(volume, te, tr)


def _first_header(paths: list[Path]) -> Dataset:
    try:
        return pydicom.dcmread(paths[0], stop_before_pixels=True)
    except Exception as exc:  # the volume stage would fail the same way; say which file
        raise SeriesRefused(JobState.FAILED, f"{paths[0].name}: unreadable: {type(exc).__name__}: {exc}") from exc


def _timing_from(volume: Volume, header: Dataset) -> tuple[float | None, float | None]:
    te, tr = volume.te_ms, volume.tr_ms
    if te is None or tr is None:
        hte, htr = header_te_tr(header)
        te = te if te is not None else hte
        tr = tr if tr is not None else htr
    return te, tr


def check_range(model: QMapModel, te: float | None, tr: float | None) -> str | None:
    """Why (TE, TR) cannot go to this model, or None when inside its trained range."""
    if te is None:
        return "TE missing"
    if tr is None:
        return "TR missing"
    (te_lo, te_hi), (tr_lo, tr_hi) = model.info.te_range_ms, model.info.tr_range_ms
    problems = []
    if not te_lo <= te <= te_hi:
        problems.append(f"TE {te:g} ms outside the model's trained range {te_lo:g}-{te_hi:g} ms")
    if not tr_lo <= tr <= tr_hi:
        problems.append(f"TR {tr:g} ms outside the model's trained range {tr_lo:g}-{tr_hi:g} ms")
    if problems:
        return "; ".join(problems) + f" (model {model.info.name} {model.info.version})"
    return None


def _fusion_partners(ctx: PipelineContext, job_id: int, target: Volume) -> tuple[list[tuple[Aligned, float, float]], dict]:
    """Other series of the job's study and frame of reference, on the target's grid.

    A partner is the newest job of another series of the same study (so the series is
    complete), created within ``fusion.window_s`` of this job, eligible under the same
    match rules and inside the model's range, in the same frame of reference, and on the
    target's grid (or resampled onto it when the protocol allows).  At most
    ``max_inputs - 1`` partners are used, newest first.  Returns the partners and a QA
    record saying which series were used, resampled or skipped and why.
    """
    rules = ctx.protocol.fusion
    job = ctx.jobs.job(job_id)
    assert job is not None
    t_job = datetime.fromisoformat(job.created_at)
    used: list[tuple[Aligned, float, float]] = []
    record: dict[str, Any] = {"partners": [], "resampled": [], "skipped": {}}
    for other in reversed(ctx.jobs.latest_jobs_in_study(job.study_uid)):
        if other.series_uid == job.series_uid:
            continue
        uid = other.series_uid
        if len(used) >= ctx.model.info.max_inputs - 1:
            record["skipped"][uid] = f"model takes at most {ctx.model.info.max_inputs} inputs"
            continue
        if other.state == JobState.FAILED or (other.state == JobState.INELIGIBLE and other.role != JobRole.FUSION_INPUT):
            record["skipped"][uid] = f"its job is {other.state}"
            continue
        if abs((datetime.fromisoformat(other.created_at) - t_job).total_seconds()) > rules.window_s:
            record["skipped"][uid] = f"outside the fusion window of {rules.window_s:g} s"
            continue
        try:
            checked = load_checked_series(ctx, ctx.jobs.job_instances(other.id), target.frame_of_reference_uid)
        except SeriesRefused as refused:
            record["skipped"][uid] = refused.reason
            continue
        except OSError as exc:
            record["skipped"][uid] = f"unusable: {exc}"
            continue
        aligned, why = align(target, checked.volume, rules.allow_resample)
        if aligned is None:
            record["skipped"][uid] = why
            continue
        te, tr = checked.te, checked.tr
        used.append((aligned, te, tr))
        record["partners"].append(uid)
        if aligned.resampled:
            record["resampled"].append(uid)
    return used, record


def _target_uses(ctx: PipelineContext, study: str, target: str, series: str) -> bool:
    """Whether the target series' job has used, or will use, ``series`` as a partner.

    It will when it has not looked for partners yet (received/assembling: it finds this
    series then), and it has when its QA lists this series.  Otherwise (it ran before this
    series arrived, or failed / was held) this series must not defer to it: its data would
    reach the TPS in no derived series at all.  The node runs one job at a time, so the
    target's job is never half-way through while this one asks.
    """
    jobs = [j for j in ctx.jobs.latest_jobs_in_study(study) if j.series_uid == target]
    if not jobs:
        return False
    tj = jobs[-1]
    if tj.state in ("received", "assembling"):
        return True
    return tj.state in ("queued", "delivered") and series in ((tj.qa or {}).get("fusion") or {}).get("partners", [])


def _withdraw(ctx: PipelineContext, job_id: int, streamed: Streamed) -> str:
    """Withdraw a streaming job's undelivered instances (it stops midway); the words its reason ends with.

    No half series stays queued as if complete; what a destination may already hold is in
    docs/admin.md.  Empty when nothing was queued yet.
    """
    if not streamed.queued:
        return ""
    withdrawn = ctx.outbox.withdraw_pending(job_id)
    ctx.jobs.audit(job_id, "withdrawn", {"queued": dict(streamed.queued), "withdrawn": withdrawn})
    return (f" (after {sum(streamed.queued.values())} instance(s) were queued in {streamed.slabs} slab(s); "
            f"{withdrawn} not yet delivered were withdrawn: a destination may hold an incomplete series)")


def _map_folder(ctx: PipelineContext, job_id: int) -> Path:
    """Where a job's maps are kept while it runs (#13 memory: not in RAM); removed when the job ends.

    The job's folder when the node has one (``<var_dir>/jobs/<id>/maps``), else a
    temporary folder.  Plain files, read back slab by slab (:class:`~rtcontrast.core.maps.SlabFile`).
    """
    if ctx.job_dir is not None:
        folder = ctx.job_dir(job_id) / "maps"
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    return Path(tempfile.mkdtemp(prefix=f"rtc-job{job_id}-maps-"))


def _write_preview(
    ctx: PipelineContext, job_id: int, series: str, volume: Volume, maps: QMaps,
    rendered: dict[str, np.ndarray], qa: dict[str, Any],
) -> None:
    """The QA montage in the job folder; a failure is logged, never fails the job."""
    if ctx.job_dir is None:
        return
    from rtcontrast.node.preview import PREVIEW_NAME, write_preview

    try:
        labels = {r.key: r.label for r in ctx.protocol.recipes}
        path = write_preview(
            ctx.job_dir(job_id) / PREVIEW_NAME,
            volume.pixels,
            {"PD (rel.)": _middle(maps.pd, np.float32(maps.scale)), "T1 [ms]": _middle(maps.t1),
             "T2 [ms]": _middle(maps.t2)},
            {labels.get(k, k): u16 for k, u16 in rendered.items()},
            f"job {job_id} series {series}",
            qa,
        )
        qa["preview"] = str(path)
    except Exception as exc:  # a missing font or a full disk must not stop the series
        log.warning("job %d series %s: QA preview not written: %s: %s", job_id, series, type(exc).__name__, exc)


def _middle(a: Any, divide_by: np.float32 | None = None) -> np.ndarray:
    """The middle slice of a map (all the preview shows), as a zero-stride view shaped like the volume."""
    z = a.shape[0] // 2
    mid = np.asarray(a[z:z + 1])
    return np.broadcast_to(mid if divide_by is None else mid / divide_by, a.shape)


def run_job(ctx: PipelineContext, job_id: int) -> JobResult:
    """Run one job through every stage and leave it in its final pipeline state.

    Never raises for a bad series (the job ends ``ineligible``/``failed``/``held`` with a
    reason); an unexpected exception (a bug, a full disk in the outbox) propagates after
    the job was marked ``failed`` with the error, so the caller can log the traceback.
    """
    jobs, protocol, model = ctx.jobs, ctx.protocol, ctx.model
    job = jobs.job(job_id)
    if job is None:
        raise KeyError(f"no job {job_id}")
    series = job.series_uid
    mid = ctx.model_identity
    timings: dict[str, float] = {}
    qa: dict[str, Any] = {}
    result = JobResult(job_id=job_id, state=JobState.FAILED, qa=qa, timings_s=timings)
    streamed = Streamed()
    spill: Path | None = None  # the folder of the job's maps (removed at the end)
    ident = dict(
        protocol_version=protocol.audit_version,
        model_name=mid.name,
        model_version=mid.version,
        model_sha256=mid.sha256,
    )

    def finish(state: JobState, reason: str | None, **fields: Any) -> JobResult:
        if timings:
            qa["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
        fields.setdefault("role", JobRole.TARGET)
        fields.setdefault("fusion_target", None)
        fields.setdefault("retry_at", None)
        jobs.set_state(job_id, state, reason, qa=qa or None, **fields)
        result.state, result.reason = state, reason
        return result

    try:
        # -- assemble (incl. eligibility on the first header: cheap, before decoding pixels)
        t0 = t_job = time.perf_counter()
        jobs.set_state(job_id, JobState.ASSEMBLING, None, **ident)
        try:
            checked = load_checked_series(ctx, jobs.job_instances(job_id))
        except SeriesRefused as refused:
            raise _Stop(refused.state, refused.reason) from refused
        volume, te, tr = checked.volume, checked.te, checked.tr
        qa["slices"] = int(volume.pixels.shape[0])
        qa["matrix"] = [int(volume.pixels.shape[1]), int(volume.pixels.shape[2])]
        timings["assemble"] = time.perf_counter() - t0

        # -- infer + QA
        t0 = time.perf_counter()
        jobs.set_state(job_id, JobState.INFERRING)
        spill = _map_folder(ctx, job_id)
        co_sources: list[Volume] = []
        runner: SeriesInference | None = None  # set when QA judges a sample and the rest is inferred while streaming
        if protocol.fusion.enabled and model.info.fusion:
            partners, qa["fusion"] = _fusion_partners(ctx, job_id, volume)
            target = choose_target(
                [Candidate(series, te, tr, voxel_volume_mm3(volume))]
                + [Candidate(a.volume.series_uid, pte, ptr, voxel_volume_mm3(a.volume)) for a, pte, ptr in partners],
                protocol.fusion.target) if partners else None
            if target is not None and target != series:
                qa["fusion"]["target"] = target
                if _target_uses(ctx, job.study_uid, target, series):
                    raise _Stop(JobState.INELIGIBLE, f"{PARTNER_ONLY} series {target} (fusion.target: "
                                              f"{protocol.fusion.target}); no derived series of its own",
                                role=JobRole.FUSION_INPUT, fusion_target=target)
                qa["fusion"]["note"] = (f"target series {target} was processed without this series: "
                                        "derived series of its own instead")
            co_sources = [a.volume for a, _, _ in partners]
            maps = model.predict_multi([(volume.pixels, te, tr)] + [(a.pixels, pte, ptr) for a, pte, ptr in partners],
                                       consistency=(Settings(shared_scale=protocol.fusion.shared_scale)
                                                    if protocol.fusion.consistency else None),
                                       valid=[None] + [a.valid for a, _, _ in partners],
                                       field_t=field_strength_t(volume),
                                       known_gains=intensity_factors([volume] + [a.volume for a, _, _ in partners]),
                                       out=slab_allocator(spill))
            if maps.input_gains is not None:
                qa["fusion"]["input_gains"] = [round(g, 4) for g in maps.input_gains]
                qa["fusion"].update(maps.fusion or {})  # gains' source, misfit per input, bounds: fusion QA
            if partners:
                log.info("job %d series %s fused with %s", job_id, series, ", ".join(qa["fusion"]["partners"]))
        else:
            if protocol.fusion.enabled:
                qa["fusion"] = {"partners": [], "note": f"model contract {model.info.contract}: single input"}
            # a release re-runs a held job: judged whole, so the flag it carries follows the whole series' QA
            sample = None if ctx.hold_override else sample_slices(volume.pixels.shape[0], protocol.qa.sample_slices)
            if sample is None:
                maps = model.predict(volume.pixels, te, tr, field_t=field_strength_t(volume), out=slab_allocator(spill))
            else:  # a long series: QA on a sample, the rest inferred while it streams (rtcontrast/node/gate.py)
                runner = SeriesInference(model, volume.pixels, te, tr, field_strength_t(volume), slab_allocator(spill))
                judged, maps = runner.infer(sample), runner.maps
                qa["gate"] = {"sample_slices": int(sample.size), "series_slices": int(volume.pixels.shape[0])}
        qa.update(compute_qa(maps, volume.pixels, te, tr) if runner is None
                  else compute_qa(judged, volume.pixels[sample], te, tr))
        if "uncertainty" in qa and model.info.qa_limits:  # the model's calibrated limits (metadata), for QA
            qa["uncertainty_limits"] = dict(model.info.qa_limits)
        violations = qa_violations(qa, protocol)
        qa["violations"] = violations
        qa["action"] = qa_action(violations, uncertainty_violations(qa, protocol), protocol)
        broken = non_finite_figures(qa) + non_finite_counts(maps if runner is None else judged)
        if broken:  # never sent, whatever qa.action says: the images would be blank or wrong
            qa["action"] = "failed"
            raise _Stop(JobState.FAILED, "non-finite data: " + "; ".join(broken))
        timings["infer"] = time.perf_counter() - t0
        hold = qa["action"] == "hold"
        if hold and ctx.hold_override:
            qa["action"] = "released"
            jobs.audit(job_id, "hold_overridden", {"violations": violations})

        # -- after the QA decision: windows over the whole series, preview, then (unless held) stream
        # render -> derive -> outbox -> TPS slab by slab (rtcontrast/node/stream.py)
        jobs.set_state(job_id, JobState.RENDERING)
        infos = [(RecipeInfo(key=r.key, te_ms=r.te_ms, tr_ms=r.tr_ms, series_number=r.series_number,
                             series_description=r.series_description), list(r.destinations))
                 for r in protocol.recipes]
        _write_preview(ctx, job_id, series, volume, maps, middle_slices(maps, [i for i, _ in infos]), qa)
        if hold and not ctx.hold_override:
            raise _Stop(JobState.HELD, "QA hold: " + "; ".join(violations))
        t0 = time.perf_counter()
        mask = body_mask(volume.pixels, maps.scale) if (protocol.maps.classic or protocol.maps.parametric) else None
        if runner is None:
            windows, map_windows = series_windows(maps, [i for i, _ in infos], protocol.maps.classic, mask)
        else:  # the sample's window: the rest of the series is not inferred yet
            windows, map_windows = series_windows(judged, [i for i, _ in infos], protocol.maps.classic,
                                                  None if mask is None else mask[sample])
            del judged  # the sample's maps (also in the map files): ~100 MB at 512x512, not kept while streaming
        timings["render"] = time.perf_counter() - t0

        jobs.set_state(job_id, JobState.DERIVING)
        flag = None  # the QA warning, written on every slab before it is queued
        if violations and (qa["action"] == "warn" or (hold and ctx.hold_override)):
            flag = functools.partial(flag_datasets, warning="; ".join(violations),
                                     review=review_decision(jobs, job_id) if hold and ctx.hold_override else None)
        try:
            stream_outputs(ctx, job_id, volume, maps, infos, windows, map_windows, mask, co_sources=co_sources,
                           qa_note="QA passed" if not violations else None,  # warn: flag_datasets writes it
                           flag=flag, done=streamed, source=None if runner is None else runner.slab)
        except NonFiniteSlab as exc:
            qa["action"] = "failed"
            raise _Stop(JobState.FAILED, f"{exc}{_withdraw(ctx, job_id, streamed)}") from exc
        for k, v in streamed.timings_s.items():
            timings[k] = timings.get(k, 0.0) + v
        if runner is not None:  # every slice is inferred now: QA over the whole series, recorded beside the sample's
            t0 = time.perf_counter()
            whole = qa["whole_series"] = judge_whole_series(qa, maps, volume.pixels, te, tr, protocol)
            timings["infer"] += time.perf_counter() - t0
            if whole["action"] in ("hold", "failed") and qa["action"] not in ("hold", "released"):
                state = JobState.HELD if whole["action"] == "hold" else JobState.FAILED
                raise _Stop(state, f"QA {whole['action']} on the whole series (judged first on "
                                   f"{qa['gate']['sample_slices']} of {qa['gate']['series_slices']} slices, which "
                                   f"passed): " + "; ".join(whole["violations"]) + _withdraw(ctx, job_id, streamed))
        result.queued = dict(streamed.queued)
        qa["slabs"] = streamed.slabs
        if streamed.first_queued_at is not None:  # job start -> first slab in the outbox
            qa["first_queued_s"] = round(streamed.first_queued_at - t_job, 3)
        qa["queued"] = dict(result.queued)
        if violations:
            log.warning("job %d series %s: QA %s: %s", job_id, series, protocol.qa.action, "; ".join(violations))
        notes = ["QA warning: " + "; ".join(violations)] if violations else []
        late = [] if violations else list((qa.get("whole_series") or {}).get("violations", []))
        if late:  # sent as "QA passed" on the sample's figures; the whole series' say otherwise (not a hold)
            log.warning("job %d series %s: QA over the whole series, after sending: %s", job_id, series, "; ".join(late))
            notes.append("QA warning on the whole series, after it was sent as passed on a sample: " + "; ".join(late))
        finish(JobState.QUEUED, " | ".join(notes) or None)
    except _Stop as stop:
        level = logging.INFO if stop.state == JobState.INELIGIBLE else logging.WARNING
        log.log(level, "job %d series %s %s: %s", job_id, series, stop.state, stop.reason)
        jobs.audit(job_id, stop.state, {"reason": stop.reason})
        finish(stop.state, stop.reason, **stop.fields)
    except Exception as exc:
        reason = f"unexpected error: {type(exc).__name__}: {exc}"
        finish(JobState.FAILED, reason + _withdraw(ctx, job_id, streamed))
        raise
    finally:
        if spill is not None:
            shutil.rmtree(spill, ignore_errors=True)
            if ctx.job_dir is not None:  # the job folder made only for the maps does not stay behind
                with contextlib.suppress(OSError):
                    spill.parent.rmdir()
        if timings:
            log.info(
                "job %d series %s timings: %s",
                job_id, series, " ".join(f"{k}={timings[k]:.3f}s" for k in STAGES if k in timings),
            )
    if "self_nrmse" in qa:  # inference ran: QA numbers go to the audit (queued or held)
        jobs.audit(job_id, "qa", dict(qa))
    if result.state == JobState.QUEUED:
        log.info(
            "job %d series %s queued: %s (self NRMSE %.3f)",
            job_id, series, ", ".join(f"{n} to {d}" for d, n in result.queued.items()), qa.get("self_nrmse", 0.0),
        )
    return result
