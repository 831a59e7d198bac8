"""SQLite job store: received instances, one job per completed series, append-only audit.

Why it looks like this:

* Every instance the SCP acknowledged is a row in ``instances`` *before* the Success
  response goes out (``record_instance`` is the SCP's ``on_stored``).  ``job_id IS NULL``
  means "received, not yet part of a job", so after a crash
  :meth:`JobStore.series_with_unconsumed_instances` names every series that still has to
  become a job, and :meth:`JobStore.unfinished_jobs` every job that has to be resumed.
  Nothing acknowledged is forgotten.
* A re-sent instance (same SOP Instance UID, same series) overwrites its spool file and
  becomes unconsumed again, so the series is processed again with it (the output UIDs
  are deterministic, so the TPS sees a replacement, not a duplicate).  The same UID in
  another series is refused (:class:`DuplicateInstance`), never silently moved.
* States are :class:`JobState` (a StrEnum); a job's role (its own derived series, or
  only a fusion input), its hold override and its transient-retry backoff are columns.
  The tables are created and migrated by :mod:`rtcontrast.node.store.schema`.
* A job's membership is a snapshot in ``job_instances`` taken when the job is created:
  all instances of the series known at that moment, so a job made for late or re-sent
  instances still covers the whole series.  Later arrivals never change a running job.
* ``audit`` is append-only (triggers refuse UPDATE/DELETE) for "what happened to this
  series" questions; it stores UIDs and states, never patient identifiers.

One :class:`JobStore` may be shared by the SCP's threads and the pipeline: every method
takes an internal lock around the shared connection.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from enum import StrEnum
from collections.abc import Sequence
from typing import Any, Protocol

from rtcontrast.node.store.db import transaction
from rtcontrast.node.store.group import GroupCommit
from rtcontrast.node.store.schema import ensure_schema

__all__ = [
    "JobStore",
    "Job",
    "InstanceRecord",
    "AuditEvent",
    "JOB_STATES",
    "TERMINAL_STATES",
    "RERUN_STATES",
    "JobState",
    "JobRole",
    "DuplicateInstance",
]

class JobState(StrEnum):
    """Where a job is.  A StrEnum, so rows, JSON and logs keep the plain words."""

    RECEIVED = "received"
    ASSEMBLING = "assembling"
    INFERRING = "inferring"
    RENDERING = "rendering"
    DERIVING = "deriving"
    QUEUED = "queued"
    DELIVERED = "delivered"
    FAILED = "failed"
    INELIGIBLE = "ineligible"
    HELD = "held"


class JobRole(StrEnum):
    """What a job's series is for: its own derived series, or only an input to another's (fusion)."""

    TARGET = "target"
    FUSION_INPUT = "fusion_input"


JOB_STATES: tuple[str, ...] = tuple(s.value for s in JobState)
# States a restarted node does not resume on its own ("held" waits for an admin).
TERMINAL_STATES: frozenset[JobState] = frozenset(
    {JobState.DELIVERED, JobState.FAILED, JobState.INELIGIBLE, JobState.HELD}
)
#: States that are re-run from assembly after a restart (the job was in the worker).
RERUN_STATES: frozenset[JobState] = frozenset(
    {JobState.RECEIVED, JobState.ASSEMBLING, JobState.INFERRING, JobState.RENDERING, JobState.DERIVING}
)


class DuplicateInstance(Exception):
    """A SOP Instance UID that is already recorded in another series (never silently replaced).

    ``dicom_status`` is what the SCP answers: 0x0111 Duplicate SOP Instance (PS3.7 C.4.2.1.4).
    """

    dicom_status = 0x0111

    def __init__(self, sop_instance_uid: str, series_uid: str, new_series_uid: str) -> None:
        super().__init__(
            f"SOP Instance UID {sop_instance_uid} is already recorded in series {series_uid}; "
            f"refused for series {new_series_uid} (one UID names one instance)"
        )
        self.sop_instance_uid = sop_instance_uid
        self.series_uid = series_uid
        self.new_series_uid = new_series_uid


_SETTABLE_FIELDS = frozenset(
    {"protocol_version", "model_name", "model_version", "model_sha256", "instance_count", "qa",
     "role", "fusion_target", "hold_override", "retry_count", "retry_at"}
)


class _StoredInstanceLike(Protocol):
    path: Path
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    calling_ae: str
    peer_address: str
    received_at: datetime


@dataclass(frozen=True)
class Job:
    """One series' trip through the pipeline."""

    id: int
    study_uid: str
    series_uid: str
    state: JobState
    reason: str | None
    protocol_version: str | None
    model_name: str | None
    model_version: str | None
    model_sha256: str | None
    created_at: str
    updated_at: str
    instance_count: int
    qa: dict[str, Any] | None
    role: JobRole = JobRole.TARGET
    fusion_target: str | None = None
    hold_override: bool = False
    retry_count: int = 0
    retry_at: str | None = None

    @property
    def finished(self) -> bool:
        """True when a restarted node should not resume this job."""
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class InstanceRecord:
    """A received instance as recorded (``job_id`` None = not yet in a job)."""

    sop_instance_uid: str
    study_uid: str
    series_uid: str
    path: Path
    sop_class_uid: str
    calling_ae: str | None
    peer: str | None
    received_at: str
    job_id: int | None


