"""Retention: purge received series, exports and job folders older than ``retention_days``.

Why this is conservative: a node that deletes a series it still owes to the TPS loses
data, and a node that never deletes fills its disk (and then refuses the scanner).  So a
file goes only when *all* of these hold:

* it is older than the cutoff (file modification time: the spool and export writers
  create each file once, a re-sent instance gets a fresh file);
* its series is done: every job ever made for it ended ``delivered``, ``ineligible`` or
  ``failed``, and no received instance waits to become a job.  A ``held`` job waits for
  an admin, a ``queued`` job for the TPS: both are pending work and keep everything;
* for exports (folder destinations, ``<path>/<study>/<series>/<sop>.dcm``): no outbox
  item of that derived series is still pending or dead-lettered for that destination.

Held jobs (waiting for a reviewer) are the exception with a clock of their own:
``held_retention_days`` after a job became held, nobody having released or discarded it, it is
discarded like a reviewer would (:func:`rtcontrast.node.ops.holds.discard_held`, reviewer
``retention``, a ``discarded`` audit event): its received files and preview go at once.  A
held series is patient data nobody will send; keeping it forever is not an option.

The database rows stay (the audit trail answers "what happened" for years; rows are
small); delivered outbox rows past the cutoff are pruned as before
(:meth:`rtcontrast.node.dispatch.outbox.Outbox.prune`).  Logs name series UIDs and counts only.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from rtcontrast.node.dispatch.outbox import Outbox
from rtcontrast.node.ops.holds import discard_held, expired_holds
from rtcontrast.node.store import db
from rtcontrast.node.store.jobs import JobState, JobStore

__all__ = ["PurgeReport", "purge", "PURGEABLE_JOB_STATES"]

log = logging.getLogger(__name__)

#: A series whose jobs are all in these states owes nothing to anyone.
PURGEABLE_JOB_STATES: frozenset[JobState] = frozenset({JobState.DELIVERED, JobState.INELIGIBLE, JobState.FAILED})


@dataclass
class PurgeReport:
    """What a purge removed (or, with ``dry_run``, would remove)."""

    cutoff: float
    dry_run: bool
    spool_series: list[str] = field(default_factory=list)
    spool_files: int = 0
    export_series: list[str] = field(default_factory=list)
    export_files: int = 0
    job_dirs: list[int] = field(default_factory=list)
    outbox_rows: int = 0
    bytes: int = 0
    kept_pending_series: int = 0
    held_discarded: list[int] = field(default_factory=list)
    held_days: float | None = None

    def render(self) -> str:
        """One paragraph for ``node.py purge`` (UIDs and counts, no patient data)."""
        verb = "would remove" if self.dry_run else "removed"
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.cutoff))
        lines = [
            f"retention cutoff {when}: {verb} {self.spool_files} spool file(s) of {len(self.spool_series)} series, "
            f"{self.export_files} export file(s) of {len(self.export_series)} series, {len(self.job_dirs)} job "
            f"folder(s), {self.outbox_rows} delivered outbox row(s); {self.bytes / 1024**2:.1f} MiB",
            f"kept: {self.kept_pending_series} series with pending work (held, queued, running or not yet a job)",
        ]
        if self.held_days is not None:
            verb_held = "would discard" if self.dry_run else "discarded"
            ids = ", ".join(f"#{j}" for j in self.held_discarded) or "none"
            lines.append(f"held jobs unreviewed for more than {self.held_days:g} day(s): {verb_held} {ids}")
        for s in self.spool_series[:20]:
            lines.append(f"  spool series {s}")
        if len(self.spool_series) > 20:
            lines.append(f"  ... and {len(self.spool_series) - 20} more")
        return "\n".join(lines)


def _old_files(files: Iterable[Path], cutoff: float) -> list[tuple[Path, int]]:
    out = []
    for f in files:
        try:
            st = f.stat()
        except FileNotFoundError:
            continue
        if st.st_mtime < cutoff:
            out.append((f, st.st_size))
    return out


def _remove(files: list[tuple[Path, int]], dry_run: bool) -> int:
    freed = 0
    for f, size in files:
        if not dry_run:
            try:
                f.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("retention: cannot remove %s: %s", f, exc)
                continue
        freed += size
    return freed


def _prune_empty(directory: Path, stop: Path) -> None:
    """Remove ``directory`` and its empty parents up to (not including) ``stop``."""
    d = directory
    while d != stop and stop in d.parents:
        try:
            d.rmdir()
        except OSError:
            return
        d = d.parent


def _finished_series(jobs: JobStore) -> tuple[set[tuple[str, str]], int]:
    """Series whose every job is purgeable and that have no unclaimed instance."""
    states = jobs.series_job_states()
    unclaimed = set(jobs.series_with_unconsumed_instances())
    done = {k for k, s in states.items() if s <= PURGEABLE_JOB_STATES and k not in unclaimed}
    pending = (set(states) | unclaimed) - done
    return done, len(pending)


def purge(
    db_file: Path,
    *,
    spool_root: Path,
    outbox_root: Path,
    jobs_root: Path,
    export_dirs: dict[str, Path],
    retention_days: float,
    held_retention_days: float | None = None,
    now: float | None = None,
    dry_run: bool = False,
) -> PurgeReport:
    """Remove what is older than ``retention_days`` and owed to no one; see the module doc.

    ``held_retention_days``: discard held jobs unreviewed for longer first (None: keep them).

    ``export_dirs``: folder destinations by name (``<path>/<study>/<series>/*.dcm``).
    Safe while the node runs (its own SQLite connection; files are only removed when
    every job of their series is finished).
    """
    now = time.time() if now is None else now
    cutoff = now - retention_days * 86400.0
    report = PurgeReport(cutoff=cutoff, dry_run=dry_run, held_days=held_retention_days)
    conn = db.connect(db_file)
    try:
        jobs = JobStore(conn)
        if held_retention_days is not None:
            for job in expired_holds(jobs, held_retention_days, datetime.fromtimestamp(now, timezone.utc)):
                report.held_discarded.append(job.id)
                if dry_run:
                    continue
                try:
                    res = discard_held(jobs, job.id, user="retention", via="retention", jobs_root=jobs_root,
                                       note=f"held and unreviewed for more than {held_retention_days:g} day(s)")
                except ValueError:  # released or discarded meanwhile
                    report.held_discarded.remove(job.id)
                    continue
                report.bytes += res.bytes
        outbox = Outbox(conn, None if dry_run else outbox_root)
        done, report.kept_pending_series = _finished_series(jobs)
        # -- spool: the recorded paths of finished series
        for study, series in sorted(done):
            paths = jobs.series_instance_paths(study, series)
            old = _old_files(paths, cutoff)
            if not old:
                continue
            report.spool_series.append(series)
            report.spool_files += len(old)
            report.bytes += _remove(old, dry_run)
            if not dry_run:
                for d in {p.parent for p, _ in old}:
                    _prune_empty(d, spool_root)
        # -- exports: derived series with nothing owed to that destination
        for name, root in sorted(export_dirs.items()):
            if not root.is_dir():
                continue
            owed = outbox.series_owed(name)
            for series_dir in sorted(p for p in root.glob("*/*") if p.is_dir()):
                if series_dir.name in owed:
                    continue
                old = _old_files(series_dir.glob("*.dcm"), cutoff)
                if not old:
                    continue
                report.export_series.append(series_dir.name)
                report.export_files += len(old)
                report.bytes += _remove(old, dry_run)
                if not dry_run:
                    _prune_empty(series_dir, root)
        # -- job folders (QA previews) of finished jobs
        if jobs_root.is_dir():
            finished = {j.id for j in jobs.jobs_in_states(PURGEABLE_JOB_STATES, limit=-1)}
            for d in sorted(jobs_root.iterdir()):
                if not (d.is_dir() and d.name.isdigit() and int(d.name) in finished):
                    continue
                files = [f for f in d.rglob("*") if f.is_file()]
                if not files or any(f.stat().st_mtime >= cutoff for f in files):
                    continue
                report.job_dirs.append(int(d.name))
                report.bytes += sum(f.stat().st_size for f in files)
                if not dry_run:
                    shutil.rmtree(d, ignore_errors=True)
        # -- delivered outbox rows (their files went at delivery)
        if dry_run:
            report.outbox_rows = outbox.delivered_before(cutoff)
        else:
            report.outbox_rows = outbox.prune(cutoff)
    finally:
        conn.close()
    if not dry_run and report.held_discarded:
        log.warning("retention: discarded %d held job(s) unreviewed for more than %g day(s): %s",
                    len(report.held_discarded), held_retention_days,
                    ", ".join(str(j) for j in report.held_discarded))
    if not dry_run and (report.spool_files or report.export_files or report.job_dirs or report.outbox_rows):
        log.info(
            "retention: removed %d spool file(s) of %d series, %d export file(s), %d job folder(s), "
            "%d outbox row(s) (%.1f MiB) older than %g day(s)",
            report.spool_files, len(report.spool_series), report.export_files, len(report.job_dirs),
            report.outbox_rows, report.bytes / 1024**2, retention_days,
        )
    return report

