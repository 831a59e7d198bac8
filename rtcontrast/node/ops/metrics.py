"""Prometheus metrics of one node, served on loopback (``metrics:`` in node.yaml).

Why a per-node :class:`~prometheus_client.CollectorRegistry` instead of the global one:
tests run several nodes in one process, and a node must only ever report its own work.

Two kinds of numbers:

* counters/histograms updated as things happen (instances received, series completed,
  jobs by final state, per-stage durations from the pipeline's timings, deliveries and
  send failures per destination, protocol reloads);
* gauges read from the node's SQLite database at scrape time (jobs by current state,
  pending jobs, outbox items per destination and state, dead letters, free disk), so
  they are right after a restart and never drift from what ``node.py status`` shows.

Model (name, version, sha256, execution provider), protocol version and the build
(``rtcontrast_build_info{version, commit, python, onnxruntime, pydicom, pynetdicom}``) are
info metrics (``..._info{...} 1``), so a dashboard shows what runs where.  Nothing here
carries patient data: labels are destinations, states, stage names and versions only.

The same endpoint answers ``GET /healthz``: 200 ``ok`` while the node is healthy (every
thread alive, the scheduler looping: what feeds the systemd watchdog), else 503 with the
reason, for a load balancer or an uptime check that does not parse metrics.
"""

from __future__ import annotations

import logging
import platform
import shutil
import socket
import sqlite3
import subprocess
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from random import Random
from typing import Any

from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rtcontrast.node.dispatch.outbox import STATES as OUTBOX_STATES
from rtcontrast.node.dispatch.outbox import Outbox, OutboxItem, Outcome, RetryPolicy
from rtcontrast.node.store.jobs import TERMINAL_STATES, JobStore
from rtcontrast.node.store.schema import SchemaError

__all__ = ["NodeMetrics", "MeteredOutbox", "QueueSnapshot", "read_snapshot"]

log = logging.getLogger(__name__)

#: Stage duration buckets (seconds): a 2-core CPU job takes seconds to minutes.
_STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
#: Job states that end a job (the ``rtcontrast_jobs_finished_total`` label values).
FINAL_STATES: tuple[str, ...] = tuple(sorted(map(str, TERMINAL_STATES)))


@dataclass
class QueueSnapshot:
    """What the gauges show, read from the database (see :func:`read_snapshot`)."""

    jobs_by_state: dict[str, int] = field(default_factory=dict)
    outbox: dict[str, dict[str, int]] = field(default_factory=dict)  # destination -> state -> n
    free_disk_bytes: int | None = None


def read_snapshot(db_file: Path, disk_path: Path) -> QueueSnapshot:
    """Read job and outbox counts from the node database (a short-lived WAL reader)."""
    snap = QueueSnapshot()
    if db_file.exists():
        conn = sqlite3.connect(f"file:{db_file}?mode=ro", uri=True, timeout=5.0)
        try:
            snap.jobs_by_state = {s: n for s, n in JobStore(conn).counts_by_state().items() if n}
            for dest, counts in Outbox(conn, None).counts().items():
                snap.outbox[dest] = {**dict.fromkeys(OUTBOX_STATES, 0), **counts}
        except (sqlite3.OperationalError, SchemaError) as exc:  # not created / migrated yet (read-only here)
            log.debug("metrics snapshot: %s", exc)
        finally:
            conn.close()
    try:
        snap.free_disk_bytes = int(shutil.disk_usage(disk_path).free)
    except OSError:
        snap.free_disk_bytes = None
    return snap


