"""``node.py audit``: what came from where, what was made from it, where it went, with which status.

Why a report over the existing tables rather than a new one: the truth is already
recorded as it happens - ``instances`` (each received instance: calling AE, peer
address, time), ``jobs`` (state, reason, protocol version, model identity, QA),
``outbox_items`` (each derived instance per destination: state, attempts, last status
and error, delivery time) and the append-only ``audit`` log.  This module joins them
per job.  None of these tables holds patient names, IDs or birth dates, so neither does
the report: studies and series are named by UID.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rtcontrast.node.dispatch.outbox import Outbox  # noqa: F401  (registers the outbox schema)
from rtcontrast.node.store import db
from rtcontrast.node.store.jobs import JobStore

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


def _source(conn: sqlite3.Connection, job_id: int) -> dict[str, Any]:
    rows = conn.execute(
        """SELECT i.calling_ae, i.peer, i.received_at, i.sop_class_uid FROM job_instances ji
           JOIN instances i USING (sop_instance_uid) WHERE ji.job_id=?""",
        (job_id,),
    ).fetchall()
    received = sorted(r["received_at"] for r in rows)
    return {
        "instances": len(rows),
        "calling_aes": sorted({r["calling_ae"] for r in rows if r["calling_ae"]}),
        "peers": sorted({_host(r["peer"]) for r in rows if r["peer"]}),
        "sop_classes": sorted({r["sop_class_uid"] for r in rows}),
        "first_received": received[0] if received else None,
        "last_received": received[-1] if received else None,
    }


def _outputs(conn: sqlite3.Connection, job_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        """SELECT destination, series_instance_uid, state, COUNT(*) AS n, MAX(attempts) AS attempts,
                  MAX(delivered_at) AS delivered_at, MAX(updated_at) AS updated_at
           FROM outbox_items WHERE job_id=? GROUP BY destination, series_instance_uid, state
           ORDER BY destination, series_instance_uid, state""",
        (str(job_id),),
    ).fetchall()
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        key = (r["destination"], r["series_instance_uid"])
        o = out.setdefault(key, {"destination": key[0], "series_uid": key[1], "states": {}, "max_attempts": 0,
                                 "last_delivered": None, "last_error": None, "last_status": None})
        o["states"][r["state"]] = int(r["n"])
        o["max_attempts"] = max(o["max_attempts"], int(r["attempts"] or 0))
        if r["delivered_at"] is not None:
            o["last_delivered"] = max(o["last_delivered"] or "", _ts(r["delivered_at"]) or "")
    for (dest, series), o in out.items():
        err = conn.execute(
            """SELECT last_error, last_status FROM outbox_items WHERE job_id=? AND destination=?
               AND series_instance_uid=? AND last_error IS NOT NULL ORDER BY updated_at DESC LIMIT 1""",
            (str(job_id), dest, series),
        ).fetchone()
        if err is not None:
            o["last_error"] = err["last_error"]
            o["last_status"] = None if err["last_status"] is None else f"0x{int(err['last_status']):04X}"
    return list(out.values())


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
        where, args = [], []
        for col, val in (("id", job_id), ("study_uid", study_uid), ("series_uid", series_uid)):
            if val is not None:
                where.append(f"{col}=?")
                args.append(val)
        sql = "SELECT id FROM jobs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?"
        ids = [int(r[0]) for r in conn.execute(sql, (*args, limit))]
        trails = []
        for jid in sorted(ids):
            job = store.job(jid)
            assert job is not None
            model = f"{job.model_name} {job.model_version} sha256 {job.model_sha256[:12]}" if job.model_name and job.model_sha256 else None
            trails.append(JobTrail(
                job_id=job.id, study_uid=job.study_uid, series_uid=job.series_uid, state=job.state,
                reason=job.reason, created_at=job.created_at, updated_at=job.updated_at,
                protocol_version=job.protocol_version, model=model, qa=job.qa,
                source=_source(conn, jid), outputs=_outputs(conn, jid),
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
