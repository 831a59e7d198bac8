"""The node: receive, complete series, run jobs, deliver — wired together, restartable.

Threads (in one process; with ``receive_processes`` > 1 receiver processes accept too: receive/workers.py):

* the Storage SCP's association threads (pynetdicom) write each instance to the spool,
  record it in the job store and touch its series in the :class:`SeriesTracker`;
* the *scheduler* turns due series into jobs (``create_job``) for the worker, marks
  ``queued`` jobs ``delivered`` once the outbox has delivered all of their instances,
  and prunes delivered outbox rows past ``retention_days``;
* one *worker* runs jobs one at a time (:func:`rtcontrast.node.pipeline.run_job`), smallest
  series first, and a second *small-series lane* worker runs only series of at most
  ``small_series_max_instances`` instances, so a huge series cannot starve the others
  (:mod:`rtcontrast.node.workqueue`; with fusion on, every job goes to the one worker);
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
``metrics.host:port`` (:mod:`rtcontrast.node.ops.metrics`); each job's QA preview goes to
``<var_dir>/jobs/<id>/preview.png``; retention (:mod:`rtcontrast.node.ops.retention`) runs hourly
(and discards holds nobody reviewed within ``held_retention_days``).  The review page
(:mod:`rtcontrast.node.review`, ``review.enabled``) is started and stopped with the node.
A job that a reviewer releases (review page or ``node.py release``: held -> received) is
picked up by the scheduler and re-run with the QA hold overridden.

Paths: relative paths are relative to the working directory.  The model path falls back
to the installation's ``models/`` when the working directory has none (so ``python
node.py run`` finds the shipped model from anywhere), and the protocol's default export
folder (``./var/export``) follows the node's ``export_dir`` (default ``<var_dir>/export``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rtcontrast.core.inference import QMapModel
from rtcontrast.node.dispatch.destinations import Destination, node_destinations
from rtcontrast.node.dispatch.outbox import RetryPolicy
from rtcontrast.node.dispatch.sender import Sender
from rtcontrast.node.ops.metrics import MeteredOutbox, NodeMetrics, read_snapshot
from rtcontrast.node.pipeline import PipelineContext, node_identity, run_job
from rtcontrast.node.receive.scp import ScpSettings, StorageSCP, StoredInstance
from rtcontrast.node.receive.series import SeriesTracker
from rtcontrast.node.receive.spool import Spool
from rtcontrast.node.receive.workers import ReceiverCallbacks, ReceiverPool, start_receivers
from rtcontrast.node.supervise import supervise
from rtcontrast.node.registry import check_model_pin, resolve_model
from rtcontrast.node.retry import retry_delay_s, transient_cause
from rtcontrast.node.workqueue import WorkQueues
from rtcontrast.node.store import db
from rtcontrast.node.store.completeness import SeriesEvents
from rtcontrast.node.store.jobs import RERUN_STATES, JobState, JobStore
from rtcontrast.settings.node import ConfigError, NodeConfig
from rtcontrast.settings.protocol import ProtocolConfig, load_protocol

if TYPE_CHECKING:
    from rtcontrast.node.review.server import ReviewServer

__all__ = ["Node"]

from rtcontrast.node.ops.status import export_dirs

log = logging.getLogger(__name__)

_MONITOR_INTERVAL_S = 0.5
_PRUNE_INTERVAL_S = 3600.0
#: The watchdog is fed only while the scheduler loop ran this recently.
_SCHEDULER_STALL_S = 20.0


class Node:
    """One rtcontrast node.  ``Node(config, protocol).start()``; ``stop()``; or ``run_forever()``.

    The model is loaded in the constructor, so a model with an unknown contract is refused
    (:class:`~rtcontrast.core.contract.ContractError`) before anything listens.
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
        self.metrics.set_health_check(self.healthy)  # GET /healthz on the metrics port
        self.metrics.set_model(self.model.info.name, self.model.info.version, self.model.sha256, self.model.provider)
        self.metrics.set_protocol(protocol.audit_version, len(protocol.recipes))
        self.metrics.set_destinations(list(self.destinations))
        self.metrics_port: int | None = None
        self._reload_requested = threading.Event()
        self._stop_wait = threading.Event()  # wakes run_forever's loop (signals)
        self._enqueued: set[int] = set()  # job ids in the work queue or running
        self._enqueued_lock = threading.Lock()
        self._not_before: dict[int, float] = {}  # job id -> monotonic time of its next transient retry
        self._scheduler_beat = time.monotonic()
        self.tracker = SeriesTracker(config.series_idle_timeout_s, config.release_grace_s)
        self._first_due: dict[tuple[str, str], float] = {}  # fusion: when a series first completed
        self._work = WorkQueues(config.small_series_max_instances)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._handing_out = threading.Event()  # the scheduler is turning due series into jobs
        self._threads: list[threading.Thread] = []
        self._started = False
        self.scp: StorageSCP | None = None
        self.receivers: ReceiverPool | None = None  # receive_processes > 1
        self.sender: Sender | None = None
        self.review: ReviewServer | None = None  # the review page, when enabled

    def _destinations_of(self, protocol: ProtocolConfig) -> dict[str, Destination]:
        return node_destinations(protocol, self.config.ae_title, self.config.export_path)

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
        self.events_conn = db.connect(c.db_file)
        self.series_events = SeriesEvents(self.events_conn)
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
        self._work = WorkQueues(c.small_series_max_instances)
        self._enqueued = set()
        self._resume()
        self._stop.clear()
        loops = [("scheduler", self._scheduler_loop), ("worker", lambda: self._worker_loop("main"))]
        if c.small_series_max_instances:
            loops.append(("worker-small", lambda: self._worker_loop("small")))
        for name, target in loops:
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
            on_association_end=self._on_association_end,
        )
        self.scp.start()
        self.receivers = start_receivers(c, self.scp, ReceiverCallbacks(
            self._on_recorded, self._on_released, self._on_association_end))
        if c.metrics.enabled and self.metrics_port is None:
            self.metrics.add_snapshot_source(lambda: read_snapshot(c.db_file, c.var_dir))
            try:
                self.metrics_port = self.metrics.serve(c.metrics.host, c.metrics.port)
            except OSError as exc:  # the node's job is DICOM; a taken metrics port must not stop it
                log.error("metrics endpoint %s:%d not served: %s", c.metrics.host, c.metrics.port, exc)
        if c.review.enabled and self.review is None:
            self._start_review()
        log.info(
            "listening on %s:%d as %s (protocol %s: %d recipe(s), destinations %s)",
            c.bind_host, self.scp.port, c.ae_title, self.protocol.audit_version, len(self.protocol.recipes),
            ", ".join(sorted(self.destinations)) or "none",
        )

    def _start_review(self) -> None:
        """Serve the review page (imported here: the web stack loads only when it is enabled)."""
        from rtcontrast.node.review.server import ReviewServer

        review = ReviewServer(self.config)
        try:
            review.start()
        except OSError as exc:  # like metrics: a taken port must not stop the DICOM node
            log.error("review page %s:%d not served: %s", self.config.review.host, self.config.review.port, exc)
            return
        self.review = review

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop listening, let the worker finish its job (bounded), stop the sender, close."""
        if not self._started:
            return
        log.info("stopping")
        if self.review is not None:  # no decisions while the node goes down
            self.review.stop()
            self.review = None
        if self.receivers is not None:  # first: they accept from the main process's socket
            self.receivers.stop()
            self.receivers = None
        if self.scp is not None:
            self.scp.stop()
        self._stop.set()
        self._wake.set()
        self._work.stop()
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
        if not any(t.is_alive() for t in threading.enumerate() if t.name.startswith("worker")):
            self.jobs_conn.close()
            self.events_conn.close()
            self.outbox_conn.close()
        self._started = False
        log.info("stopped")

    def run_forever(self) -> None:
        """Start, block until SIGTERM/SIGINT (or :meth:`request_stop`), stop cleanly (:func:`supervise`)."""
        supervise(self)

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
        self._on_recorded(inst.study_uid, inst.series_uid)

    def _on_recorded(self, study_uid: str, series_uid: str) -> None:
        """An instance is in the spool and the database (this process's SCP or a receiver process)."""
        self.metrics.instances_received.inc()
        self.tracker.touch(study_uid, series_uid, time.monotonic())

    def _on_association_end(
        self, outcome: str, series: set[tuple[str, str]],
        refusals: list[tuple[tuple[str, str] | None, str | None, int]],
    ) -> None:
        """Completeness: record aborts and refusals per series; such a series gets no release grace."""
        for key, missing in self.series_events.record_association(outcome, series, refusals).items():
            self.tracker.suspect(key, bool(missing))
            if missing:
                log.warning("series %s: %s; it completes by the idle timeout only", key[1], missing.summary())

    def _on_released(self, keys: set[tuple[str, str]]) -> None:
        self.tracker.released(keys, time.monotonic())
        self._wake.set()

    # ------------------------------------------------------------------ restart
    def _resume(self) -> None:
        rerun = [j for j in self.jobs.unfinished_jobs() if j.state in RERUN_STATES]
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
        job = self.jobs.job(job_id)
        fusion = self.protocol.fusion.enabled and self.model.info.fusion  # fusion decisions assume one worker
        self._work.put(job_id, job.instance_count if job is not None else 0, lane_allowed=not fusion)

    def _pick_up_released(self) -> None:
        """Jobs in a re-run state that no worker holds go to one: ``node.py release`` / ``retry``,
        and transient failures whose backoff (``retry_at``) has passed."""
        now_iso = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        for j in self.jobs.unfinished_jobs():
            if j.state not in RERUN_STATES:
                continue
            with self._enqueued_lock:
                known = j.id in self._enqueued
            if known:
                continue
            if (j.retry_at and j.retry_at > now_iso) or self._not_before.get(j.id, 0.0) > time.monotonic():
                continue
            if j.retry_count:
                log.info("job %d series %s: retry %d after a transient failure", j.id, j.series_uid, j.retry_count)
            else:
                log.info("job %d series %s put back by an admin: re-running", j.id, j.series_uid)
            self._enqueue(j.id)

    def _schedule_retry(self, job_id: int, exc: BaseException, cause: str) -> None:
        """A transient failure: put the job back with capped exponential backoff, never fail it."""
        job = self.jobs.job(job_id)
        n = (job.retry_count if job is not None else 0) + 1
        delay = retry_delay_s(n)
        self._not_before[job_id] = time.monotonic() + delay  # also holds if the database write below fails
        self.metrics.job_retries.labels(cause).inc()
        log.warning("job %d: transient failure (%s: %s): retry %d in %.0f s; nothing received is lost",
                    job_id, cause, exc, n, delay)
        at = datetime.fromtimestamp(time.time() + delay, timezone.utc).isoformat(timespec="microseconds")
        try:
            self.jobs.set_state(job_id, JobState.RECEIVED, f"transient failure ({cause}): {exc}; retry {n} at {at}",
                                retry_count=n, retry_at=at)
        except Exception as db_exc:  # the database itself may be what is full; memory keeps the backoff
            log.warning("job %d: could not record the retry (%s); it stays due in memory", job_id, db_exc)

    def purge(self, dry_run: bool = False) -> Any:
        """Retention now (see :func:`rtcontrast.node.ops.retention.purge`); the report."""
        from rtcontrast.node.ops.retention import purge

        return purge(
            self.config.db_file, spool_root=self.config.spool_path, outbox_root=self.config.outbox_path,
            jobs_root=self.config.var_dir / "jobs", export_dirs=export_dirs(self.destinations),
            retention_days=self.config.retention_days, held_retention_days=self.config.held_retention_days,
            dry_run=dry_run,
        )

    def _scheduler_loop(self) -> None:
        last_monitor = 0.0
        last_prune = time.monotonic() - _PRUNE_INTERVAL_S + 60.0  # first purge a minute after start
        while not self._stop.is_set():
            self._scheduler_beat = time.monotonic()
            try:
                now = time.monotonic()
                self._handing_out.set()  # idle() must not see a series between due() and its job
                for study, series in self.tracker.due(now):
                    if self._wait_for_partner(study, series, now):
                        continue
                    # partners that were waiting for this series go with it: all jobs exist before any runs
                    group = [series, *self._release_waiting_partners(study, series)]
                    missing = {s: self.series_events.outstanding(study, s) for s in group}
                    created = [(s, self.jobs.create_job(study, s)) for s in group]
                    for s, job_id in created:
                        if job_id is None:
                            continue
                        if missing[s]:  # never presented as complete: held with the counts
                            log.warning("series %s: job %d held: %s", s, job_id, missing[s].reason())
                            self.jobs.set_state(job_id, JobState.HELD, missing[s].reason())
                            self.metrics.jobs_finished.labels(JobState.HELD).inc()
                            continue
                        log.info("series %s complete: job %d created", s, job_id)
                        self.metrics.series_completed.inc()
                        self._enqueue(job_id)
                self._handing_out.clear()
                if now - last_monitor >= _MONITOR_INTERVAL_S:
                    last_monitor = now
                    self._check_deliveries()
                    self._pick_up_released()
                if now - last_prune >= _PRUNE_INTERVAL_S:
                    last_prune = now
                    self.purge()
            except Exception:  # keep scheduling; the failure is in the log
                self._handing_out.clear()
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
            if job.state != JobState.QUEUED:
                continue
            counts = self.outbox.job_counts(job.id)
            if counts["pending"]:
                continue
            if counts["dead_letter"]:
                reason = f"{counts['dead_letter']} instance(s) dead-lettered (see node.py status / resend)"
                if job.reason != reason:
                    log.error("job %d series %s: %s", job.id, job.series_uid, reason)
                    self.jobs.set_state(job.id, JobState.QUEUED, reason)
                continue
            self.jobs.set_state(job.id, JobState.DELIVERED)
            self.metrics.jobs_finished.labels(JobState.DELIVERED).inc()
            log.info("job %d series %s delivered: %d instance(s)", job.id, job.series_uid, counts["delivered"])

    def _superseded_by(self, job_id: int) -> int | None:
        job = self.jobs.job(job_id)
        if job is None:
            return None
        newer = [j.id for j in self.jobs.jobs_for_series(job.study_uid, job.series_uid) if j.id > job_id]
        return max(newer) if newer else None

    def _worker_loop(self, lane: str) -> None:
        while not self._stop.is_set():
            job_id = self._work.get(lane)
            if job_id is None or self._stop.is_set():
                break
            try:
                newer = self._superseded_by(job_id)
                if newer is not None:
                    log.info("job %d superseded by job %d (same series, newer instances)", job_id, newer)
                    self.jobs.set_state(job_id, JobState.FAILED, f"superseded by job {newer}")
                    self.metrics.jobs_finished.labels(JobState.FAILED).inc()
                    continue
                job = self.jobs.job(job_id)
                with self._protocol_lock:  # the job keeps this protocol even if a reload comes
                    ctx = dataclasses.replace(self.ctx, hold_override=bool(job and job.hold_override))
                result = run_job(ctx, job_id)
                self.metrics.observe_job(result.state, result.timings_s)
                self._not_before.pop(job_id, None)
            except Exception as exc:
                cause = transient_cause(exc)
                if cause is not None:
                    self._schedule_retry(job_id, exc, cause)
                else:
                    log.exception("job %d failed unexpectedly", job_id)
                    self.metrics.jobs_finished.labels(JobState.FAILED).inc()
            finally:
                with self._enqueued_lock:
                    self._enqueued.discard(job_id)
                self._work.done()

    # ------------------------------------------------------------------ for tests and status
    def idle(self) -> bool:
        """Nothing open, queued, running or pending delivery (tests wait for this)."""
        if self._handing_out.is_set() or self.tracker.pending() or not self._work.idle():
            return False
        if any(j.state in RERUN_STATES or j.state == JobState.QUEUED for j in self.jobs.unfinished_jobs()):
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