class _SnapshotCollector(Collector):
    """Gauges computed at scrape time from a :class:`QueueSnapshot` source."""

    def __init__(self, source: Callable[[], QueueSnapshot]) -> None:
        self.source = source

    def describe(self) -> list[Metric]:
        return []  # no name-clash check at registration (collect() reads the database)

    def collect(self) -> Iterator[Metric]:
        try:
            snap = self.source()
        except Exception:  # a scrape must not break the node; the log says why
            log.exception("metrics: cannot read the node database")
            return
        jobs = GaugeMetricFamily("rtcontrast_jobs", "Jobs in the database by current state", labels=["state"])
        for state, n in sorted(snap.jobs_by_state.items()):
            jobs.add_metric([state], n)
        yield jobs
        unfinished = sum(n for s, n in snap.jobs_by_state.items() if s not in FINAL_STATES)
        yield GaugeMetricFamily(
            "rtcontrast_jobs_pending", "Jobs not yet finished (received .. queued for delivery)", value=unfinished
        )
        items = GaugeMetricFamily(
            "rtcontrast_outbox_items", "Outbox items by destination and state", labels=["destination", "state"]
        )
        pending = GaugeMetricFamily(
            "rtcontrast_outbox_pending", "Outbox items waiting for delivery", labels=["destination"]
        )
        dead = GaugeMetricFamily(
            "rtcontrast_dead_letters", "Outbox items that ran out of attempts (node.py resend)", labels=["destination"]
        )
        for dest, counts in sorted(snap.outbox.items()):
            for state, n in counts.items():
                items.add_metric([dest, state], n)
            pending.add_metric([dest], counts.get("pending", 0))
            dead.add_metric([dest], counts.get("dead_letter", 0))
        yield items
        yield pending
        yield dead
        if snap.free_disk_bytes is not None:
            yield GaugeMetricFamily(
                "rtcontrast_free_disk_bytes", "Free space on the node's var directory", value=snap.free_disk_bytes
            )


