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
  association is released normally (the sender says it is done); an aborted
  association reports nothing (the idle timeout decides).

Logs name peers, AE titles and UIDs only, never patient identifiers.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import EnhancedMRImageStorage, MRImageStorage, Verification
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

from rtcontrast.spool import (
    InvalidUID,
    Spool,
    SpoolError,
    SpoolFull,
    UnreadableInstance,
    read_header,
    validate_uid,
)

__all__ = [
    "ScpSettings",
    "StorageSCP",
    "StoredInstance",
    "ACCEPTED_SOP_CLASSES",
    "ACCEPTED_TRANSFER_SYNTAXES",
    "STATUS_SUCCESS",
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

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000


@dataclass(frozen=True)
class ScpSettings:
    """Listening and admission settings of the Storage SCP.

    ``allowed_calling_aets``: ``None`` or empty accepts any calling AE; otherwise others
    are rejected with "calling AE title not recognised".  ``require_called_aet``: reject
    ("called AE title not recognised") when the peer calls another AE title.
    ``max_instance_bytes``: larger datasets are refused with 0xA700 (0 = no limit).
    ``stream_to_disk``: receive C-STORE datasets into a temporary file instead of memory
    (pynetdicom's process-wide ``_config.STORE_RECV_CHUNKED_DATASET``; useful for large
    Enhanced MR objects, costs one extra file copy).
    """

    ae_title: str = "RTCONTRAST"
    host: str = "0.0.0.0"
    port: int = 11112
    max_associations: int = 10
    max_pdu_size: int = 262144
    max_instance_bytes: int = 2 * 1024**3
    allowed_calling_aets: list[str] | None = None
    require_called_aet: bool = True
    network_timeout: float = 60.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    stream_to_disk: bool = False


@dataclass(frozen=True)
class StoredInstance:
    """One instance durably in the spool, as handed to ``on_stored``."""

    path: Path
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    calling_ae: str
    peer_address: str
    received_at: datetime


@dataclass
class _AssocState:
    calling_ae: str
    called_ae: str
    peer: str
    stored: int = 0
    refused: int = 0
    series: set[tuple[str, str]] = field(default_factory=set)
    outcome: str = "open"  # released | aborted | rejected
    closed: bool = False
    logged: bool = False


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
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.on_stored = on_stored
        self.on_released = on_released
        self._server: Any = None
        self._lock = threading.Lock()
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
        """Start listening in background threads; returns at once."""
        if self._server is not None:
            raise RuntimeError("StorageSCP already started")
        if self.settings.stream_to_disk:
            _config.STORE_RECV_CHUNKED_DATASET = True
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_C_ECHO, self._on_c_echo),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        self._server = self.ae.start_server(
            (self.settings.host, self.settings.port), block=False, evt_handlers=handlers
        )
        LOG.info(
            "storage SCP %s listening on %s:%d (MR, Enhanced MR; %d transfer syntaxes)",
            self.settings.ae_title, self.settings.host, self.port, len(ACCEPTED_TRANSFER_SYNTAXES),
        )

    def stop(self) -> None:
        """Stop listening and end active associations."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server = None
        self.ae.shutdown()
        LOG.info("storage SCP %s stopped", self.settings.ae_title)

    @property
    def port(self) -> int:
        """The bound TCP port (useful when ``settings.port`` is 0)."""
        if self._server is None:
            return self.settings.port
        return int(self._server.server_address[1])

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
                st = _AssocState(
                    calling_ae=str(getattr(req, "ae_title", "") or "").strip(),
                    called_ae=str(getattr(prim, "called_ae_title", "") or "").strip(),
                    peer=f"{req.address}:{req.port}",
                )
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
                "association %s from %s (AE %s -> %s): %d instance(s) stored, %d refused, %d series",
                st.outcome, st.peer, st.calling_ae, st.called_ae, st.stored, st.refused, len(st.series),
            )

    def _on_conn_open(self, event: evt.Event) -> None:
        # Nagle + delayed ACK costs ~40 ms per C-STORE response round trip.
        try:
            sock = event.assoc.dul.socket.socket
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (AttributeError, OSError) as exc:  # pragma: no cover - platform specific
            LOG.warning("could not set TCP_NODELAY on accepted socket: %s", exc)

    def _on_established(self, event: evt.Event) -> None:
        st = self._state(event.assoc)
        accepted = {str(cx.abstract_syntax) for cx in event.assoc.accepted_contexts}
        refused = sorted(
            {str(cx.abstract_syntax) for cx in event.assoc.rejected_contexts} - accepted
        )
        if refused:
            # One line per association: storescu-like peers propose ~100 SOP classes.
            shown = ", ".join(refused[:10]) + (f" and {len(refused) - 10} more" if len(refused) > 10 else "")
            LOG.warning(
                "association from %s (AE %s): refused presentation contexts for %d SOP class(es) "
                "this node does not accept (only MR and Enhanced MR Image Storage): %s",
                st.peer, st.calling_ae, len(refused), shown,
            )

    def _on_rejected(self, event: evt.Event) -> None:
        st = self._state(event.assoc)
        self._finish(st, outcome="rejected")
        allowed = self.settings.allowed_calling_aets
        if allowed and st.calling_ae not in [a.strip() for a in allowed]:
            why = f"calling AE title {st.calling_ae!r} not recognised (not in the allow-list)"
        elif self.settings.require_called_aet and st.called_ae != self.settings.ae_title.strip():
            why = f"called AE title {st.called_ae!r} not recognised (this node is {self.settings.ae_title!r})"
        else:
            why = f"too many associations (limit {self.settings.max_associations}) or user identity refused"
        LOG.warning("rejected association from %s: %s", st.peer, why)

    def _on_released(self, event: evt.Event) -> None:
        st = self._state(event.assoc)
        self._finish(st, outcome="released")
        if st.series:
            try:
                self.on_released(set(st.series))
            except Exception:  # the instances are stored; the idle timeout still applies
                LOG.exception("on_released callback failed for association from %s", st.peer)

    def _on_aborted(self, event: evt.Event) -> None:
        self._finish(self._state(event.assoc), outcome="aborted")

    def _on_conn_close(self, event: evt.Event) -> None:
        st = self._state(event.assoc)
        if st.outcome == "open" and getattr(event.assoc, "is_aborted", False):
            self._finish(st, outcome="aborted")
        self._finish(st, closed=True)

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
            LOG.warning(
                "refused C-STORE from %s (AE %s) of SOP instance %s: status 0x%04X: %s",
                st.peer, st.calling_ae, _safe_uid(sop_uid_cmd), ref.status, ref.reason,
            )
            if ref.quarantine:
                self.spool.quarantine(_source(event), f"from {st.peer} AE {st.calling_ae}: {ref.reason}")
            return ref.status
        except Exception:  # never answer success on an unexpected error
            st.refused += 1
            LOG.exception("C-STORE from %s failed unexpectedly; answering 0xA700", st.peer)
            return STATUS_OUT_OF_RESOURCES
        st.stored += 1
        st.series.add((inst.study_uid, inst.series_uid))
        return STATUS_SUCCESS

    def _store(self, event: evt.Event, st: _AssocState) -> StoredInstance:
        req = event.request
        cx_sop_class = str(event.context.abstract_syntax)
        src = _source(event)
        size = len(src) if isinstance(src, bytes) else src.stat().st_size
        limit = self.settings.max_instance_bytes
        if limit and size > limit:
            raise _Refusal(STATUS_OUT_OF_RESOURCES, f"dataset of {size} bytes exceeds the limit of {limit} bytes")
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
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= 80 else text[:80] + "..."
