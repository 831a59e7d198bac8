"""Sending outbox items: C-STORE to DICOM peers (TLS, TCP_NODELAY, every status checked) and copies to folders.

The :class:`Sender` thread claims due items from the :class:`~rtcontrast.node.dispatch.outbox.Outbox`,
sends them per destination in presentation-context chunks, and records each outcome;
the outbox decides retries and dead letters from those outcomes.  A DICOM destination with
``max_associations`` k > 1 gets a batch as up to k contiguous parts sent at once, each over
its own association(s), so that a peer's per-instance latency (a TPS that fsyncs each
instance before answering) overlaps; the outcomes are merged back in item order.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import (
    UID,
)
from pynetdicom import AE, evt
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from rtcontrast.node.durable import set_nodelay
from rtcontrast.node.dispatch.destinations import (
    Destination,
    DicomDestination,
    FolderDestination,
)
from rtcontrast.node.dispatch.outbox import (
    _UNCOMPRESSED, MAX_CONTEXTS, WARNING_STATUSES, Outbox, OutboxItem, Outcome, RetryPolicy, atomic_copy,
)

log = logging.getLogger(__name__)


# -- sending -----------------------------------------------------------------------
def _set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: turn Nagle off (DCMTK peers otherwise stall ~40 ms per PDU)."""
    set_nodelay(event)


def _contexts_for(ts: str) -> list[str]:
    """Transfer syntaxes to offer for a file in ``ts``: uncompressed files may be converted."""
    if UID(ts) in _UNCOMPRESSED:
        return [ts] + [str(t) for t in _UNCOMPRESSED if t != ts]
    return [ts]


def _chunks_by_context(items: Sequence[OutboxItem]) -> list[list[OutboxItem]]:
    """Split items so that no association needs more than MAX_CONTEXTS contexts."""
    chunks: list[list[OutboxItem]] = []
    current: list[OutboxItem] = []
    keys: set[tuple[str, str]] = set()
    for it in items:
        key = (it.sop_class_uid, it.transfer_syntax_uid)
        if key not in keys and len(keys) >= MAX_CONTEXTS:
            chunks.append(current)
            current, keys = [], set()
        keys.add(key)
        current.append(it)
    if current:
        chunks.append(current)
    return chunks


class _RecordingSSLSocket(ssl.SSLSocket):
    """Keeps the handshake error on its context: pynetdicom only logs it, we report it."""

    def connect(self, addr: object) -> None:  # type: ignore[override]
        try:
            super().connect(addr)  # type: ignore[arg-type]
        except OSError as exc:
            ctx = self.context
            if isinstance(ctx, _ClientContext):
                ctx.handshake_error = exc
            raise


class _ClientContext(ssl.SSLContext):
    """A client TLS context that remembers why its last handshake failed."""

    handshake_error: BaseException | None = None


def client_ssl_context(dest: DicomDestination) -> ssl.SSLContext:
    """TLS 1.2+ client context for ``dest``: server verification and hostname check on.

    Raises ``OSError``/``ssl.SSLError`` when a file is missing or unusable.
    """
    ctx = _ClientContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED + check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if dest.tls_ca_file:
        ctx.load_verify_locations(cafile=dest.tls_ca_file)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if dest.tls_cert_file:
        ctx.load_cert_chain(dest.tls_cert_file, dest.tls_key_file)
    ctx.sslsocket_class = _RecordingSSLSocket
    return ctx


def send_dicom(dest: DicomDestination, items: Sequence[OutboxItem]) -> list[Outcome]:
    """C-STORE ``items`` over one association per <=128 contexts; one Outcome per item."""
    outcomes: list[Outcome] = []
    for chunk in _chunks_by_context(items):
        outcomes.extend(_send_chunk(dest, chunk))
    return outcomes


#: A part sent over its own association holds at least this many items: below it, an
#: association's set-up and release cost more than the overlap saves.
MIN_ITEMS_PER_ASSOCIATION = 4