@dataclass(frozen=True)
class AuditEvent:
    """One append-only audit row."""

    id: int
    ts: str
    job_id: int | None
    study_uid: str | None
    series_uid: str | None
    event: str
    detail: dict[str, Any] | None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _iso(value: datetime | str) -> str:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc).isoformat(timespec="microseconds")
    return str(value)


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        study_uid=row["study_uid"],
        series_uid=row["series_uid"],
        state=JobState(row["state"]),
        reason=row["reason"],
        protocol_version=row["protocol_version"],
        model_name=row["model_name"],
        model_version=row["model_version"],
        model_sha256=row["model_sha256"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        instance_count=row["instance_count"],
        qa=json.loads(row["qa_json"]) if row["qa_json"] else None,
        role=JobRole(row["role"]),
        fusion_target=row["fusion_target"],
        hold_override=bool(row["hold_override"]),
        retry_count=int(row["retry_count"]),
        retry_at=row["retry_at"],
    )


def _audit_event(r: sqlite3.Row) -> AuditEvent:
    return AuditEvent(
        id=r["id"],
        ts=r["ts"],
        job_id=r["job_id"],
        study_uid=r["study_uid"],
        series_uid=r["series_uid"],
        event=r["event"],
        detail=json.loads(r["detail_json"]) if r["detail_json"] else None,
    )


def _instance(row: sqlite3.Row) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=row["sop_instance_uid"],
        study_uid=row["study_uid"],
        series_uid=row["series_uid"],
        path=Path(row["path"]),
        sop_class_uid=row["sop_class_uid"],
        calling_ae=row["calling_ae"],
        peer=row["peer"],
        received_at=row["received_at"],
        job_id=row["job_id"],
    )


