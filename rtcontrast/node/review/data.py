"""What the review page shows, read from the node's database and files (read-only).

Why a module apart from the web code: the same rows feed the list and the detail page,
and they are testable without HTTP.  The database is opened per request (SQLite WAL:
readers never block the node).  Patient name, ID and series description come from the
header of the job's first received file: the page shows what a physicist needs to know
whose images these are, but nothing of it is logged or stored elsewhere.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from rtcontrast.node.dispatch.outbox import Outbox  # noqa: F401  (registers the outbox schema)
from rtcontrast.node.ops.audit import JobTrail, audit_trail
from rtcontrast.node.ops.holds import held_jobs
from rtcontrast.node.qa import ms, percent
from rtcontrast.node.store import db
from rtcontrast.node.store.jobs import Job, JobStore
from rtcontrast.settings.node import NodeConfig

__all__ = ["JobPage", "JobRow", "job_page", "list_jobs", "preview_path"]

_HEADER_TAGS = ["PatientName", "PatientID", "StudyDate", "SeriesDescription", "SeriesNumber", "Modality",
                "EchoTime", "RepetitionTime"]


@dataclass
class JobRow:
    """One line of the list."""

    id: int
    state: str
    label: str  # state as a reviewer reads it: "held", "discarded", "released, delivered", ...
    reason: str | None
    created_at: str
    updated_at: str
    series_uid: str
    verdict: str
    violations: list[str]
    patient: dict[str, str]


@dataclass
class JobPage:
    """Everything the detail page shows of one job."""

    row: JobRow
    trail: JobTrail
    figures: list[tuple[str, str]]
    maps: list[tuple[str, str, str, str]]
    decision: dict[str, Any] | None
    has_preview: bool
    files_present: int
    events: list[dict[str, Any]] = field(default_factory=list)


def preview_path(config: NodeConfig, job_id: int) -> Path:
    """The job's QA montage (written by the pipeline, removed by discard and retention)."""
    return config.var_dir / "jobs" / str(int(job_id)) / "preview.png"


def _header(store: JobStore, job_id: int) -> tuple[dict[str, str], int]:
    """(patient/series fields of the first readable received file, how many files are still there)."""
    paths = [m.path for m in store.job_instances(job_id)]
    present = [p for p in paths if p.is_file()]
    for p in present[:3]:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except (InvalidDicomError, OSError, ValueError):
            continue
        return {k: str(ds.get(k, "") or "") for k in _HEADER_TAGS}, len(present)
    return {}, len(present)


def _decision(store: JobStore, job_id: int) -> dict[str, Any] | None:
    """The latest reviewer decision (released / discarded) after the latest hold."""
    last = None
    for e in store.audit_events(job_id):
        if e.event == "held":
            last = None
        elif e.event in ("released", "discarded"):
            last = {"event": e.event, "ts": e.ts, **(e.detail or {})}
    return last


def _verdict(qa: dict[str, Any] | None) -> tuple[str, list[str]]:
    if not qa or "self_nrmse" not in qa:
        return "no QA (not processed)", []
    violations = list(qa.get("violations") or [])
    action = qa.get("action", "none")
    whole = qa.get("whole_series") or {}  # judged on a sample first (rtcontrast/node/gate.py); then the whole series
    if not violations and whole.get("violations"):
        late = [f"whole series: {v}" for v in whole["violations"]]
        return {"hold": "failed on the whole series after a passed sample: held, part may have been sent",
                "failed": "failed on the whole series after a passed sample: stopped, part may have been sent",
                }.get(whole.get("action", ""), "failed on the whole series after a passed sample: sent"), late
    if not violations:
        return "passed", []
    return {"hold": "failed: held", "warn": "failed: sent with warning", "released": "failed: released after review",
            "send": "failed: sent"}.get(action, f"failed ({action})"), violations


def _label(job: Job, decision: dict[str, Any] | None) -> str:
    if decision is None:
        return job.state
    if decision["event"] == "discarded":
        return "discarded"
    return "released" if job.state == "received" else f"released, {job.state}"