def split_parts(items: Sequence[OutboxItem], k: int) -> list[list[OutboxItem]]:
    """``items`` as at most ``k`` contiguous, near-equal parts of >= MIN_ITEMS_PER_ASSOCIATION items."""
    n = len(items)
    k = max(1, min(k, n // MIN_ITEMS_PER_ASSOCIATION))
    return [list(items[i * n // k:(i + 1) * n // k]) for i in range(k)]


def send_dicom_parallel(dest: DicomDestination, items: Sequence[OutboxItem]) -> list[Outcome]:
    """:func:`send_dicom` over up to ``dest.max_associations`` concurrent associations.

    Each part is a contiguous slice of ``items`` sent by :func:`send_dicom` (its own AE and
    association, as every chunk has): the first in the calling thread, the others in daemon
    threads (like the sender thread itself, they never hold up the node's exit).  One
    Outcome per item, in item order.  A part that fails (rejected, aborted, an unexpected
    error) fails only its own items.
    """
    parts = split_parts(items, getattr(dest, "max_associations", 1))
    if len(parts) == 1:
        return send_dicom(dest, items)
    results: list[list[Outcome] | None] = [None] * len(parts)

    def run(i: int) -> None:
        try:
            results[i] = send_dicom(dest, parts[i])
        except Exception as exc:  # a bug in one part must not lose the other parts' outcomes
            log.exception("outbox: sending a part of %d instances to %s failed", len(parts[i]), dest.name)
            results[i] = [Outcome(False, None, f"sender error: {exc!r}") for _ in parts[i]]

    threads = [threading.Thread(target=run, args=(i,), name=f"outbox-send-{dest.name}-{i}", daemon=True)
               for i in range(1, len(parts))]
    for t in threads:
        t.start()
    run(0)
    for t in threads:
        t.join()
    outcomes: list[Outcome] = []
    for part, got in zip(parts, results):
        if got is None or len(got) != len(part):  # pragma: no cover - send_dicom returns one per item
            got = [Outcome(False, None, "sender error: no outcome for this instance") for _ in part]
        outcomes.extend(got)
    return outcomes


def _send_chunk(dest: DicomDestination, items: Sequence[OutboxItem]) -> list[Outcome]:
    ae = AE(ae_title=dest.calling_ae)
    ae.connection_timeout = dest.connect_timeout_s
    ae.acse_timeout = dest.acse_timeout_s
    ae.dimse_timeout = dest.dimse_timeout_s
    ae.network_timeout = dest.network_timeout_s
    ae.maximum_pdu_size = dest.max_pdu
    seen: set[tuple[str, str]] = set()
    for it in items:
        key = (it.sop_class_uid, it.transfer_syntax_uid)
        if key not in seen:
            seen.add(key)
            ae.add_requested_context(it.sop_class_uid, _contexts_for(it.transfer_syntax_uid))
    where = f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port}{', TLS' if dest.tls else ''})"
    ctx: ssl.SSLContext | None = None
    if dest.tls:
        try:
            ctx = client_ssl_context(dest)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            err = f"TLS set-up for {where} failed (ca/cert/key files): {exc}"
            log.debug("outbox: %s", err)
            return [Outcome(False, None, err) for _ in items]
    t_assoc = time.monotonic()
    try:
        assoc = ae.associate(
            dest.host,
            dest.port,
            ae_title=dest.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, _set_nodelay)],
            tls_args=None if ctx is None else (ctx, dest.tls_server_hostname or dest.host),
        )
    except (OSError, ValueError) as exc:
        err = f"association to {where} failed: {exc}"
        log.debug("outbox: %s", err)
        return [Outcome(False, None, err) for _ in items]
    if not assoc.is_established:
        handshake_error = getattr(ctx, "handshake_error", None)
        if handshake_error is not None:
            err = f"TLS handshake with {where} failed: {handshake_error}"
        elif assoc.is_rejected:
            err = f"association rejected by {where}"
        elif assoc.is_aborted:
            # pynetdicom reports a refused or timed-out TCP connect as an abort too: ask the network
            err = f"association to {where} failed: {_connect_problem(dest, _no_answer(dest, t_assoc))}"
        else:
            err = f"association to {where} failed: {_connect_problem(dest, _no_answer(dest, t_assoc))}"
        log.debug("outbox: %s", err)
        return [Outcome(False, None, err) for _ in items]

    keep_responses(assoc)
    outcomes: list[Outcome] = []
    try:
        for it in items:
            if not assoc.is_established:
                outcomes.append(Outcome(False, None, f"association to {where} ended before this instance was sent"))
                continue
            outcomes.append(_store_one(assoc, it, where, dest.dimse_timeout_s))
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def keep_responses(assoc: Any) -> None:
    """Put a DIMSE response that the association's reactor took back where ``send_c_store`` waits for it.

    pynetdicom 3.0 race (its requestor pauses the reactor with a flag the reactor sets just
    *before* it blocks): the reactor can take the C-STORE response off the DIMSE queue in
    that moment, log "Received unexpected C-STORE service message" and drop it, while
    ``send_c_store`` waits ``dimse_timeout_s`` for a response that never comes.  Seen here
    under CPU load (bench/test_load: the TPS answered, the node waited 30 s and retried).
    This sender only sends requests, so anything the reactor takes that is a response
    belongs to the waiting call: it goes back on the queue.  One request is outstanding at
    a time, and an association whose response timed out is aborted (``_store_one``), so a
    late response can never be read as the answer to a later request.
    """
    serve = assoc._serve_request

    def serve_or_return(msg: Any, context_id: int) -> None:
        if getattr(msg, "is_valid_response", False):
            assoc.dimse.msg_queue.put((context_id, msg))
            return
        serve(msg, context_id)

    assoc._serve_request = serve_or_return


def _connect_problem(dest: DicomDestination, accepted: str) -> str:
    """Why no association came about, in the words an admin acts on.

    pynetdicom logs the socket error and reports only "aborted"; a second TCP connect
    (bounded by the destination's connect timeout, and only after a failure) tells a
    refused port from a timeout, an unknown host or no route.  ``accepted``: what to say
    when TCP connects fine (the peer itself ended the association).
    """
    try:
        with socket.create_connection((dest.host, dest.port), timeout=dest.connect_timeout_s):
            return accepted
    except ConnectionRefusedError:
        return "connection refused (nothing listens on that port, or a firewall rejects it)"
    except TimeoutError:
        return f"connection timed out after {dest.connect_timeout_s:g} s (host down or port filtered)"
    except socket.gaierror as exc:
        return f"host name not found ({exc.strerror or exc})"
    except OSError as exc:
        return f"cannot connect ({exc.strerror or exc})"


def _no_answer(dest: DicomDestination, t_start: float) -> str:
    """What to say when TCP connects but no association came about: a silent peer or an abort."""
    if time.monotonic() - t_start >= 0.9 * dest.acse_timeout_s:
        return f"no answer to the association request within acse_timeout_s {dest.acse_timeout_s:g} s"
    return "the peer aborted the association"


def _status_text(code: int) -> str:
    """``0xA700 (Refused: Out of resources)``: the status and its meaning for C-STORE."""
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, (None, ""))[1]
    return f"0x{code:04X}" + (f" ({meaning})" if meaning else "")


