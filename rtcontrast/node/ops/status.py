"""What ``rtcontrast status`` shows: queues, recent jobs, dead letters, holds, disk.

Read from the database and the file system only, so it works whether or not the node
is running.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rtcontrast.node.dispatch.destinations import Destination, FolderDestination
from rtcontrast.node.dispatch.outbox import Outbox
from rtcontrast.node.store import db
from rtcontrast.node.store.jobs import JobState, JobStore
from rtcontrast.settings.node import NodeConfig

log = logging.getLogger(__name__)


@dataclass
class NodeStatus:
    """What ``node.py status`` shows."""

    db_path: Path
    queues: dict[str, dict[str, int]]
    recent_jobs: list[dict[str, Any]]
    dead_letters: list[dict[str, Any]]
    spool_path: Path
    spool_free_bytes: int | None
    jobs_by_state: dict[str, int]
    disk: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # name -> used/free/total bytes
    held_jobs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    recent_audit: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def render(self) -> str:
        """Human-readable, UIDs only (no patient data is stored in these tables)."""
        out = [f"database: {self.db_path}"]
        free = "unknown" if self.spool_free_bytes is None else f"{self.spool_free_bytes / 1024**3:.1f} GiB"
        out.append(f"spool: {self.spool_path} ({free} free)")
        for name, d in self.disk.items():
            out.append(f"disk {name}: {d['used'] / 1024**2:.1f} MiB used here, filesystem "
                       f"{d['free'] / 1024**3:.1f} of {d['total'] / 1024**3:.1f} GiB free")
        out.append("jobs by state: " + (", ".join(f"{k} {v}" for k, v in sorted(self.jobs_by_state.items())) or "none"))
        out.append("outbox per destination:")
        if not self.queues:
            out.append("  (empty)")
        for dest, counts in sorted(self.queues.items()):
            out.append(f"  {dest}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        out.append(f"recent jobs ({len(self.recent_jobs)}):")
        for j in self.recent_jobs:
            reason = f" - {j['reason']}" if j["reason"] else ""
            out.append(f"  #{j['id']} {j['state']:<10} {j['created_at'][:19]} series {j['series_uid']}"
                       f" ({j['instance_count']} inst){reason}")
        out.append(f"dead letters: {len(self.dead_letters)}")
        for d in self.dead_letters[:20]:
            out.append(f"  job {d['job_id']} -> {d['destination']}: {d['sop_instance_uid']} "
                       f"after {d['attempts']} attempt(s): {d['last_error']}")
        if len(self.dead_letters) > 20:
            out.append(f"  ... and {len(self.dead_letters) - 20} more")
        out.append(f"held for an admin: {len(self.held_jobs)}" + (" (review page, or node.py release / discard --job N)" if self.held_jobs else ""))
        for j in self.held_jobs[:20]:
            out.append(f"  #{j['id']} series {j['series_uid']}: {j['reason']}")
        out.append(f"recent audit events ({len(self.recent_audit)}; node.py audit --job N for a job's trail):")
        for e in self.recent_audit:
            out.append(f"  {e['ts'][:19]} job {e['job_id']} {e['event']} {e['detail']}")
        return "\n".join(out)


def _dir_usage(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def _disk(config: NodeConfig) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for name, path in (("spool", config.spool_path), ("outbox", config.outbox_path), ("export", config.export_path),
                       ("jobs", config.var_dir / "jobs"), ("database", config.db_file)):
        if not path.exists():
            continue
        try:
            du = shutil.disk_usage(path if path.is_dir() else path.parent)
        except OSError:
            continue
        used = _dir_usage(path) if path.is_dir() else path.stat().st_size
        out[name] = {"used": used, "free": int(du.free), "total": int(du.total)}
    return out


def export_dirs(destinations: dict[str, Destination]) -> dict[str, Path]:
    return {n: Path(d.path) for n, d in destinations.items() if isinstance(d, FolderDestination)}


def read_status(config: NodeConfig, n_jobs: int = 10) -> NodeStatus:
    """Read the node's state from its database (safe while the node runs: WAL readers)."""
    conn = db.connect(config.db_file)
    try:
        jobs = JobStore(conn)
        outbox = Outbox(conn, None)  # a reader
        by_state = {s: n for s, n in jobs.counts_by_state().items() if n}
        recent = [
            {"id": j.id, "state": j.state, "series_uid": j.series_uid, "created_at": j.created_at,
             "instance_count": j.instance_count, "reason": j.reason}
            for j in jobs.recent_jobs(n_jobs)
        ]
        dead = [
            {"job_id": d.job_id, "destination": d.destination, "sop_instance_uid": d.sop_instance_uid,
             "attempts": d.attempts, "last_error": d.last_error}
            for d in outbox.dead_letters()
        ]
        queues = outbox.counts()
        held = [{"id": j.id, "series_uid": j.series_uid, "reason": j.reason}
                for j in reversed(jobs.jobs_in_states({JobState.HELD}))]
        audit = [
            {"ts": e.ts, "job_id": e.job_id, "event": e.event,
             "detail": json.dumps(e.detail, sort_keys=True) if e.detail else ""}
            for e in jobs.recent_audit(5)
        ]
    finally:
        conn.close()
    try:
        free: int | None = int(shutil.disk_usage(config.spool_path if config.spool_path.exists() else config.var_dir).free)
    except OSError:
        free = None
    return NodeStatus(config.db_file, queues, recent, dead, config.spool_path, free, by_state,
                      disk=_disk(config), held_jobs=held, recent_audit=audit)


