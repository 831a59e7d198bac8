"""The life of a QA hold after the pipeline: a reviewer releases it or discards it, or it expires.

Why one module for the CLI, the review page and retention: each path must leave the same
trace.  A decision is one append-only audit event (``released`` / ``discarded``) naming
the reviewer, the note and the way it came (``cli``, ``review page``, ``retention``); the
released job's derived series carry the decision in their DICOM
(:func:`rtcontrast.node.qa.review_decision`).  A discard removes what was received for the
job (spool files no other pending job needs) and its job folder (the QA preview): a held
series is patient data the node must not keep once nobody will send it.  Database rows
stay, so the audit still answers what happened.  Every function takes a :class:`JobStore` on
a connection of its own (the CLI's, the review page's, retention's), never the node's shared one.

The job ends ``failed`` with the reason ``discarded after QA hold by <user>`` (the job
store has no ``discarded`` state yet); the ``discarded`` audit event is what marks it.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rtcontrast.node.store.jobs import Job, JobState, JobStore

__all__ = [
    "DISCARD_REASON",
    "DiscardResult",
    "check_note",
    "check_reviewer",
    "discard_held",
    "expired_holds",
    "held_jobs",
    "release_held",
]

log = logging.getLogger(__name__)

#: Reason prefix of a job that was discarded from a hold.
DISCARD_REASON = "discarded after QA hold"
#: Job states whose membership no longer needs the received files.
_DONE_STATES = (JobState.DELIVERED, JobState.FAILED, JobState.INELIGIBLE)
_REVIEWER_RE = re.compile(r"^[\w][\w .,'@-]{0,63}$", re.UNICODE)
_MAX_NOTE = 500


def check_reviewer(user: str | None) -> str:
    """A reviewer's name as written into DICOM and the audit: 1-64 letters, digits, ``.,'@-_`` and spaces."""
    name = " ".join((user or "").split())
    if not name:
        raise ValueError("the reviewer's name is required")
    if not _REVIEWER_RE.match(name):
        raise ValueError("the reviewer's name is 1 to 64 letters, digits, spaces or . , ' @ - _")
    return name


def check_note(note: str | None, required: bool = True) -> str | None:
    """A decision note: one line (line breaks become spaces), at most 500 characters, no control characters."""
    text = " ".join((note or "").split())
    if not text:
        if required:
            raise ValueError("a note is required: say why (no patient names or IDs)")
        return None
    if len(text) > _MAX_NOTE:
        raise ValueError(f"the note is {len(text)} characters; at most {_MAX_NOTE}")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ValueError("the note contains control characters")
    return text


def _held(jobs: JobStore, job_id: int, verb: str) -> Job:
    job = jobs.job(job_id)
    if job is None:
        raise ValueError(f"no job {job_id}")
    if job.state != JobState.HELD:
        raise ValueError(f"job {job_id} is {job.state}, not held: only held jobs are {verb}")
    return job


def release_held(jobs: JobStore, job_id: int, *, user: str, note: str | None, via: str) -> Job:
    """Release a held job: a ``released`` audit event, then back to ``received``.

    A running node's scheduler re-runs it within a second with the hold overridden and sends
    it flagged with this decision; a stopped node does at its next start.  Raises
    ValueError when the job does not exist or is not held, or the name or note is bad.
    """
    user = check_reviewer(user)
    note = check_note(note, required=False)
    job = _held(jobs, job_id, "released")
    jobs.audit(job_id, "released", {"previous_reason": job.reason, "user": user, "via": via,
                                    **({"note": note} if note else {})})
    log.info("job %d series %s released from its QA hold by %s (%s)", job_id, job.series_uid, user, via)
    return jobs.set_state(job_id, JobState.RECEIVED, f"released by {user} (QA hold overridden)", hold_override=True)


@dataclass(frozen=True)
class DiscardResult:
    """What a discard removed."""

    job: Job
    files: int
    bytes: int


def _files_to_remove(conn: sqlite3.Connection, job_id: int) -> list[Path]:
    """Spool files of the job's instances that no other job still needs and no newer arrival reuses.

    Kept: an instance received again since (``job_id`` NULL: it waits for a new job) or
    member of another job that is not finished (``held``, running, queued).
    """
    marks = ", ".join("?" for _ in _DONE_STATES)
    rows = conn.execute(
        f"""SELECT i.path FROM job_instances ji JOIN instances i USING (sop_instance_uid)
            WHERE ji.job_id=? AND i.job_id IS NOT NULL
              AND NOT EXISTS (SELECT 1 FROM job_instances o JOIN jobs j ON j.id=o.job_id
                              WHERE o.sop_instance_uid=ji.sop_instance_uid AND o.job_id != ?
                                AND j.state NOT IN ({marks}))""",
        (job_id, job_id, *_DONE_STATES),
    ).fetchall()
    return [Path(r[0]) for r in rows]


def _remove_tree_files(root: Path) -> tuple[int, int]:
    n = size = 0
    if not root.is_dir():
        return 0, 0
    for f in sorted(root.rglob("*"), reverse=True):
        if f.is_file() or f.is_symlink():
            size += f.lstat().st_size
            f.unlink(missing_ok=True)
            n += 1
        elif f.is_dir():
            f.rmdir()
    root.rmdir()
    return n, size


def discard_held(jobs: JobStore, job_id: int, *, user: str, note: str | None, via: str,
                 jobs_root: Path, note_required: bool = True) -> DiscardResult:
    """Discard a held job: never sent; its received files and QA preview removed; audited.

    The state goes first (``failed``, reason ``discarded after QA hold by <user>``), then the
    files: a crash in between leaves files that retention removes later, never a job that
    could still be released without its images.  Raises ValueError when the job does not
    exist or is not held, or the name or note is bad.
    """
    user = check_reviewer(user)
    note = check_note(note, required=note_required)
    job = _held(jobs, job_id, "discarded")
    jobs.audit(job_id, "discarded", {"previous_reason": job.reason, "user": user, "via": via,
                                     **({"note": note} if note else {})})
    done = jobs.set_state(job_id, JobState.FAILED, f"{DISCARD_REASON} by {user}")
    paths = _files_to_remove(jobs.conn, job_id)
    n = size = 0
    for p in paths:
        try:
            size += p.stat().st_size
            p.unlink()
            n += 1
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("job %d: cannot remove %s: %s (retention removes it later)", job_id, p.name, exc)
        for folder in (p.parent, p.parent.parent):  # the series, then the study folder, once empty
            try:
                folder.rmdir()
            except OSError:
                break
    try:
        dn, dsize = _remove_tree_files(jobs_root / str(job_id))
    except OSError as exc:
        log.warning("job %d: cannot remove its job folder: %s", job_id, exc)
        dn = dsize = 0
    jobs.audit(job_id, "files_removed", {"spool_files": n, "job_folder_files": dn, "bytes": size + dsize})
    log.info("job %d series %s discarded from its QA hold by %s (%s): %d received file(s) and %d job file(s) removed",
             job_id, job.series_uid, user, via, n, dn)
    return DiscardResult(job=done, files=n + dn, bytes=size + dsize)


def held_jobs(jobs: JobStore) -> list[int]:
    """Ids of the jobs waiting for a reviewer, oldest first (the job store's read model)."""
    return [j.id for j in jobs.jobs_in_states({JobState.HELD}, limit=-1)]


def _parse(ts: str) -> datetime:
    t = datetime.fromisoformat(ts)
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def expired_holds(jobs: JobStore, days: float, now: datetime | None = None) -> list[Job]:
    """Held jobs held longer than ``days`` (since they became held: their last update)."""
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(days=days)
    ids = held_jobs(jobs)
    out = []
    for jid in ids:
        job = jobs.job(jid)
        if job is not None and job.state == JobState.HELD and _parse(job.updated_at) < cutoff:
            out.append(job)
    return out