def _store_one(assoc: object, it: OutboxItem, where: str, dimse_timeout_s: float = 60.0) -> Outcome:
    """One C-STORE; its outcome carries the true error.  Logged per series by the Sender, not here."""
    if not it.path.exists():
        return Outcome(False, None, f"outbox file {it.path} is missing")
    t0 = time.monotonic()
    try:
        status = assoc.send_c_store(it.path)  # type: ignore[attr-defined]
    except RuntimeError:
        # pynetdicom: "association ... must be established": the peer ended it between the
        # caller's check and this request (an abort, a TPS restart).  Retried like any failure.
        return Outcome(False, None, f"association to {where} ended before this instance was sent")
    except (ValueError, AttributeError, OSError) as exc:
        # No accepted presentation context, unreadable file, ...: this item fails.
        return Outcome(False, None, f"C-STORE not sent: {exc}")
    code = getattr(status, "Status", None)
    if code is None:
        if time.monotonic() - t0 >= 0.9 * dimse_timeout_s:
            err = f"no C-STORE response from {where} within dimse_timeout_s {dimse_timeout_s:g} s (timeout)"
        elif getattr(assoc, "is_aborted", False):
            err = f"association aborted by {where} during C-STORE"
        else:
            err = f"no valid C-STORE response from {where}"
        # No answer: the association cannot be trusted with the next instance (after a peer's
        # A-ABORT pynetdicom may still call it established for a moment, and the next C-STORE
        # would wait out dimse_timeout_s).  End it; the rest of the chunk fails and is retried.
        if getattr(assoc, "is_established", False):
            try:
                assoc.abort()  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001 - already going away
                log.debug("outbox: aborting the association to %s: %s", where, exc)
        return Outcome(False, None, err)
    code = int(code)
    comment = str(status.get("ErrorComment", "")) if hasattr(status, "get") else ""
    if code == 0x0000:
        return Outcome(True, code, None)
    if code in WARNING_STATUSES:
        msg = f"warning 0x{code:04X} ({WARNING_STATUSES[code]}){': ' + comment if comment else ''}"
        return Outcome(True, code, msg)
    return Outcome(False, code, f"C-STORE status {_status_text(code)} from {where}{': ' + comment if comment else ''}")


