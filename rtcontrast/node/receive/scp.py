"""Storage SCP: receive MR images from the scanner into the durable spool.

What it accepts, and why:

* C-ECHO, and C-STORE of MR Image Storage and Enhanced MR Image Storage only; any other
  SOP class is refused at association negotiation (its presentation context is
  rejected), so a sender learns at once that this node is the wrong destination.
* Uncompressed and *lossless* compressed transfer syntaxes (scanners and PACS send JPEG
  Lossless, JPEG-LS, JPEG 2000, RLE, Deflate; pynetdicom's default contexts would refuse
  them: pynetdicom#922/#704/#203).  Lossy syntaxes are not offered: quantitative
  mapping needs the acquired pixel values.
* An instance is answered *Success* only after its file is fsync'd in the spool and
  ``on_stored`` returned; every other outcome is a failure status the sender can see
  (0xA700 out of resources, 0xA900 dataset does not match SOP class, 0xC000 cannot
  understand) with one log line saying what and why.  Received data that is refused
  after arrival is quarantined, not dropped.
* Series touched by an association are reported through ``on_released`` when the
  association is released normally (the sender says it is done).  ``on_association_end``
  hears how every association that stored or refused something ended (released or
  aborted) and which instances it refused, so the node can tell a complete series from
  a partial one (:mod:`rtcontrast.node.store.completeness`).
* Admission before cost (:mod:`rtcontrast.node.receive.server` and
  :mod:`~rtcontrast.node.receive.admission`): at accept, a peer address outside
  ``allowed_networks`` is closed and one address may hold only so many connections; the
  complete A-ASSOCIATE-RQ must arrive within a short timer and be well-formed before
  pynetdicom spends an association on the socket.  Then, when the A-ASSOCIATE-RQ
  arrives (EVT_REQUESTED, the hook pynetdicom leaves for an acceptor to answer
  A-ASSOCIATE-RJ itself), before any data: the same admission check again (defence in
  depth: an address outside the list would be rejected *permanent, service-user, no
  reason given*), an unknown calling AE title with reason 3 and a wrong called AE title with
  reason 7.  More than ``max_associations`` at once are rejected *transient,
  service-provider (presentation), local limit exceeded* by pynetdicom: the sender may
  retry later, nothing is queued.  Every refusal is one log line (peer, AE titles, why).
* DICOM TLS (PS3.15 Annex B) on its own port, beside the plain port or instead of it.
  The TLS handshake runs in the connection's own thread with a timeout (pynetdicom does
  it in the accepting thread, where one silent client would stall every new peer); a
  failed handshake (a plain DICOM peer, an untrusted client certificate) is one log line.

Logs name peers, AE titles and UIDs only, never patient identifiers.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import EnhancedMRImageStorage, MRImageStorage, Verification

from rtcontrast.node.durable import set_nodelay
from rtcontrast.node.receive.spool import (
    InflationLimit,
    InvalidUID,
    Spool,
    SpoolError,
    SpoolFull,
    UnreadableInstance,
    check_inflated_size,
    read_header,
    validate_uid,
)
from rtcontrast.node.receive.admission import Admission, ConnectionGate, rj_text, safe_text
from rtcontrast.node.receive.server import inheriting
from rtcontrast.node.receive.scp_settings import ScpSettings, ScpTls, StoredInstance, server_ssl_context

__all__ = [
    "ScpSettings",
    "ScpTls",
    "server_ssl_context",
    "StorageSCP",
    "StoredInstance",
    "ACCEPTED_SOP_CLASSES",
    "ACCEPTED_TRANSFER_SYNTAXES",
    "STATUS_SUCCESS",
    "STATUS_DUPLICATE_SOP_INSTANCE",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_DATASET_MISMATCH",
    "STATUS_CANNOT_UNDERSTAND",
]

LOG = logging.getLogger(__name__)

ACCEPTED_SOP_CLASSES: tuple[str, ...] = (str(MRImageStorage), str(EnhancedMRImageStorage))
# Order = our preference when a requestor proposes several in one context.
ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    str(ExplicitVRLittleEndian),
    str(ImplicitVRLittleEndian),
    str(DeflatedExplicitVRLittleEndian),
    str(ExplicitVRBigEndian),
    str(JPEGLosslessSV1),
    str(JPEGLossless),  # process 14 (1.2.840.10008.1.2.4.57)
    str(JPEGLSLossless),
    str(JPEG2000Lossless),
    str(RLELossless),
)

#: How long after a connection closed without a release event the association counts as
#: aborted (EVT_RELEASED and EVT_CONN_CLOSE come from different threads).
_RELEASE_RACE_S = 2.0

STATUS_SUCCESS = 0x0000
STATUS_DUPLICATE_SOP_INSTANCE = 0x0111  # PS3.7 C.4.2.1.4: a failure status of C-STORE
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000


@dataclass
class _AssocState:
    calling_ae: str
    called_ae: str
    peer: str
    stored: int = 0
    refused: int = 0
    series: set[tuple[str, str]] = field(default_factory=set)
    outcome: str = "open"  # released | aborted | rejected
    # refused instances: ((study, series) or None when unknown, SOP Instance UID or None, status)
    refusals: list[tuple[tuple[str, str] | None, str | None, int]] = field(default_factory=list)
    current: tuple[tuple[str, str] | None, str | None] = (None, None)
    reported: bool = False
    closed: bool = False
    logged: bool = False
    refusal_logged: bool = False
    transport: str = "TCP"  # or the TLS version

    @property
    def host(self) -> str:
        return self.peer.rsplit(":", 1)[0]


class _Refusal(Exception):
    """A C-STORE refusal: DICOM status and the reason that goes in the log."""

    def __init__(self, status: int, reason: str, quarantine: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.quarantine = quarantine


class StorageSCP:
    """A non-blocking pynetdicom Storage SCP that writes into a :class:`Spool`.

    ``on_stored`` runs on the association's thread after the file is durable and before
    the Success response; if it raises, the sender gets 0xA700 and will resend (the file
    stays in the spool and is overwritten by the resend).  ``on_released`` receives the
    (study, series) keys touched by a normally released association.  Both callbacks are
    called from several threads at once and must be thread-safe.
    """

    def __init__(
        self,
        settings: ScpSettings,
        spool: Spool,
        on_stored: Callable[[StoredInstance], None],
        on_released: Callable[[set[tuple[str, str]]], None],
        on_association_end: Callable[[str, set[tuple[str, str]],
                                      list[tuple[tuple[str, str] | None, str | None, int]]], None] | None = None,
        listeners: dict[str, socket.socket] | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.on_stored = on_stored
        self.on_released = on_released
        self.on_association_end = on_association_end
        self._listeners = listeners or {}  # "plain"/"tls": sockets inherited from the main process
        self._servers: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.admission = Admission(settings.allowed_networks, settings.allowed_calling_aets, settings.ae_title,
                                   settings.require_called_aet)
        per_peer = settings.max_associations_per_peer or max(1, settings.max_associations // 2)
        self.gate = ConnectionGate(self.admission, per_peer,
                                   settings.max_pending_connections or 4 * settings.max_associations)
        if not settings.plain_enabled and settings.tls is None:
            raise ValueError("neither the plain nor the TLS listener is enabled")
        self.ae = self._make_ae()

    # ------------------------------------------------------------------ lifecycle
    def _make_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_associations = s.max_associations
        ae.maximum_pdu_size = s.max_pdu_size
        ae.network_timeout = s.network_timeout
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.require_called_aet = s.require_called_aet
        if s.allowed_calling_aets:
            ae.require_calling_aet = list(s.allowed_calling_aets)
        ae.add_supported_context(Verification)
        for sop_class in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
        return ae

    def start(self) -> None:
        """Start listening in background threads; returns at once.

        The TLS context is built first: unreadable or mismatched certificate files raise
        here, before anything listens.
        """
        if self._servers:
            raise RuntimeError("StorageSCP already started")
        s = self.settings
        ssl_ctx = server_ssl_context(s.tls) if s.tls is not None else None
        if s.stream_to_disk:
            _config.STORE_RECV_CHUNKED_DATASET = True
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_C_ECHO, self._on_c_echo),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        try:
            if s.plain_enabled:
                self._servers["plain"] = self._serve(s.port, None, handlers)
            if s.tls is not None:
                self._servers["tls"] = self._serve(s.tls.port, ssl_ctx, handlers)
        except BaseException:
            self.stop()
            raise
        listeners = []
        if "plain" in self._servers:
            listeners.append(f"{s.host}:{self.port}")
        if self.tls_port is not None:
            client = "required" if s.tls and s.tls.require_client_cert else (
                "verified if presented" if s.tls and s.tls.ca_file else "not checked")
            listeners.append(f"{s.host}:{self.tls_port} (TLS, client certificates {client})")
        LOG.info(
            "storage SCP %s listening on %s (MR, Enhanced MR; %d transfer syntaxes; calling AEs %s; "
            "peer addresses %s; at most %d associations)",
            s.ae_title, " and ".join(listeners), len(ACCEPTED_TRANSFER_SYNTAXES),
            ", ".join(s.allowed_calling_aets) if s.allowed_calling_aets else "any",
            ", ".join(s.allowed_networks) if s.allowed_networks else "any", s.max_associations,
        )

    def _serve(self, port: int, ssl_ctx: ssl.SSLContext | None, handlers: list[Any]) -> Any:
        """One listener (as ``AE.start_server(block=False)``, with our server class)."""
        server = self.ae.make_server(
            (self.settings.host, port), ssl_context=ssl_ctx, evt_handlers=handlers,
            server_class=inheriting(self._listeners.get("tls" if ssl_ctx is not None else "plain")),
        )
        if self.settings.tls is not None:
            server.handshake_timeout_s = self.settings.tls.handshake_timeout_s
        server.gate = self.gate
        server.request_timeout_s = self.settings.association_request_timeout_s
        server.max_pdu_bytes = self.settings.max_pdu_size
        name = "tls" if ssl_ctx is not None else "plain"
        thread = threading.Thread(target=server.serve_forever, name=f"scp-{name}-listener", daemon=True)
        thread.start()
        self.ae._servers.append(server)  # so that AE.shutdown() stops it too, as with start_server
        return server

    def share_listeners(self) -> dict[str, socket.socket]:
        """The listening sockets, made shareable with receiver processes (``listeners=`` there)."""
        return {name: server.share() for name, server in self._servers.items()}

    def stop(self) -> None:
        """Stop listening and end active associations."""
        if not self._servers:
            return
        for server in self._servers.values():
            server.shutdown()
        self._servers = {}
        self.ae.shutdown()
        LOG.info("storage SCP %s stopped", self.settings.ae_title)

    @property
    def port(self) -> int:
        """The bound plain TCP port (useful when ``settings.port`` is 0); TLS-only: the TLS port."""
        server = self._servers.get("plain")
        if server is not None:
            return int(server.server_address[1])
        if not self.settings.plain_enabled and self.tls_port is not None:
            return self.tls_port
        return self.settings.port

    @property
    def tls_port(self) -> int | None:
        """The bound TLS port, or None without a TLS listener."""
        server = self._servers.get("tls")
        if server is not None:
            return int(server.server_address[1])
        return self.settings.tls.port if self.settings.tls is not None else None

    def __enter__(self) -> StorageSCP:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ association events
    def _state(self, assoc: Any) -> _AssocState:
        """Per-association counters, kept on the association object itself."""
        st = getattr(assoc, "_rtcontrast_state", None)
        if st is not None:
            return st
        with self._lock:
            st = getattr(assoc, "_rtcontrast_state", None)
            if st is None:
                req = assoc.requestor
                prim = getattr(req, "primitive", None)
                calling = getattr(prim, "calling_ae_title", None) or getattr(req, "ae_title", "") or ""
                st = _AssocState(
                    calling_ae=_safe_uid(str(calling).strip()),
                    called_ae=_safe_uid(str(getattr(prim, "called_ae_title", "") or "").strip()),
                    peer=f"{req.address}:{req.port}",
                )
                sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
                if isinstance(sock, ssl.SSLSocket):
                    st.transport = sock.version() or "TLS"
                assoc._rtcontrast_state = st
            return st

    def _finish(self, st: _AssocState, *, outcome: str | None = None, closed: bool = False) -> None:
        """Log the one summary line once the outcome is known and the connection closed.

        EVT_ABORTED and EVT_CONN_CLOSE arrive in either order (different threads).
        """
        with self._lock:
            if outcome is not None and st.outcome == "open":
                st.outcome = outcome
            st.closed = st.closed or closed
            ready = st.closed and st.outcome != "open" and not st.logged
            if ready:
                st.logged = True
        if ready and st.outcome != "rejected":
            LOG.info(
                "association %s from %s (AE %s -> %s, %s): %d instance(s) stored, %d refused, %d series",
                st.outcome, st.peer, st.calling_ae, st.called_ae, st.transport, st.stored, st.refused,
                len(st.series),
            )

    def _on_conn_open(self, event: evt.Event) -> None:
        # Nagle + delayed ACK costs ~40 ms per C-STORE response round trip.
        try:
            set_nodelay(event)
        except (AttributeError, OSError) as exc:  # pragma: no cover - platform specific
            LOG.warning("could not set TCP_NODELAY on accepted socket: %s", exc)

    def _admission(self, st: _AssocState) -> tuple[int, str] | None:
        """``(reason, why)`` for an A-ASSOCIATE-RJ (permanent, service-user), or None to go on."""
        return self.admission.verdict(st.host, st.calling_ae, st.called_ae)

    def _on_requested(self, event: evt.Event) -> None:
        """Admission at A-ASSOCIATE-RQ: answer A-ASSOCIATE-RJ ourselves, before negotiation.

        pynetdicom skips its own negotiation when a handler of this event has rejected
        (association.py, ``run_reactor``); ``kill()`` then waits, as pynetdicom's own
        rejections do, until the RJ PDU is out and the peer closed the connection.
        """
        assoc = event.assoc
        st = self._state(assoc)
        verdict = self._admission(st)
        if verdict is None:
            return
        reason, why = verdict
        with self._lock:
            st.refusal_logged = True
        LOG.warning(
            "refused association from %s (AE %s -> %s, %s): %s; %s",
            st.peer, st.calling_ae, st.called_ae, st.transport, why, rj_text(1, 1, reason),
        )
        assoc.acse.send_reject(0x01, 0x01, reason)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def _on_established(self, event: evt.Event) -> None:
        st = self._state(event.assoc)
        accepted = {str(cx.abstract_syntax) for cx in event.assoc.accepted_contexts}
        refused = sorted(
            {str(cx.abstract_syntax) for cx in event.assoc.rejected_contexts} - accepted
        )
        if refused:
            # One line per association: storescu-like peers propose ~100 SOP classes whether or
            # not they send them, so this is information; a peer that then tries to send such an
            # instance fails on its side (no presentation context), which is the refusal it sees.
            shown = ", ".join(refused[:10]) + (f" and {len(refused) - 10} more" if len(refused) > 10 else "")
            LOG.info(
                "association from %s (AE %s): refused presentation contexts for %d SOP class(es) "
                "this node does not accept (only MR and Enhanced MR Image Storage): %s",
                st.peer, st.calling_ae, len(refused), shown,
            )

    def _on_rejected(self, event: evt.Event) -> None:
        """pynetdicom's own rejections (limit reached, user identity): say which, once."""
        st = self._state(event.assoc)
        self._finish(st, outcome="rejected")
        with self._lock:
            if st.refusal_logged:
                return
            st.refusal_logged = True
        prim = getattr(event.assoc.acceptor, "primitive", None)
        rsd = tuple(int(getattr(prim, k, 0) or 0) for k in ("result", "result_source", "diagnostic"))
        if rsd == (2, 3, 2):
            why = f"too many simultaneous associations (limit {self.settings.max_associations})"
        elif rsd == (2, 2, 1):
            why = "user identity not accepted"
        else:
            why = "refused during negotiation"
        LOG.warning(
            "refused association from %s (AE %s -> %s, %s): %s; %s",
            st.peer, st.calling_ae, st.called_ae, st.transport, why, rj_text(*rsd),
        )

    def _report_end(self, st: _AssocState, outcome: str) -> None:
        """Tell ``on_association_end`` once how the association ended (completeness, see series events)."""
        with self._lock:
            if st.reported or (not st.series and not st.refusals):
                return
            st.reported = True
        if self.on_association_end is None:
            return
        try:
            self.on_association_end(outcome, set(st.series), list(st.refusals))
        except Exception:  # the instances are stored; the series is still completed by the idle timeout
            LOG.exception("on_association_end callback failed for association from %s", st.peer)

    def _on_released(self, event: evt.Event) -> None:
        st = self._state(event.assoc)
        self._finish(st, outcome="released")
        self._report_end(st, "released")
        if st.series:
            try:
                self.on_released(set(st.series))
            except Exception:  # the instances are stored; the idle timeout still applies
                LOG.exception("on_released callback failed for association from %s", st.peer)

    def _on_aborted(self, event: evt.Event) -> None:
        st = self._state(event.assoc)
        self._finish(st, outcome="aborted")
        self._report_end(st, "aborted")

    def _on_conn_close(self, event: evt.Event) -> None:
        st = self._state(event.assoc)
        if st.outcome == "open" and getattr(event.assoc, "is_aborted", False):
            self._finish(st, outcome="aborted")
        self._finish(st, closed=True)
        if st.outcome == "aborted":
            self._report_end(st, "aborted")
        elif st.outcome != "released":
            # Dropped without a release - or EVT_RELEASED is still on its way from the other
            # thread (they race): decide a moment later, well inside any idle timeout.
            timer = threading.Timer(_RELEASE_RACE_S, self._late_end, args=(st,))
            timer.daemon = True
            timer.start()

    def _late_end(self, st: _AssocState) -> None:
        if st.outcome != "released":
            self._report_end(st, "aborted")

    # ------------------------------------------------------------------ DIMSE
    def _on_c_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_c_store(self, event: evt.Event) -> int:
        st = self._state(event.assoc)
        req = event.request
        sop_uid_cmd = str(req.AffectedSOPInstanceUID or "")
        try:
            inst = self._store(event, st)
        except _Refusal as ref:
            st.refused += 1
            key, sop = st.current
            st.refusals.append((key, sop or (_safe_uid(sop_uid_cmd) or None), ref.status))
            LOG.warning(
                "refused C-STORE from %s (AE %s) of SOP instance %s: status 0x%04X: %s",
                st.peer, st.calling_ae, _safe_uid(sop_uid_cmd), ref.status, ref.reason,
            )
            if ref.quarantine:
                self.spool.quarantine(_source(event), f"from {st.peer} AE {st.calling_ae}: {ref.reason}")
            return ref.status
        except Exception:  # never answer success on an unexpected error
            st.refused += 1
            st.refusals.append((st.current[0], st.current[1], STATUS_OUT_OF_RESOURCES))
            LOG.exception("C-STORE from %s failed unexpectedly; answering 0xA700", st.peer)
            return STATUS_OUT_OF_RESOURCES
        st.stored += 1
        st.series.add((inst.study_uid, inst.series_uid))
        return STATUS_SUCCESS

    def _store(self, event: evt.Event, st: _AssocState) -> StoredInstance:
        req = event.request
        st.current = (None, None)
        cx_sop_class = str(event.context.abstract_syntax)
        src = _source(event)
        size = len(src) if isinstance(src, bytes) else src.stat().st_size
        limit = self.settings.max_instance_bytes
        if limit and size > limit:
            raise _Refusal(STATUS_OUT_OF_RESOURCES, f"dataset of {size} bytes exceeds the limit of {limit} bytes")
        if str(event.context.transfer_syntax) == str(DeflatedExplicitVRLittleEndian):
            try:
                check_inflated_size(src, limit)
            except InflationLimit as exc:
                raise _Refusal(STATUS_OUT_OF_RESOURCES, str(exc)) from exc
            except UnreadableInstance as exc:
                raise _Refusal(STATUS_CANNOT_UNDERSTAND, str(exc), quarantine=True) from exc
        try:
            ds = read_header(src)
        except UnreadableInstance as exc:
            raise _Refusal(STATUS_CANNOT_UNDERSTAND, str(exc), quarantine=True) from exc

        sop_class = str(ds.get("SOPClassUID", "") or "")
        if sop_class != cx_sop_class or str(req.AffectedSOPClassUID) != cx_sop_class:
            raise _Refusal(
                STATUS_DATASET_MISMATCH,
                f"dataset SOP Class {_safe_uid(sop_class)!s} / request {req.AffectedSOPClassUID} "
                f"does not match the presentation context {cx_sop_class}",
                quarantine=True,
            )
        try:
            study = validate_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
            series = validate_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
            sop = validate_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
        except InvalidUID as exc:
            raise _Refusal(STATUS_DATASET_MISMATCH, str(exc), quarantine=True) from exc
        st.current = ((study, series), sop)
        for kw in ("RescaleSlope", "RescaleIntercept"):  # NaN/inf: every pixel of the slice is undefined
            value = ds.get(kw)
            try:
                finite = value is None or value == "" or math.isfinite(float(value))
            except (TypeError, ValueError):
                finite = False
            if not finite:
                raise _Refusal(STATUS_CANNOT_UNDERSTAND, f"{kw} {safe_text(value)} is not a finite number",
                               quarantine=True)
        if sop != str(req.AffectedSOPInstanceUID):
            raise _Refusal(
                STATUS_DATASET_MISMATCH,
                f"dataset SOPInstanceUID {sop} differs from the request's {_safe_uid(str(req.AffectedSOPInstanceUID))}",
                quarantine=True,
            )
        try:
            path = self.spool.store(src, study_uid=study, series_uid=series, sop_instance_uid=sop)
        except SpoolFull as exc:
            raise _Refusal(STATUS_OUT_OF_RESOURCES, f"spool full: {exc}") from exc
        except SpoolError as exc:
            raise _Refusal(STATUS_OUT_OF_RESOURCES, f"spool write failed: {exc}") from exc

        inst = StoredInstance(
            path=path,
            study_uid=study,
            series_uid=series,
            sop_instance_uid=sop,
            sop_class_uid=sop_class,
            calling_ae=st.calling_ae,
            peer_address=st.peer,
            received_at=datetime.now(timezone.utc),
        )
        try:
            self.on_stored(inst)
        except Exception as exc:
            status = getattr(exc, "dicom_status", None)
            if status is not None:  # a refusal by the store (e.g. 0x0111 Duplicate SOP Instance)
                self.spool.quarantine(path, f"from {st.peer} AE {st.calling_ae}: {exc}")
                path.unlink(missing_ok=True)  # kept in quarantine, not in the series it does not belong to
                raise _Refusal(int(status), str(exc)) from exc
            LOG.exception("on_stored failed for SOP instance %s", sop)
            raise _Refusal(STATUS_OUT_OF_RESOURCES, f"could not record the instance: {exc}") from exc
        return inst


def _source(event: evt.Event) -> bytes | Path:
    """The received Part 10 data: the streamed temp file, or the in-memory bytes."""
    try:
        path = event.dataset_path
    except AttributeError:
        path = None
    if path:
        return Path(path)
    return event.encoded_dataset(include_meta=True)


def _safe_uid(value: str) -> str:
    """A UID for a log line: printable and bounded, whatever the peer sent."""
    return safe_text(value)
