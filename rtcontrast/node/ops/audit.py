"""``node.py audit``: what came from where, what was made from it, where it went, with which status.

Why a report over the existing records rather than a new one: the truth is already
recorded as it happens - received instances (calling AE, peer address, time), jobs
(state, reason, protocol version, model identity, QA), the outbox (each derived instance
per destination: state, attempts, last status and error), the append-only delivery log
(survives retention) and the append-only audit log.  This module reads them through the
job store's and the outbox's read models and joins them per job.  None of these tables holds patient names, IDs or birth dates, so neither does
the report: studies and series are named by UID.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rtcontrast.node.dispatch.outbox import Outbox
from rtcontrast.node.store import db
from rtcontrast.node.store.jobs import InstanceRecord, JobStore

__all__ = ["JobTrail", "audit_trail", "render_trails"]


@dataclass
class JobTrail:
    """One job's story: source, processing, outputs, events."""

    job_id: int
    study_uid: str
    series_uid: str
    state: str
    reason: str | None
    created_at: str
    updated_at: str
    protocol_version: str | None
    model: str | None
    qa: dict[str, Any] | None
    source: dict[str, Any]
    outputs: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _ts(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")


def _host(peer: str) -> str:
    """``10.1.2.3:40312`` -> ``10.1.2.3``: the sender's ephemeral port says nothing."""
    host, sep, port = peer.rpartition(":")
    return host.strip("[]") if sep and port.isdigit() and host else peer


def _source(members: list[InstanceRecord]) -> dict[str, Any]:
    received = sorted(m.received_at for m in members)
    return {
        "instances": len(members),
        "calling_aes": sorted({m.calling_ae for m in members if m.calling_ae}),
        "peers": sorted({_host(m.peer) for m in members if m.peer}),
        "sop_classes": sorted({m.sop_class_uid for m in members}),
        "first_received": received[0] if received else None,
        "last_received": received[-1] if received else None,
    }


def _outputs(outbox: Outbox, job_id: int) -> list[dict[str, Any]]:
    out = []
    for o in outbox.job_outputs(job_id):
        status = o["last_status"]
        out.append({
            "destination": o["destination"], "series_uid": o["series_uid"], "states": o["states"],
            "max_attempts": o["max_attempts"], "last_delivered": _ts(o["delivered_at"]),  # type: ignore[arg-type]
            "last_error": o["last_error"],
            "last_status": None if status is None else f"0x{int(status):04X}",  # type: ignore[call-overload]
        })
    return out


def audit_trail(
    db_file: Path,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    job_id: int | None = None,
    limit: int = 20,
) -> list[JobTrail]:
    """The trails of the selected jobs (all filters combine; none: the ``limit`` most recent)."""
    conn = db.connect(db_file)
    try:
        store = JobStore(conn)
        outbox = Outbox(conn, None)  # a reader
        trails = []
        for job in store.find_jobs(job_id=job_id, study_uid=study_uid, series_uid=series_uid, limit=limit):
            jid = job.id
            model = f"{job.model_name} {job.model_version} sha256 {job.model_sha256[:12]}" if job.model_name and job.model_sha256 else None
            trails.append(JobTrail(
                job_id=job.id, study_uid=job.study_uid, series_uid=job.series_uid, state=str(job.state),
                reason=job.reason, created_at=job.created_at, updated_at=job.updated_at,
                protocol_version=job.protocol_version, model=model, qa=job.qa,
                source=_source(store.job_instances(jid)), outputs=_outputs(outbox, jid),
                events=[{"ts": e.ts, "event": e.event, "detail": e.detail} for e in store.audit_events(jid)],
            ))
        return trails
    finally:
        conn.close()


def _detail(d: dict[str, Any] | None) -> str:
    if not d:
        return ""
    if "from" in d and "to" in d:
        rest = {k: v for k, v in d.items() if k not in ("from", "to")}
        return f"{d['from']} -> {d['to']}" + (f" {json.dumps(rest, sort_keys=True)}" if rest else "")
    text = json.dumps(d, sort_keys=True)
    return text if len(text) <= 160 else text[:157] + "..."


def render_trails(trails: list[JobTrail], events: bool = True) -> str:
    """Human-readable report, one block per job."""
    if not trails:
        return "no matching job"
    out: list[str] = []
    for t in trails:
        s = t.source
        out.append(f"job {t.job_id}: {t.state}" + (f" - {t.reason}" if t.reason else ""))
        out.append(f"  study  {t.study_uid}")
        out.append(f"  series {t.series_uid}")
        out.append(
            f"  from   {', '.join(s['calling_aes']) or '?'} at {', '.join(s['peers']) or '?'}: {s['instances']} "
            f"instance(s) received {(s['first_received'] or '?')[:19]} .. {(s['last_received'] or '?')[:19]}"
        )
        out.append(f"  made   with protocol {t.protocol_version or '-'}, model {t.model or '-'}")
        if t.qa and "self_nrmse" in t.qa:
            viol = "; ".join(t.qa.get("violations") or []) or "none"
            out.append(f"  QA     self NRMSE {t.qa['self_nrmse']:.3f}, action {t.qa.get('action')}, violations: {viol}")
        if t.qa and t.qa.get("preview"):
            out.append(f"  preview {t.qa['preview']}")
        if not t.outputs:
            out.append("  to     (nothing queued)")
        for o in t.outputs:
            states = ", ".join(f"{k} {v}" for k, v in sorted(o["states"].items()))
            line = f"  to     {o['destination']}: series {o['series_uid']}: {states}"
            if o["last_delivered"]:
                line += f" (last delivered {o['last_delivered']})"
            if o["last_error"] and set(o["states"]) != {"delivered"}:
                line += f"; last error {o['last_status'] or ''} {o['last_error']}".rstrip()
            out.append(line)
        if events:
            for e in t.events:
                out.append(f"    {e['ts'][:19]} {e['event']:<16} {_detail(e['detail'])}")
    return "\n".join(out)