def send_folder(dest: FolderDestination, items: Sequence[OutboxItem]) -> list[Outcome]:
    """Copy each file to ``<path>/<Study>/<Series>/<SOP>.dcm`` atomically."""
    outcomes: list[Outcome] = []
    for it in items:
        target = Path(dest.path)
        for part in (it.study_instance_uid, it.series_instance_uid):
            if part:
                target = target / part
        try:
            atomic_copy(it.path, target / f"{it.sop_instance_uid}.dcm")
            outcomes.append(Outcome(True, None, None))
        except OSError as exc:
            err = f"copy to {dest.name} ({dest.path}) failed: {exc}"
            outcomes.append(Outcome(False, None, err))
    return outcomes


def log_delivery(destination: str, items: Sequence[OutboxItem], outcomes: Sequence[Outcome],
                 max_attempts: int) -> None:
    """One log line per derived series and attempt (not one per instance).

    INFO when all went out; WARNING when some failed and will be retried; ERROR when
    some became dead letters.  The line names the job, the series UID, the destination,
    the counts and each distinct error with how many instances it hit; JSON logs carry
    job, series_uid, destination and stage as fields.
    """
    groups: dict[tuple[str, str], list[tuple[OutboxItem, Outcome]]] = {}
    for it, out in zip(items, outcomes):
        groups.setdefault((str(it.job_id), it.series_instance_uid), []).append((it, out))
    for (job, series), pairs in groups.items():
        ok = sum(1 for _, o in pairs if o.delivered)
        failed = [(it, o) for it, o in pairs if not o.delivered]
        dead = sum(1 for it, _ in failed if it.attempts + 1 >= max_attempts)
        attempt = max(it.attempts for it, _ in pairs) + 1
        warned = [o.error for _, o in pairs if o.delivered and o.error]
        errors: dict[str, int] = {}
        for _, o in failed:
            errors[o.error or "unknown error"] = errors.get(o.error or "unknown error", 0) + 1
        for w in warned:
            errors[w] = errors.get(w, 0) + 1
        why = "; ".join(f"{e}" + (f" ({n} instances)" if n > 1 and len(errors) > 1 else "") for e, n in errors.items())
        head = f"outbox: job {job} series {series} -> {destination}"
        extra = {"job": int(job) if job.isdigit() else job, "series_uid": series, "destination": destination, "stage": "deliver",
                 "delivered": ok, "failed": len(failed), "dead_letters": dead, "attempt": attempt}
        if dead:
            log.error("%s: %d delivered, %d dead-lettered after %d attempts%s: %s", head, ok, dead, max_attempts,
                      f", {len(failed) - dead} to retry" if len(failed) > dead else "", why, extra=extra)
        elif failed:
            log.warning("%s: %d delivered, %d failed (attempt %d of %d, will retry): %s", head, ok, len(failed),
                        attempt, max_attempts, why, extra=extra)
        elif warned:
            log.warning("%s: %d delivered, with warnings: %s", head, ok, why, extra=extra)
        else:
            log.info("%s: %d delivered", head, ok, extra=extra)


@dataclass
class Sender:
    """Delivers what the :class:`Outbox` holds: :meth:`run_once` or a background thread."""

    outbox: Outbox
    destinations: dict[str, Destination]
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    poll_interval_s: float = 1.0
    batch_size: int = 500
    delete_delivered: bool = True
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._run_lock = threading.Lock()

    def run_once(self, now: float | None = None) -> int:
        """Send everything due at ``now``; returns how many instances were delivered."""
        now = time.time() if now is None else now
        delivered = 0
        with self._run_lock:
            for name, items in self.outbox.due(now, self.batch_size).items():
                dest = self.destinations.get(name)
                if dest is None:
                    err = f"destination {name!r} is not configured"
                    outcomes = [Outcome(False, None, err) for _ in items]
                elif isinstance(dest, FolderDestination):
                    outcomes = send_folder(dest, items)
                else:
                    outcomes = send_dicom_parallel(dest, items)
                self.outbox.record(list(zip(items, outcomes)), self.policy, now, self.rng, self.delete_delivered)
                delivered += sum(1 for o in outcomes if o.delivered)
                log_delivery(name, items, outcomes, self.policy.max_attempts)
        return delivered

    # -- background mode -----------------------------------------------------------
    def start(self) -> None:
        """Run :meth:`run_once` in a daemon thread every ``poll_interval_s`` (or on wake)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="outbox-sender", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Ask the background thread to look for due items now (e.g. after enqueue)."""
        self._wake.set()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the background thread after its current batch (bounded by ``timeout_s``)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("outbox: sender thread still busy after %.0f s", timeout_s)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once(time.time())
            except Exception:  # keep delivering: one bad batch must not stop the node
                log.exception("outbox: sender iteration failed")
            self._wake.wait(self.poll_interval_s)
            self._wake.clear()