class NodeMetrics:
    """The metrics of one node and, once :meth:`serve` ran, its HTTP endpoint."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.instances_received = Counter(
            "rtcontrast_instances_received", "Instances stored in the spool (C-STORE success)", registry=r
        )
        self.series_completed = Counter(
            "rtcontrast_series_completed", "Series completed (idle timeout) and turned into a job", registry=r
        )
        self.jobs_finished = Counter(
            "rtcontrast_jobs_finished", "Jobs by final state", ["state"], registry=r
        )
        for s in FINAL_STATES:
            self.jobs_finished.labels(s)
        self.stage_seconds = Histogram(
            "rtcontrast_stage_duration_seconds", "Pipeline stage durations", ["stage"],
            buckets=_STAGE_BUCKETS, registry=r,
        )
        self.instances_sent = Counter(
            "rtcontrast_instances_sent", "Instances delivered, by destination", ["destination"], registry=r
        )
        self.send_failures = Counter(
            "rtcontrast_send_failures", "Failed delivery attempts, by destination", ["destination"], registry=r
        )
        self.protocol_reloads = Counter(
            "rtcontrast_protocol_reloads", "Protocol reloads (SIGHUP) by result", ["result"], registry=r
        )
        for res in ("ok", "rejected"):
            self.protocol_reloads.labels(res)
        self.build_info = Info("rtcontrast_build", "The rtcontrast build and its main libraries", registry=r)
        self.build_info.info(build_info())
        self._health: Callable[[], bool] = lambda: True
        self.job_retries = Counter(
            "rtcontrast_job_retries", "Jobs put back after a transient failure (disk full, database busy)",
            ["cause"], registry=r,
        )
        self.model_info = Info("rtcontrast_model", "The qmap model in use", registry=r)
        self.protocol_info = Info("rtcontrast_protocol", "The protocol in force", registry=r)
        self._server: Any = None
        self._snapshot: _SnapshotCollector | None = None
        self._thread: threading.Thread | None = None

    # -- updates -------------------------------------------------------------------
    def set_model(self, name: str, version: str, sha256: str, provider: str) -> None:
        """Model name/version/sha256 and the onnxruntime execution provider."""
        self.model_info.info({"name": name, "version": version, "sha256": sha256, "provider": provider})

    def set_protocol(self, audit_version: str, recipes: int) -> None:
        """The protocol's audit version (``<version>+sha256:<12 hex>``)."""
        self.protocol_info.info({"version": audit_version, "recipes": str(recipes)})

    def set_destinations(self, names: Sequence[str]) -> None:
        """Show every destination's delivery counters from the start (0, not absent)."""
        for name in names:
            self.instances_sent.labels(name)
            self.send_failures.labels(name)

    def observe_job(self, state: str, timings_s: dict[str, float]) -> None:
        """A pipeline run ended in ``state``; ``queued`` is not final (delivery follows)."""
        for stage, seconds in timings_s.items():
            self.stage_seconds.labels(stage).observe(seconds)
        if state in FINAL_STATES:
            self.jobs_finished.labels(state).inc()

    def set_health_check(self, check: Callable[[], bool]) -> None:
        """What ``/healthz`` asks (the node's :meth:`~rtcontrast.node.service.Node.healthy`)."""
        self._health = check

    def health(self) -> tuple[bool, str]:
        """(healthy, text) as ``/healthz`` reports it; a failing check counts as unhealthy."""
        try:
            ok = bool(self._health())
        except Exception as exc:  # the check itself broke: report it, never crash the endpoint
            return False, f"unhealthy: health check failed: {type(exc).__name__}: {exc}"
        return (True, "ok") if ok else (False, "unhealthy: a node thread stopped or the scheduler stalled")

    def add_snapshot_source(self, source: Callable[[], QueueSnapshot]) -> None:
        """Register the scrape-time gauges (queue depths, dead letters, disk); replaces an earlier source."""
        if self._snapshot is not None:
            self.registry.unregister(self._snapshot)
        self._snapshot = _SnapshotCollector(source)
        self.registry.register(self._snapshot)

    # -- endpoint ------------------------------------------------------------------
    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` in a daemon thread; the bound port."""
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if environ.get("PATH_INFO") == "/healthz":
                ok, text = self.health()
                start_response("200 OK" if ok else "503 Service Unavailable",
                               [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")])
                return [(text + "\n").encode()]
            return metrics_app(environ, start_response)

        class _Server(ThreadingWSGIServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        self._server = make_server(host, port, app, _Server, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        bound = int(self._server.server_port)
        log.info("metrics on http://%s:%d/metrics (health: /healthz)", host, bound)
        return bound

    def stop(self) -> None:
        """Stop the endpoint (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape (every 15 s) in the journal."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def _git_commit() -> str:
    """The checkout's commit (short), or the release name an install recorded, else "unknown"."""
    root = Path(__file__).resolve().parents[3]
    try:
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, timeout=5)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    release = root.parent.name if root.name == "app" else ""  # /opt/rtcontrast/releases/<version>/app
    return release.rsplit("-", 1)[-1] if "-" in release else "unknown"


def build_info() -> dict[str, str]:
    """Labels of ``rtcontrast_build_info``: our version and commit, the interpreter and main libraries."""
    from importlib.metadata import PackageNotFoundError, version

    from rtcontrast import __version__

    def installed(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return ""

    out = {"version": __version__, "commit": _git_commit(), "python": platform.python_version()}
    for key, dists in (("onnxruntime", ("onnxruntime-gpu", "onnxruntime")), ("pydicom", ("pydicom",)),
                       ("pynetdicom", ("pynetdicom",))):
        out[key] = next((v for d in dists if (v := installed(d))), "")
    return out


class MeteredOutbox(Outbox):
    """The node's :class:`Outbox`, counting deliveries and failures per destination."""

    def __init__(self, conn: sqlite3.Connection, root: Path, metrics: NodeMetrics) -> None:
        super().__init__(conn, root)
        self.metrics = metrics

    def record(
        self,
        results: Sequence[tuple[OutboxItem, Outcome]],
        policy: RetryPolicy,
        now: float,
        rng: Random | None = None,
        delete_delivered: bool = True,
    ) -> None:
        super().record(results, policy, now, rng, delete_delivered)
        for item, res in results:
            if res.delivered:
                self.metrics.instances_sent.labels(item.destination).inc()
            else:
                self.metrics.send_failures.labels(item.destination).inc()