def _row(conn: sqlite3.Connection, store: JobStore, job: Job) -> JobRow:
    decision = _decision(store, job.id)
    verdict, violations = _verdict(job.qa)
    patient, _ = _header(store, job.id)
    return JobRow(id=job.id, state=job.state, label=_label(job, decision), reason=job.reason,
                  created_at=job.created_at, updated_at=job.updated_at, series_uid=job.series_uid,
                  verdict=verdict, violations=violations, patient=patient)


def list_jobs(config: NodeConfig) -> tuple[list[JobRow], list[JobRow]]:
    """(every held job, oldest first; the most recent other jobs, newest first)."""
    conn = db.connect(config.db_file)
    try:
        store = JobStore(conn)
        held = [j for j in (store.job(i) for i in held_jobs(store)) if j is not None]
        held_ids = {j.id for j in held}
        recent = [j for j in store.recent_jobs(config.review.recent_jobs) if j.id not in held_ids]
        return [_row(conn, store, j) for j in held], [_row(conn, store, j) for j in recent]
    finally:
        conn.close()


def _figures(qa: dict[str, Any]) -> tuple[list[tuple[str, str]], list[tuple[str, str, str, str]]]:
    """QA numbers as (name, value) rows and map percentiles; whatever the job's QA holds (older jobs hold less)."""
    figs: list[tuple[str, str]] = []
    if "self_nrmse" in qa:
        figs.append(("self NRMSE (maps re-rendering the input)", f"{percent(qa['self_nrmse'])} %"))
    for what in ("te", "tr"):
        keys = (f"{what}_header_ms", f"{what}_pred_ms", f"{what}_error_frac")
        if all(k in qa for k in keys):
            figs.append((f"{what.upper()}: header / identified from the image",
                         f"{qa[keys[0]]:g} ms / {ms(qa[keys[1]])} ms ({percent(qa[keys[2]])} % off)"))
    if "slices" in qa:
        figs.append(("slices, matrix", f"{qa['slices']}, {' x '.join(str(m) for m in qa.get('matrix', []))}"))
    gate = qa.get("gate") or {}
    if gate:
        figs.append(("QA decided on", f"{gate.get('sample_slices')} of {gate.get('series_slices')} slices "
                                      "(evenly spaced; the figures here are theirs), then the whole series: "
                                      + ("; ".join((qa.get("whole_series") or {}).get("violations") or []) or "passed")))
    unc, limits = qa.get("uncertainty") or {}, qa.get("uncertainty_limits") or {}
    for key, name in (("t1_rel_sd", "T1"), ("t2_rel_sd", "T2"), ("pd_rel_sd", "PD")):
        if key in unc:
            limit = f"; model's limit ±{percent(limits[key])} %" if key in limits else ""
            figs.append((f"model uncertainty {name} (median relative sd over the body)",
                         f"±{percent(unc[key])} %{limit}"))
    if "body_voxels" in qa:
        figs.append(("body voxels", str(qa["body_voxels"])))
    maps = []
    for key, name, unit in (("t1_ms", "T1", "ms"), ("t2_ms", "T2", "ms"), ("pd", "PD", "of series scale")):
        p = qa.get(key) or {}
        if p:
            maps.append((f"{name} ({unit})", *(f"{p.get(k, 0):.4g}" for k in ("p5", "p50", "p95"))))
    return figs, maps


def job_page(config: NodeConfig, job_id: int) -> JobPage | None:
    """The detail of one job, or None when there is no such job."""
    trails = audit_trail(config.db_file, job_id=job_id, limit=1)
    if not trails:
        return None
    conn = db.connect(config.db_file)
    try:
        store = JobStore(conn)
        job = store.job(job_id)
        assert job is not None
        row = _row(conn, store, job)
        _, present = _header(store, job_id)
        decision = _decision(store, job_id)
    finally:
        conn.close()
    figs, maps = _figures(job.qa or {})
    return JobPage(row=row, trail=trails[0], figures=figs, maps=maps, decision=decision,
                   has_preview=preview_path(config, job_id).is_file(), files_present=present,
                   events=trails[0].events)
