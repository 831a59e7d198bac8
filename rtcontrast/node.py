"""The node: receive, complete series, run jobs, deliver — wired together, restartable.

Threads (all in one process):

* the Storage SCP's association threads (pynetdicom) write each instance to the spool,
  record it in the job store and touch its series in the :class:`SeriesTracker`;
* the *scheduler* turns due series into jobs (``create_job``) for the worker, marks
  ``queued`` jobs ``delivered`` once the outbox has delivered all of their instances,
  and prunes delivered outbox rows past ``retention_days``;
* one *worker* runs jobs one at a time (:func:`rtcontrast.pipeline.run_job`): the model
  and the two CPU cores are shared, and one job at a time keeps latency predictable;
* the outbox *sender* delivers with retries and backoff.

Restart (what :meth:`Node.start` does before it listens): delete partial spool writes,
re-run every unfinished job from assembly (stages are deterministic and the derived UIDs
too, so re-enqueueing replaces the same outbox rows and the TPS replaces, never
duplicates), touch every series with instances that no job has claimed yet, and let the
sender carry on with every pending outbox row.  A job already ``queued`` is not re-run:
its instances are durable in the outbox.

A newer job for the same series supersedes an older one that has not started yet (the
newer one's membership snapshot covers the whole series): the older one ends ``failed``
with the reason ``superseded by job N``.

Operations (issue: run it in a hospital): ``run_forever`` tells systemd READY=1 once the
SCP listens and pings the watchdog while the scheduler, worker, sender and SCP are alive;
SIGHUP reloads the protocol file (:meth:`Node.reload`: a valid file replaces the old one
for the next job, an invalid one is refused with every error logged and the old one stays;
a running job finishes with the protocol it started with).  Metrics are served on
``metrics.host:port`` (:mod:`rtcontrast.metrics`); each job's QA preview goes to
``<var_dir>/jobs/<id>/preview.png``; retention (:mod:`rtcontrast.retention`) runs hourly.
A job that an admin releases (``node.py release``: held -> received) is picked up by the
scheduler and re-run with the QA hold overridden.

Paths: relative paths are relative to the working directory.  The model path falls back
to the installation's ``models/`` when the working directory has none (so ``python
node.py run`` finds the shipped model from anywhere), and the protocol's default export
folder (``./var/export``) follows the node's ``export_dir`` (default ``<var_dir>/export``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from rtcontrast import __version__, db
from rtcontrast import systemd as sd
from rtcontrast.config import ConfigError, NodeConfig
from rtcontrast.contract import ContractError
from rtcontrast.jobs import JobStore
from rtcontrast.metrics import MeteredOutbox, NodeMetrics, read_snapshot
from rtcontrast.outbox import Destination, FolderDestination, Outbox, RetryPolicy, Sender
from rtcontrast.pipeline import PipelineContext, node_identity, run_job
from rtcontrast.protocol import ProtocolConfig, build_destinations, load_protocol
from rtcontrast.qmap import QMapModel
from rtcontrast.scp import ScpSettings, StorageSCP, StoredInstance
from rtcontrast.series import SeriesTracker
from rtcontrast.spool import Spool

__all__ = [
    "Node",
    "NodeStatus",
    "check_config",
    "cmd_audit",
    "check_model_pin",
    "cmd_check_config",
    "cmd_models",
    "cmd_purge",
    "cmd_release",
    "cmd_resend",
    "cmd_run",
    "cmd_status",
    "read_status",
    "release_job",
    "resend_dead_letters",
    "list_models",
    "resolve_model",
    "resolve_model_path",
]

log = logging.getLogger("rtcontrast.node")

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
_DEFAULT_EXPORT = Path("var/export")
#: Job states that are re-run from assembly after a restart.
_RERUN_STATES = frozenset({"received", "assembling", "inferring", "rendering", "deriving"})
_MONITOR_INTERVAL_S = 0.5
_PRUNE_INTERVAL_S = 3600.0
#: The watchdog is fed only while the scheduler loop ran this recently.
_SCHEDULER_STALL_S = 20.0


def resolve_model_path(path: Path) -> Path:
    """``path`` if it exists; a relative path missing here is looked up in the installation."""
    if path.exists() or path.is_absolute():
        return path
    alt = _PACKAGE_ROOT / path
    return alt if alt.exists() else path


# ---------------------------------------------------------------------- model management
# Several models may sit in models/; config.model_path is the default, a protocol may pin one
# by name and sha256 (protocol.yaml ``model: {name, sha256}``).


@dataclass
class ModelEntry:
    """One models/*.onnx file with what its metadata and card say (``node.py models``)."""

    path: Path
    name: str | None
    version: str | None
    contract: str | None
    sha256: str
    card: dict[str, Any] | None
    error: str | None = None


def _onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in m.metadata_props}


def list_models(models_dir: Path) -> list[ModelEntry]:
    """Every ``*.onnx`` in ``models_dir`` with its metadata, sha256 and card (``NAME.json``), by name."""
    import json

    from rtcontrast.qmap import file_sha256

    out = []
    for path in sorted(models_dir.glob("*.onnx")):
        card = None
        card_path = path.with_suffix(".json")
        if card_path.is_file():
            try:
                card = json.loads(card_path.read_text())
            except (OSError, ValueError):
                card = None
        try:
            meta = _onnx_metadata(path)
            out.append(ModelEntry(path, meta.get("name"), meta.get("version"), meta.get("rtcontrast.contract"),
                                  file_sha256(path), card))
        except Exception as exc:  # an unreadable file is listed, not fatal
            out.append(ModelEntry(path, None, None, None, file_sha256(path), card, f"{type(exc).__name__}: {exc}"))
    return out


def check_model_pin(model: QMapModel, pin: Any) -> None:
    """Raise :class:`ContractError` when ``model`` is not the protocol's pinned one (``pin`` None: any)."""
    if pin is None:
        return
    if model.info.name != pin.name or model.sha256 != pin.sha256.lower():
        raise ContractError(
            f"protocol pins model '{pin.name}' sha256 {pin.sha256[:12]}..., but the model in use is "
            f"'{model.info.name}' {model.info.version} sha256 {model.sha256[:12]}... ({model.path}); "
            "restore the validated model or update the protocol's model pin (python node.py models lists sha256)")


def resolve_model(config: NodeConfig, protocol: ProtocolConfig) -> Path:
    """The model file to load: ``config.model_path``, or the protocol's pinned model in its folder.

    A pin is matched by metadata name among ``models/*.onnx`` (the configured file first)
    and then by file SHA-256; a missing name or a differing SHA-256 raises
    :class:`ContractError` saying which, so the node refuses to start.
    """
    default = resolve_model_path(config.model_path)
    pin = protocol.model
    if pin is None:
        return default
    entries = list_models(default.parent) if default.parent.is_dir() else []
    named = [e for e in entries if e.name == pin.name]
    if not named:
        found = ", ".join(sorted({e.name or e.path.name for e in entries})) or "none"
        raise ContractError(f"protocol pins model '{pin.name}' (sha256 {pin.sha256[:12]}...), but no model of that name "
                            f"is in {default.parent} (found: {found}); install it there or change the pin")
    match = [e for e in named if e.sha256 == pin.sha256.lower()]
    if not match:
        got = "; ".join(f"{e.path.name} {e.version} sha256 {e.sha256[:12]}..." for e in named)
        raise ContractError(f"protocol pins model '{pin.name}' sha256 {pin.sha256[:12]}..., but {got} differs: "
                            "the file is not the validated model; restore it or update the pin")
    same = [e for e in match if e.path.resolve() == default.resolve()]
    return (same or match)[0].path


class Node:
    """One rtcontrast node.  ``Node(config, protocol).start()``; ``stop()``; or ``run_forever()``.

    The model is loaded in the constructor, so a model with an unknown contract is refused
    (:class:`~rtcontrast.contract.ContractError`) before anything listens.
    """

    def __init__(
        self,
        config: NodeConfig,
        protocol: ProtocolConfig,
        *,
        model: QMapModel | None = None,
        protocol_path: Path | None = None,
    ) -> None:
        self.config = config
        self.protocol = protocol
        #: The file :meth:`reload` reads (None: embedded defaults, nothing to reload).
        self.protocol_path = protocol_path
        self._protocol_lock = threading.Lock()
        self.model = model or QMapModel(resolve_model(config, protocol), config.execution_provider)
        check_model_pin(self.model, protocol.model)
        log.info(
            "model %s %s sha256 %s on %s (%s); TE %g-%g ms, TR %g-%g ms",
            self.model.info.name, self.model.info.version, self.model.sha256[:12], self.model.provider,
            self.model.path, *self.model.info.te_range_ms, *self.model.info.tr_range_ms,
        )
        self.destinations: dict[str, Destination] = self._destinations_of(protocol)
        self.metrics = NodeMetrics()
        self.metrics.set_model(self.model.info.name, self.model.info.version, self.model.sha256, self.model.provider)
        self.metrics.set_protocol(protocol.audit_version, len(protocol.recipes))
        self.metrics.set_destinations(list(self.destinations))
        self.metrics_port: int | None = None
        self._reload_requested = threading.Event()
        self._stop_wait = threading.Event()  # wakes run_forever's loop (signals)
        self._enqueued: set[int] = set()  # job ids in the work queue or running
        self._enqueued_lock = threading.Lock()
        self._scheduler_beat = time.monotonic()
        self.tracker = SeriesTracker(config.series_idle_timeout_s, config.release_grace_s)
        self._first_due: dict[tuple[str, str], float] = {}  # fusion: when a series first completed
        self._work: queue.Queue[int | None] = queue.Queue()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._busy = threading.Event()  # the worker is running a job
        self._started = False
        self.scp: StorageSCP | None = None
        self.sender: Sender | None = None

    def _destinations_of(self, protocol: ProtocolConfig) -> dict[str, Destination]:
        out: dict[str, Destination] = {}
        for name, dest in build_destinations(protocol, self.config.ae_title).items():
            if isinstance(dest, FolderDestination) and Path(dest.path) == _DEFAULT_EXPORT:
                dest = FolderDestination(name=name, path=self.config.export_path)
            out[name] = dest
        return out

    def job_dir(self, job_id: int) -> Path:
        """The job's folder (QA preview): ``<var_dir>/jobs/<job_id>``."""
        return self.config.var_dir / "jobs" / str(job_id)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Open the stores, resume unfinished work, start the threads and listen."""
        if self._started:
            raise RuntimeError("node already started")
        c = self.config
        c.var_dir.mkdir(parents=True, exist_ok=True)
        self.spool = Spool(c.spool_path, c.limits.min_free_disk_bytes)
        self.spool.remove_partial()
        self.jobs_conn = db.connect(c.db_file)
        self.jobs = JobStore(self.jobs_conn)
        self.outbox_conn = db.connect(c.db_file)
        self.outbox = MeteredOutbox(self.outbox_conn, c.outbox_path, self.metrics)
        d = c.delivery
        self.sender = Sender(
            self.outbox,
            self.destinations,
            RetryPolicy(max_attempts=d.max_attempts, base_delay_s=d.base_delay_s, max_delay_s=d.max_delay_s),
            poll_interval_s=d.poll_interval_s,
        )
        self.ctx = PipelineContext(
            protocol=self.protocol,
            model=self.model,
            node=node_identity(
                ae_title=c.ae_title,
                model=self.model,
                manufacturer=c.identity.manufacturer,
                model_name=c.identity.model_name,
                station_name=c.identity.station_name,
                device_serial_number=c.identity.device_serial_number,
                institution_name=c.identity.institution_name,
                uid_root=c.uid_root,
            ),
            jobs=self.jobs,
            outbox=self.outbox,
            on_enqueued=self.sender.wake,
            job_dir=self.job_dir,
        )
        self._work = queue.Queue()
        self._enqueued = set()
        self._resume()
        self._stop.clear()
        for name, target in (("scheduler", self._scheduler_loop), ("worker", self._worker_loop)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._started = True  # from here on stop() has threads to end, even if listening fails
        self.sender.start()
        self.scp = StorageSCP(
            ScpSettings.from_config(c),  # listener(s), TLS, allow-lists, limits
            self.spool,
            on_stored=self._on_stored,
            on_released=self._on_released,
        )
        self.scp.start()
        if c.metrics.enabled and self.metrics_port is None:
            self.metrics.add_snapshot_source(lambda: read_snapshot(c.db_file, c.var_dir))
            try:
                self.metrics_port = self.metrics.serve(c.metrics.host, c.metrics.port)
            except OSError as exc:  # the node's job is DICOM; a taken metrics port must not stop it
                log.error("metrics endpoint %s:%d not served: %s", c.metrics.host, c.metrics.port, exc)
        log.info(
            "listening on %s:%d as %s (protocol %s: %d recipe(s), destinations %s)",
            c.bind_host, self.scp.port, c.ae_title, self.protocol.audit_version, len(self.protocol.recipes),
            ", ".join(sorted(self.destinations)) or "none",
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop listening, let the worker finish its job (bounded), stop the sender, close."""
        if not self._started:
            return
        log.info("stopping")
        if self.scp is not None:
            self.scp.stop()
        self._stop.set()
        self._wake.set()
        self._work.put(None)
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.1, deadline - time.monotonic()))
            if t.is_alive():
                log.warning("%s thread still busy at shutdown; its job resumes at the next start", t.name)
        self._threads.clear()
        if self.sender is not None:
            self.sender.stop(max(0.1, deadline - time.monotonic()))
        self.metrics.stop()
        self.metrics_port = None
        if not any(t.is_alive() for t in threading.enumerate() if t.name == "worker"):
            self.jobs_conn.close()
            self.outbox_conn.close()
        self._started = False
        log.info("stopped")

    def run_forever(self) -> None:
        """Start, then block until SIGTERM/SIGINT (or :meth:`request_stop`), then stop cleanly.

        Under systemd (``$NOTIFY_SOCKET``): READY=1 once the SCP listens, WATCHDOG=1 while
        :meth:`healthy`, STOPPING=1 at shutdown.  SIGHUP reloads the protocol (the signal
        handler only sets a flag; the reload runs in this loop, not in the handler).
        """
        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("received %s", signal.Signals(signum).name)
            self._stop.set()
            self._stop_wait.set()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            self._reload_requested.set()
            self._stop_wait.set()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        old[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
        watchdog = sd.Watchdog()
        try:
            self.start()
            sd.notify(f"READY=1\nSTATUS=listening on port {self.port}, protocol {self.protocol.audit_version}"
                      f"\nMAINPID={os.getpid()}")
            if watchdog.enabled:
                log.info("systemd watchdog: %.0f s, pinging every %.1f s while healthy",
                         watchdog.timeout_s, watchdog.period_s)
            while not self._stop.is_set():
                if self._reload_requested.is_set():
                    self._reload_requested.clear()
                    sd.notify("STATUS=reloading protocol")
                    self.reload()
                    sd.notify(f"STATUS=listening on port {self.port}, protocol {self.protocol.audit_version}")
                watchdog.maybe_ping(self.healthy())
                self._stop_wait.wait(min(1.0, watchdog.period_s))
                self._stop_wait.clear()
        finally:
            sd.notify("STOPPING=1")
            self.stop()
            for s, h in old.items():
                signal.signal(s, h)

    def healthy(self) -> bool:
        """Every thread alive and the scheduler looping (what feeds the systemd watchdog)."""
        if not self._started or self._stop.is_set():
            return False
        if any(not t.is_alive() for t in self._threads):
            return False
        if self.sender is None or not self.sender.running:
            return False
        if self.scp is None:
            return False
        return time.monotonic() - self._scheduler_beat < _SCHEDULER_STALL_S

    # ------------------------------------------------------------------ protocol reload
    def reload(self, path: Path | None = None) -> bool:
        """Re-read the protocol file; True when the new one is in force.

        A valid file replaces the protocol atomically (under a lock) for every job that
        starts from now on; a job already running keeps the protocol it started with.
        An invalid file is refused with every ``file:line: field: message`` logged, and
        the old protocol stays.  New destinations are added to the sender; destinations
        no longer named are kept so their pending items can still be delivered.
        """
        path = path or self.protocol_path
        if path is None:
            log.warning("reload requested but the node runs on the embedded default protocol: nothing to reload")
            return False
        try:
            new = load_protocol(path)
            dests = self._destinations_of(new)
            check_model_pin(self.model, new.model)  # a new pin must name the loaded model (ContractError)
        except (ConfigError, OSError, ValueError) as exc:
            errors = exc.errors if isinstance(exc, ConfigError) else [f"{path}: {exc}"]
            for e in errors:
                log.error("protocol reload: %s", e)
            log.error("protocol reload refused (%d error(s)): protocol %s stays in force",
                      len(errors), self.protocol.audit_version)
            self.metrics.protocol_reloads.labels("rejected").inc()
            return False
        old = self.protocol
        with self._protocol_lock:
            self.protocol = new
            self.destinations = {**self.destinations, **dests}
            if self.sender is not None:
                self.sender.destinations = self.destinations
            if getattr(self, "ctx", None) is not None:
                self.ctx.protocol = new
        self.metrics.set_protocol(new.audit_version, len(new.recipes))
        self.metrics.set_destinations(list(dests))
        self.metrics.protocol_reloads.labels("ok").inc()
        log.info("protocol reloaded from %s: %s -> %s (%d recipe(s), destinations %s); applies to the next job",
                 path, old.audit_version, new.audit_version, len(new.recipes), ", ".join(sorted(new.destinations)))
        return True

    def request_reload(self) -> None:
        """Ask :meth:`run_forever` to reload the protocol (what SIGHUP does)."""
        self._reload_requested.set()
        self._stop_wait.set()

    def request_stop(self) -> None:
        """Make :meth:`run_forever` return (thread-safe)."""
        self._stop.set()
        self._stop_wait.set()

    @property
    def port(self) -> int:
        """The bound DICOM port (useful with port 0)."""
        return self.scp.port if self.scp is not None else self.config.port

    def __enter__(self) -> Node:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ receive side
    def _on_stored(self, inst: StoredInstance) -> None:
        self.jobs.record_instance(inst)
        self.metrics.instances_received.inc()
        self.tracker.touch(inst.study_uid, inst.series_uid, time.monotonic())

    def _on_released(self, keys: set[tuple[str, str]]) -> None:
        self.tracker.released(keys, time.monotonic())
        self._wake.set()

    # ------------------------------------------------------------------ restart
    def _resume(self) -> None:
        rerun = [j for j in self.jobs.unfinished_jobs() if j.state in _RERUN_STATES]
        for j in rerun:
            log.info("resuming job %d series %s (was %s): re-running from assembly", j.id, j.series_uid, j.state)
            self.jobs.audit(j.id, "resumed", {"state": j.state})
            self._enqueue(j.id)
        now = time.monotonic()
        open_series = self.jobs.series_with_unconsumed_instances()
        for study, series in open_series:
            self.tracker.touch(study, series, now)
        pending = sum(v["pending"] for v in self.outbox.counts().values())
        if rerun or open_series or pending:
            log.info(
                "restart: %d job(s) re-run, %d series awaiting completion, %d outbox item(s) pending",
                len(rerun), len(open_series), pending,
            )

    # ------------------------------------------------------------------ threads
    def _enqueue(self, job_id: int) -> None:
        with self._enqueued_lock:
            self._enqueued.add(job_id)
        self._work.put(job_id)

    def _pick_up_released(self) -> None:
        """Jobs put back to ``received`` from outside (``node.py release``) go to the worker."""
        for j in self.jobs.unfinished_jobs():
            if j.state != "received":
                continue
            with self._enqueued_lock:
                known = j.id in self._enqueued
            if not known:
                log.info("job %d series %s released by an admin: re-running", j.id, j.series_uid)
                self._enqueue(j.id)

    def purge(self, dry_run: bool = False) -> Any:
        """Retention now (see :func:`rtcontrast.retention.purge`); the report."""
        from rtcontrast.retention import purge

        return purge(
            self.config.db_file, spool_root=self.config.spool_path, outbox_root=self.config.outbox_path,
            jobs_root=self.config.var_dir / "jobs", export_dirs=_export_dirs(self.destinations),
            retention_days=self.config.retention_days, dry_run=dry_run,
        )

    def _scheduler_loop(self) -> None:
        last_monitor = 0.0
        last_prune = time.monotonic() - _PRUNE_INTERVAL_S + 60.0  # first purge a minute after start
        while not self._stop.is_set():
            self._scheduler_beat = time.monotonic()
            try:
                now = time.monotonic()
                for study, series in self.tracker.due(now):
                    if self._wait_for_partner(study, series, now):
                        continue
                    # partners that were waiting for this series go with it: all jobs exist before any runs
                    group = [series, *self._release_waiting_partners(study, series)]
                    created = [(s, self.jobs.create_job(study, s)) for s in group]
                    for s, job_id in created:
                        if job_id is not None:
                            log.info("series %s complete: job %d created", s, job_id)
                            self.metrics.series_completed.inc()
                            self._enqueue(job_id)
                if now - last_monitor >= _MONITOR_INTERVAL_S:
                    last_monitor = now
                    self._check_deliveries()
                    self._pick_up_released()
                if now - last_prune >= _PRUNE_INTERVAL_S:
                    last_prune = now
                    self.purge()
            except Exception:  # keep scheduling; the failure is in the log
                log.exception("scheduler iteration failed")
            nxt = self.tracker.next_deadline()
            wait = _MONITOR_INTERVAL_S if nxt is None else min(_MONITOR_INTERVAL_S, max(0.01, nxt - time.monotonic()))
            self._wake.wait(wait)
            self._wake.clear()

    def _wait_for_partner(self, study: str, series: str, now: float) -> bool:
        """Fusion: hold a complete series a while for a partner series of the same study.

        Waits while another series of the study is still arriving (until it completes),
        or, when the study has no other series yet, up to ``fusion.wait_for_partner_s``.
        """
        rules = self.protocol.fusion
        if not (rules.enabled and rules.wait_for_partner_s > 0 and self.model.info.fusion):
            return False
        key = (study, series)
        first = self._first_due.setdefault(key, now)
        if now - first >= rules.wait_for_partner_s:
            self._first_due.pop(key, None)
            return False
        others = [s for s in self.jobs.series_in_study(study) if s != series]
        arriving = [s for s in others
                    if self.tracker.deadline(study, s) is not None and (study, s) not in self._first_due]
        if others and not arriving:
            self._first_due.pop(key, None)
            return False  # every partner is complete (processed, or waiting for this one)
        until = min(first + rules.wait_for_partner_s, now + 1.0)
        if now == first:
            log.info("series %s complete: waiting up to %g s for a partner series (fusion)", series,
                     rules.wait_for_partner_s)
        self.tracker.defer(study, series, until)
        return True

    def _release_waiting_partners(self, study: str, series: str) -> list[str]:
        """Series of ``study`` that were waiting for a partner: they go now, with ``series``."""
        out = [s for (st, s) in list(self._first_due) if st == study and s != series]
        for s in out:
            self._first_due.pop((study, s), None)
            self.tracker.discard(study, s)
        return out

    def _check_deliveries(self) -> None:
        for job in self.jobs.unfinished_jobs():
            if job.state != "queued":
                continue
            counts = self.outbox.job_counts(job.id)
            if counts["pending"]:
                continue
            if counts["dead_letter"]:
                reason = f"{counts['dead_letter']} instance(s) dead-lettered (see node.py status / resend)"
                if job.reason != reason:
                    log.error("job %d series %s: %s", job.id, job.series_uid, reason)
                    self.jobs.set_state(job.id, "queued", reason)
                continue
            self.jobs.set_state(job.id, "delivered")
            self.metrics.jobs_finished.labels("delivered").inc()
            log.info("job %d series %s delivered: %d instance(s)", job.id, job.series_uid, counts["delivered"])

    def _superseded_by(self, job_id: int) -> int | None:
        job = self.jobs.job(job_id)
        if job is None:
            return None
        newer = [j.id for j in self.jobs.jobs_for_series(job.study_uid, job.series_uid) if j.id > job_id]
        return max(newer) if newer else None

    def _worker_loop(self) -> None:
        while not self._stop.is_set():
            job_id = self._work.get()
            if job_id is None or self._stop.is_set():
                break
            self._busy.set()
            try:
                newer = self._superseded_by(job_id)
                if newer is not None:
                    log.info("job %d superseded by job %d (same series, newer instances)", job_id, newer)
                    self.jobs.set_state(job_id, "failed", f"superseded by job {newer}")
                    self.metrics.jobs_finished.labels("failed").inc()
                    continue
                with self._protocol_lock:  # the job keeps this protocol even if a reload comes
                    ctx = dataclasses.replace(self.ctx, hold_override=self._released(job_id))
                result = run_job(ctx, job_id)
                self.metrics.observe_job(result.state, result.timings_s)
            except Exception:
                log.exception("job %d failed unexpectedly", job_id)
                self.metrics.jobs_finished.labels("failed").inc()
            finally:
                with self._enqueued_lock:
                    self._enqueued.discard(job_id)
                self._busy.clear()
                self._work.task_done()

    def _released(self, job_id: int) -> bool:
        """An admin released this job since it was last held (QA hold overridden)."""
        events = [e.event for e in self.jobs.audit_events(job_id) if e.event in ("released", "held")]
        return bool(events) and events[-1] == "released"

    # ------------------------------------------------------------------ for tests and status
    def idle(self) -> bool:
        """Nothing open, queued, running or pending delivery (tests wait for this)."""
        if self.tracker.pending() or not self._work.empty() or self._busy.is_set():
            return False
        if any(j.state in _RERUN_STATES or j.state == "queued" for j in self.jobs.unfinished_jobs()):
            return False
        return True

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until :meth:`idle` (True) or ``timeout_s`` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.idle():
                return True
            time.sleep(0.1)
        return self.idle()


# ---------------------------------------------------------------------- status / resend


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
        out.append(f"held for an admin: {len(self.held_jobs)}" + (" (node.py release --job N)" if self.held_jobs else ""))
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


def _export_dirs(destinations: dict[str, Destination]) -> dict[str, Path]:
    return {n: Path(d.path) for n, d in destinations.items() if isinstance(d, FolderDestination)}


def read_status(config: NodeConfig, n_jobs: int = 10) -> NodeStatus:
    """Read the node's state from its database (safe while the node runs: WAL readers)."""
    conn = db.connect(config.db_file)
    try:
        jobs = JobStore(conn)
        outbox = Outbox(conn, config.outbox_path)
        by_state = {r[0]: int(r[1]) for r in conn.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state")}
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
                for j in jobs.recent_jobs(1000) if j.state == "held"]
        audit = [
            {"ts": r["ts"], "job_id": r["job_id"], "event": r["event"], "detail": r["detail_json"] or ""}
            for r in conn.execute("SELECT ts, job_id, event, detail_json FROM audit ORDER BY id DESC LIMIT 5")
        ]
    finally:
        conn.close()
    try:
        free: int | None = int(shutil.disk_usage(config.spool_path if config.spool_path.exists() else config.var_dir).free)
    except OSError:
        free = None
    return NodeStatus(config.db_file, queues, recent, dead, config.spool_path, free, by_state,
                      disk=_disk(config), held_jobs=held, recent_audit=audit)


def resend_dead_letters(config: NodeConfig, destination: str | None = None, job_id: int | None = None) -> int:
    """Put dead letters back to pending (a running node's sender picks them up); how many."""
    conn = db.connect(config.db_file)
    try:
        return Outbox(conn, config.outbox_path).retry_dead(destination=destination, job_id=job_id)
    finally:
        conn.close()


def release_job(config: NodeConfig, job_id: int, note: str | None = None) -> str:
    """Release a held job: back to ``received`` with a ``released`` audit event.

    A running node's scheduler picks it up within a second and re-runs it with the QA
    hold overridden (the images are sent flagged as a QA warning); a stopped node does at
    its next start.  The job runs with the protocol in force then.  Raises ValueError
    when the job does not exist or is not held.
    """
    conn = db.connect(config.db_file)
    try:
        jobs = JobStore(conn)
        job = jobs.job(job_id)
        if job is None:
            raise ValueError(f"no job {job_id}")
        if job.state != "held":
            raise ValueError(f"job {job_id} is {job.state}, not held: only held jobs are released")
        jobs.audit(job_id, "released", {"previous_reason": job.reason, **({"note": note} if note else {})})
        jobs.set_state(job_id, "received", "released by an admin (QA hold overridden)")
        return job.series_uid
    finally:
        conn.close()


# ---------------------------------------------------------------------- CLI commands
# node.py (the entry point) is argparse only; the commands live here so they are testable.

_SHIPPED_NODE = Path("config/node.yaml")
_SHIPPED_PROTOCOL = Path("config/protocol.yaml")


def _load(config_path: Path | None, protocol_path: Path | None) -> tuple[NodeConfig, ProtocolConfig]:
    from rtcontrast.config import load_node_config
    from rtcontrast.protocol import load_protocol

    errors: list[str] = []
    config = protocol = None
    try:
        config = load_node_config(config_path)
    except ConfigError as exc:
        errors.extend(exc.errors)
    try:
        protocol = load_protocol(protocol_path)
    except ConfigError as exc:
        errors.extend(exc.errors)
    if errors:
        raise ConfigError(errors)
    assert config is not None and protocol is not None
    return config, protocol


def check_config(config_path: Path | None, protocol_path: Path | None) -> tuple[list[str], str]:
    """Validate node config, protocol and the model's contract: (errors, one-line summary).

    Each error reads ``file:line: field: message``.  ``None`` paths mean the embedded
    defaults.
    """
    from rtcontrast.config import line_of, read_yaml

    try:
        config, protocol = _load(config_path, protocol_path)
    except ConfigError as exc:
        return exc.errors, ""
    try:
        model_file = resolve_model(config, protocol)
    except ContractError as exc:
        where = "(embedded defaults):1"
        if protocol_path is not None:
            _, lines = read_yaml(Path(protocol_path))
            where = f"{protocol_path}:{line_of(lines, ('model',))}"
        return [f"{where}: model: {exc}"], ""
    try:
        model = QMapModel(model_file, "cpu" if config.execution_provider == "auto" else config.execution_provider)
    except (ContractError, RuntimeError) as exc:
        where = "(embedded defaults):1"
        if config_path is not None:
            _, lines = read_yaml(Path(config_path))
            where = f"{config_path}:{line_of(lines, ('model_path',))}"
        return [f"{where}: model_path: {exc}"], ""
    summary = (
        f"OK: node {config_path or '(embedded defaults)'} (AE {config.ae_title}, port {config.port}, "
        f"var {config.var_dir}); protocol {protocol_path or '(embedded defaults)'} ({protocol.audit_version}, "
        f"{len(protocol.recipes)} recipe(s), destinations {', '.join(sorted(protocol.destinations))}); "
        f"model {model.info.name} {model.info.version} sha256 {model.sha256[:12]}"
    )
    return [], summary


def _config_errors(exc: ConfigError) -> int:
    """Print every configuration error (file:line: field: message); the exit code 2."""
    for e in exc.errors:
        print(e, file=sys.stderr)
    return 2


def _admin_config(config_path: Path | None, need_db: bool = True) -> NodeConfig | int:
    """The node config for an admin command, or the exit code after printing why not.

    2: the configuration is invalid (every error printed); 1: the node has no database
    yet (it never ran with this configuration), when the command needs one.
    """
    try:
        config, _ = _load(config_path, None)
    except ConfigError as exc:
        return _config_errors(exc)
    if need_db and not config.db_file.exists():
        print(f"no database at {config.db_file}: the node has not run with this configuration yet", file=sys.stderr)
        return 1
    return config


def cmd_check_config(config_path: Path | None, protocol_path: Path | None) -> int:
    """``node.py check-config``: shipped files by default; exit 1 and every error when wrong."""
    if config_path is None and _SHIPPED_NODE.exists():
        config_path = _SHIPPED_NODE
    if protocol_path is None and _SHIPPED_PROTOCOL.exists():
        protocol_path = _SHIPPED_PROTOCOL
    errors, summary = check_config(config_path, protocol_path)
    if errors:
        for e in errors:
            print(e, file=sys.stderr)
        print(f"{len(errors)} error(s)", file=sys.stderr)
        return 1
    print(summary)
    return 0


def cmd_run(config_path: Path | None, protocol_path: Path | None, port: int | None = None) -> int:
    """``node.py run``: embedded defaults unless files are given; blocks until SIGTERM/SIGINT."""
    from rtcontrast.logs import setup_logging

    try:
        config, protocol = _load(config_path, protocol_path)
    except ConfigError as exc:
        return _config_errors(exc)
    if port is not None:
        config.port = port
    setup_logging(config.log_format, config.log_level)
    log.info(
        "rtcontrast %s starting: node config %s, protocol %s",
        __version__, config_path or "(embedded defaults)", protocol_path or "(embedded defaults)",
    )
    try:
        node = Node(config, protocol, protocol_path=protocol_path)
    except (ContractError, RuntimeError) as exc:
        log.error("model refused: %s", exc)
        return 3
    try:
        node.run_forever()
    except OSError as exc:  # e.g. the port is taken
        log.error("cannot run: %s", exc)
        return 1
    return 0


def cmd_status(config_path: Path | None, n_jobs: int = 10) -> int:
    """``node.py status``: queues, recent jobs, dead letters, spool free space."""
    config = _admin_config(config_path)
    if isinstance(config, int):
        return config
    print(read_status(config, n_jobs).render())
    return 0


def cmd_resend(config_path: Path | None, destination: str | None, job_id: int | None) -> int:
    """``node.py resend``: dead letters back to pending (optionally one destination / job)."""
    config = _admin_config(config_path)
    if isinstance(config, int):
        return config
    n = resend_dead_letters(config, destination, job_id)
    print(f"{n} dead letter(s) put back to pending"
          + (f" for destination {destination}" if destination else "") + (f" of job {job_id}" if job_id else ""))
    return 0


def cmd_release(config_path: Path | None, job_id: int, note: str | None = None) -> int:
    """``node.py release --job N``: send a held job (re-run with the QA hold overridden)."""
    config = _admin_config(config_path)
    if isinstance(config, int):
        return config
    try:
        series = release_job(config, job_id, note)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"job {job_id} (series {series}) released: the running node re-runs it within seconds "
          "(or at its next start) and sends it flagged as a QA warning")
    return 0


def cmd_purge(config_path: Path | None, protocol_path: Path | None, dry_run: bool) -> int:
    """``node.py purge [--dry-run]``: retention now (the node also runs it hourly)."""
    from rtcontrast.retention import purge

    try:
        config, protocol = _load(config_path, protocol_path)
    except ConfigError as exc:
        return _config_errors(exc)
    if not config.db_file.exists():
        print(f"no database at {config.db_file}", file=sys.stderr)
        return 1
    dests: dict[str, Destination] = {}
    for name, dest in build_destinations(protocol, config.ae_title).items():
        if isinstance(dest, FolderDestination) and Path(dest.path) == _DEFAULT_EXPORT:
            dest = FolderDestination(name=name, path=config.export_path)
        dests[name] = dest
    report = purge(
        config.db_file, spool_root=config.spool_path, outbox_root=config.outbox_path,
        jobs_root=config.var_dir / "jobs", export_dirs=_export_dirs(dests),
        retention_days=config.retention_days, dry_run=dry_run,
    )
    print(report.render())
    return 0


def cmd_audit(
    config_path: Path | None,
    study: str | None = None,
    series: str | None = None,
    job_id: int | None = None,
    limit: int = 20,
    as_json: bool = False,
) -> int:
    """``node.py audit``: per job, what came from where, what was made, where it went."""
    import json

    from rtcontrast.audit import audit_trail, render_trails

    config = _admin_config(config_path)
    if isinstance(config, int):
        return config
    trails = audit_trail(config.db_file, study_uid=study, series_uid=series, job_id=job_id, limit=limit)
    if as_json:
        print(json.dumps([t.to_json() for t in trails], indent=2, sort_keys=True))
    else:
        print(render_trails(trails))
    return 0 if trails else 1


def cmd_models(config_path: Path | None, protocol_path: Path | None) -> int:
    """``node.py models``: models/*.onnx with their cards; ``*`` marks the one the node would use."""
    try:
        config, protocol = _load(config_path, protocol_path)
    except ConfigError as exc:
        return _config_errors(exc)
    default = resolve_model_path(config.model_path)
    in_use: Path | None = None
    problem = None
    try:
        in_use = resolve_model(config, protocol)
    except ContractError as exc:
        problem = str(exc)
    entries = list_models(default.parent) if default.parent.is_dir() else []
    print(f"models in {default.parent} (config model_path {config.model_path}"
          + (f"; protocol pins {protocol.model.name} sha256 {protocol.model.sha256[:12]}" if protocol.model else "")
          + ")")
    if not entries:
        print("  (none)")
    for e in entries:
        mark = "*" if in_use is not None and e.path.resolve() == in_use.resolve() else " "
        if e.error:
            print(f"{mark} {e.path.name}: unreadable: {e.error}")
            continue
        card = e.card or {}
        created = str(card.get("created", "-"))[:19]
        print(f"{mark} {e.path.name}: {e.name} {e.version} [{e.contract}] sha256 {e.sha256[:12]} created {created}")
        if e.card is None:
            print("      no model card (NAME.json)")
        elif card.get("sha256") and card["sha256"] != e.sha256:
            print(f"      WARNING: card sha256 {card['sha256'][:12]} differs from the file")
        summ = (card.get("evaluation") or {}).get("summary")
        if summ:
            met = summ.get("met", {})
            print(f"      evaluation: min cross SSIM {summ.get('min_cross_ssim', float('nan')):.3f}, "
                  f"min PSNR {summ.get('min_cross_psnr_db', float('nan')):.1f} dB, "
                  f"max tissue MAE {summ.get('max_tissue_mae_pct', float('nan')):.1f} %, "
                  f"targets met {sum(bool(v) for v in met.values())}/{len(met)}")
        real = (card.get("data") or {}).get("real")
        if real:
            print(f"      fine-tuned on {real.get('series')} real series of {real.get('patients')} patient(s)")
        if card.get("report"):
            print(f"      report: {default.parent / card['report']}")
    if in_use is not None and in_use.parent.resolve() != default.parent.resolve():
        print(f"* in use: {in_use} (outside {default.parent})")
    if problem:
        print(f"ERROR: {problem}", file=sys.stderr)
        return 1
    return 0