class JobStore:
    """Instances, jobs and audit on one SQLite connection from :func:`rtcontrast.node.store.db.connect`."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.conn.row_factory = sqlite3.Row
        ensure_schema(self.conn)  # a no-op on connections from db.connect
        self._lock = threading.RLock()
        #: concurrent associations' instances share one transaction (one WAL fsync): store/group.py
        self._recorder: GroupCommit[_StoredInstanceLike, tuple[bool, str | None]] = GroupCommit(self._record_round)

    # ------------------------------------------------------------------ instances
    def record_instance(self, inst: _StoredInstanceLike) -> bool:
        """Record a durably spooled instance; return True if new, False for a re-send.

        A re-send (same SOP Instance UID, same series) updates the row and marks it
        unconsumed so the series is processed again; earlier jobs keep their membership
        snapshot.  The same UID in *another* series raises :class:`DuplicateInstance` and
        changes nothing: replacing the row would silently drop an acknowledged instance
        from the first series (the SCP answers 0x0111 Duplicate SOP Instance).
        """
        new, duplicate_of = self._recorder.submit(inst)
        if duplicate_of is not None:  # raised after the commit, so the audit row stays
            raise DuplicateInstance(inst.sop_instance_uid, duplicate_of, inst.series_uid)
        return new

    def _record_round(self, insts: Sequence[_StoredInstanceLike]) -> list[tuple[bool, str | None]]:
        """One transaction for the instances of concurrent callers: (new?, series it duplicates) each, in order."""
        out: list[tuple[bool, str | None]] = []
        with self._lock, transaction(self.conn):
            for inst in insts:
                prev = self.conn.execute(
                    "SELECT job_id, study_uid, series_uid, path FROM instances WHERE sop_instance_uid=?",
                    (inst.sop_instance_uid,),
                ).fetchone()
                if prev is not None and (prev["study_uid"], prev["series_uid"]) != (inst.study_uid, inst.series_uid):
                    self._audit(None, "instance_refused_duplicate_uid",
                                {"sop_instance_uid": inst.sop_instance_uid, "recorded_series": prev["series_uid"]},
                                inst.study_uid, inst.series_uid)
                    out.append((False, str(prev["series_uid"])))
                else:
                    self._upsert_instance(inst, prev)
                    out.append((prev is None, None))
        return out

    def _upsert_instance(self, inst: _StoredInstanceLike, prev: sqlite3.Row | None) -> None:
        """Insert or (re-send) update the row, inside the caller's transaction."""
        self.conn.execute(
            """INSERT INTO instances (sop_instance_uid, study_uid, series_uid, path, sop_class_uid,
                                      calling_ae, peer, received_at, job_id)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)
               ON CONFLICT(sop_instance_uid) DO UPDATE SET
                   study_uid=excluded.study_uid, series_uid=excluded.series_uid,
                   path=excluded.path, sop_class_uid=excluded.sop_class_uid,
                   calling_ae=excluded.calling_ae, peer=excluded.peer,
                   received_at=excluded.received_at, job_id=NULL""",
            (
                inst.sop_instance_uid,
                inst.study_uid,
                inst.series_uid,
                str(inst.path),
                inst.sop_class_uid,
                inst.calling_ae,
                inst.peer_address,
                _iso(inst.received_at),
            ),
        )
        if prev is not None:
            detail: dict[str, Any] = {"sop_instance_uid": inst.sop_instance_uid, "previous_job_id": prev["job_id"]}
            if prev["path"] != str(inst.path):
                detail["previous_path"] = prev["path"]
            self._audit(prev["job_id"], "instance_resent", detail, inst.study_uid, inst.series_uid)

    def instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        """The recorded instance, or None."""
        with self._lock:
            row = self.conn.execute(
                "SELECT * FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,)
            ).fetchone()
        return _instance(row) if row else None

    def series_with_unconsumed_instances(self) -> list[tuple[str, str]]:
        """(study, series) pairs that have instances not yet claimed by a job (restart)."""
        with self._lock:
            rows = self.conn.execute(
                """SELECT study_uid, series_uid, MIN(received_at) AS first FROM instances
                   WHERE job_id IS NULL GROUP BY study_uid, series_uid ORDER BY first"""
            ).fetchall()
        return [(r["study_uid"], r["series_uid"]) for r in rows]

    def known_paths(self) -> set[Path]:
        """Spool paths of every recorded instance (to reconcile with the spool's files)."""
        with self._lock:
            rows = self.conn.execute("SELECT path FROM instances").fetchall()
        return {Path(r["path"]) for r in rows}

    # ------------------------------------------------------------------ jobs
    def create_job(self, study_uid: str, series_uid: str) -> int | None:
        """Claim the series' unconsumed instances into a new job (state ``received``).

        The job's membership is every instance of the series known now (so a job for a
        late instance still covers the whole series).  Returns the job id, or None when
        the series has no unconsumed instance (e.g. a duplicate completion signal).
        """
        with self._lock, transaction(self.conn):
            fresh = self.conn.execute(
                "SELECT COUNT(*) FROM instances WHERE study_uid=? AND series_uid=? AND job_id IS NULL",
                (study_uid, series_uid),
            ).fetchone()[0]
            if not fresh:
                return None
            now = _now()
            cur = self.conn.execute(
                """INSERT INTO jobs (study_uid, series_uid, state, created_at, updated_at)
                   VALUES (?, ?, 'received', ?, ?)""",
                (study_uid, series_uid, now, now),
            )
            job_id = int(cur.lastrowid)  # type: ignore[arg-type]
            self.conn.execute(
                """INSERT INTO job_instances (job_id, sop_instance_uid)
                   SELECT ?, sop_instance_uid FROM instances WHERE study_uid=? AND series_uid=?""",
                (job_id, study_uid, series_uid),
            )
            total = self.conn.execute(
                "SELECT COUNT(*) FROM job_instances WHERE job_id=?", (job_id,)
            ).fetchone()[0]
            self.conn.execute(
                "UPDATE instances SET job_id=? WHERE study_uid=? AND series_uid=? AND job_id IS NULL",
                (job_id, study_uid, series_uid),
            )
            self.conn.execute("UPDATE jobs SET instance_count=? WHERE id=?", (total, job_id))
            earlier = [
                r[0]
                for r in self.conn.execute(
                    "SELECT id FROM jobs WHERE study_uid=? AND series_uid=? AND id<? ORDER BY id",
                    (study_uid, series_uid, job_id),
                )
            ]
            self._audit(
                job_id,
                "job_created",
                {"instances": total, "new_instances": fresh, "earlier_jobs": earlier},
                study_uid,
                series_uid,
            )
            return job_id

    def set_state(self, job_id: int, state: JobState | str, reason: str | None = None, **fields: Any) -> Job:
        """Move a job to ``state`` (with an optional reason) and update fields; audited.

        ``fields``: protocol_version, model_name, model_version, model_sha256,
        instance_count, qa (a JSON-serialisable dict), role (:class:`JobRole`),
        fusion_target, hold_override (bool), retry_count, retry_at (ISO time).
        """
        try:
            state = JobState(state)
        except ValueError:
            raise ValueError(f"unknown job state {state!r} (expected one of {', '.join(JOB_STATES)})") from None
        if "role" in fields:
            fields["role"] = JobRole(fields["role"])
        if "hold_override" in fields:
            fields["hold_override"] = bool(fields["hold_override"])
        unknown = set(fields) - _SETTABLE_FIELDS
        if unknown:
            raise TypeError(f"set_state got unknown field(s): {', '.join(sorted(unknown))}")
        cols = {k: v for k, v in fields.items() if k != "qa"}
        if "qa" in fields:
            cols["qa_json"] = json.dumps(fields["qa"], sort_keys=True) if fields["qa"] is not None else None
        with self._lock, transaction(self.conn):
            row = self.conn.execute("SELECT state, study_uid, series_uid FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(f"no job {job_id}")
            assignments = ", ".join(f"{c}=?" for c in ["state", "reason", "updated_at", *cols])
            self.conn.execute(
                f"UPDATE jobs SET {assignments} WHERE id=?",
                (str(state), reason, _now(), *[int(v) if isinstance(v, bool) else v for v in cols.values()], job_id),
            )
            detail: dict[str, Any] = {"from": row["state"], "to": str(state)}
            if reason is not None:
                detail["reason"] = reason
            for k, v in fields.items():
                if k != "qa":
                    detail[k] = str(v) if isinstance(v, StrEnum) else v
            self._audit(job_id, "state", detail, row["study_uid"], row["series_uid"])
            new = self.conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job(new)

    def job(self, job_id: int) -> Job | None:
        """One job, or None."""
        with self._lock:
            row = self.conn.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job(row) if row else None

    def recent_jobs(self, n: int = 20) -> list[Job]:
        """The ``n`` most recently created jobs, newest first."""
        with self._lock:
            rows = self.conn.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (n,)).fetchall()
        return [_job(r) for r in rows]

    def unfinished_jobs(self) -> list[Job]:
        """Jobs a restarted node must resume (not delivered/failed/ineligible/held), oldest first."""
        marks = ", ".join("?" for _ in TERMINAL_STATES)
        with self._lock:
            rows = self.conn.execute(
                f"SELECT * FROM jobs WHERE state NOT IN ({marks}) ORDER BY id", tuple(sorted(map(str, TERMINAL_STATES)))
            ).fetchall()
        return [_job(r) for r in rows]

    def jobs_for_series(self, study_uid: str, series_uid: str) -> list[Job]:
        """Every job made for a series, oldest first."""
        with self._lock:
            rows = self.conn.execute(
                "SELECT * FROM jobs WHERE study_uid=? AND series_uid=? ORDER BY id", (study_uid, series_uid)
            ).fetchall()
        return [_job(r) for r in rows]

    def latest_jobs_in_study(self, study_uid: str) -> list[Job]:
        """The newest job of every series of a study (fusion partners are found here)."""
        with self._lock:
            rows = self.conn.execute(
                """SELECT * FROM jobs WHERE id IN
                   (SELECT MAX(id) FROM jobs WHERE study_uid=? GROUP BY series_uid) ORDER BY id""",
                (study_uid,),
            ).fetchall()
        return [_job(r) for r in rows]

    def series_in_study(self, study_uid: str) -> list[str]:
        """Series UIDs of a study with at least one received instance."""
        with self._lock:
            rows = self.conn.execute(
                "SELECT DISTINCT series_uid FROM instances WHERE study_uid=?", (study_uid,)
            ).fetchall()
        return [r[0] for r in rows]

    def job_instances(self, job_id: int) -> list[InstanceRecord]:
        """The instances that make up a job (its snapshot), ordered by SOP Instance UID."""
        with self._lock:
            rows = self.conn.execute(
                """SELECT i.* FROM job_instances ji JOIN instances i USING (sop_instance_uid)
                   WHERE ji.job_id=? ORDER BY i.sop_instance_uid""",
                (job_id,),
            ).fetchall()
        return [_instance(r) for r in rows]

    # ------------------------------------------------------------------ read models
    def counts_by_state(self) -> dict[str, int]:
        """Jobs per state, every state present (0 when none): status and metrics."""
        with self._lock:
            rows = self.conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        out = dict.fromkeys(JOB_STATES, 0)
        out.update({r[0]: int(r[1]) for r in rows})
        return out

    def jobs_in_states(self, states: frozenset[JobState] | set[JobState], limit: int = 1000) -> list[Job]:
        """Jobs in any of ``states``, oldest first."""
        marks = ", ".join("?" for _ in states) or "NULL"
        with self._lock:
            rows = self.conn.execute(
                f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY id LIMIT ?",
                (*sorted(map(str, states)), limit),
            ).fetchall()
        return [_job(r) for r in rows]

    def find_jobs(
        self, *, job_id: int | None = None, study_uid: str | None = None, series_uid: str | None = None,
        limit: int = 20,
    ) -> list[Job]:
        """Jobs matching every given filter; the ``limit`` newest, returned oldest first."""
        where, args = [], []
        for col, val in (("id", job_id), ("study_uid", study_uid), ("series_uid", series_uid)):
            if val is not None:
                where.append(f"{col}=?")
                args.append(val)
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?"
        with self._lock:
            rows = self.conn.execute(sql, (*args, limit)).fetchall()
        return sorted((_job(r) for r in rows), key=lambda j: j.id)

    def series_job_states(self) -> dict[tuple[str, str], set[JobState]]:
        """(study, series) -> the states of all its jobs (retention decides on these)."""
        with self._lock:
            rows = self.conn.execute("SELECT study_uid, series_uid, state FROM jobs").fetchall()
        out: dict[tuple[str, str], set[JobState]] = {}
        for r in rows:
            out.setdefault((r[0], r[1]), set()).add(JobState(r[2]))
        return out

    def series_instance_paths(self, study_uid: str, series_uid: str) -> list[Path]:
        """Spool paths of every recorded instance of a series."""
        with self._lock:
            rows = self.conn.execute(
                "SELECT path FROM instances WHERE study_uid=? AND series_uid=?", (study_uid, series_uid)
            ).fetchall()
        return [Path(r[0]) for r in rows]

    def recent_audit(self, n: int = 5) -> list[AuditEvent]:
        """The ``n`` newest audit events, newest first."""
        with self._lock:
            rows = self.conn.execute("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (n,)).fetchall()
        return [_audit_event(r) for r in rows]

    # ------------------------------------------------------------------ audit
    def audit(
        self,
        job_id: int | None,
        event: str,
        detail: dict[str, Any] | None = None,
        *,
        study_uid: str | None = None,
        series_uid: str | None = None,
    ) -> None:
        """Append an audit event; study/series default to the job's."""
        with self._lock:
            if job_id is not None and (study_uid is None or series_uid is None):
                row = self.conn.execute("SELECT study_uid, series_uid FROM jobs WHERE id=?", (job_id,)).fetchone()
                if row is not None:
                    study_uid = study_uid or row["study_uid"]
                    series_uid = series_uid or row["series_uid"]
            self._audit(job_id, event, detail, study_uid, series_uid)

    def audit_events(
        self,
        job_id: int | None = None,
        *,
        study_uid: str | None = None,
        series_uid: str | None = None,
        limit: int = 1000,
    ) -> list[AuditEvent]:
        """Audit rows, oldest first, filtered by job and/or series."""
        where, args = [], []
        for col, val in (("job_id", job_id), ("study_uid", study_uid), ("series_uid", series_uid)):
            if val is not None:
                where.append(f"{col}=?")
                args.append(val)
        sql = "SELECT * FROM audit" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id LIMIT ?"
        with self._lock:
            rows = self.conn.execute(sql, (*args, limit)).fetchall()
        return [_audit_event(r) for r in rows]

    def _audit(
        self,
        job_id: int | None,
        event: str,
        detail: dict[str, Any] | None,
        study_uid: str | None,
        series_uid: str | None,
    ) -> None:
        self.conn.execute(
            "INSERT INTO audit (ts, job_id, study_uid, series_uid, event, detail_json) VALUES (?, ?, ?, ?, ?, ?)",
            (_now(), job_id, study_uid, series_uid, event, json.dumps(detail, sort_keys=True) if detail else None),
        )
