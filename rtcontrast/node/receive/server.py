"""The SCP's listening server: pynetdicom's threaded server with admission before cost and per-connection TLS.

Kept apart from :mod:`rtcontrast.node.receive.scp` (the DIMSE side) because it is about
sockets and threads: what a connection must do before pynetdicom spends an association
on it (:mod:`rtcontrast.node.receive.admission`), and where the TLS handshake runs.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from rtcontrast.node.receive.admission import (
    ConnectionGate,
    await_association_request,
    inspect_association_request,
    peek_pdu,
    safe_text,
)

__all__ = ["AssociationServer", "PduLimitedSocket", "inheriting"]

LOG = logging.getLogger("rtcontrast.node.receive.scp")  # one logger for the receive side's refusals


class AssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with admission before cost and the TLS handshake per connection.

    pynetdicom wraps accepted sockets with ``do_handshake_on_connect`` in the accepting
    thread: a client that connects and stays silent blocks every later connection.  Here
    the handshake happens per connection, bounded by ``handshake_timeout_s``, and a
    failure (plain DICOM on the TLS port, an untrusted certificate) is logged and closed.

    The :class:`~rtcontrast.node.receive.admission.ConnectionGate` runs at accept
    (:meth:`verify_request`: allow-listed address, per-peer and pending limits) and the
    complete A-ASSOCIATE-RQ must be buffered within ``request_timeout_s`` before
    pynetdicom creates an association for the socket (see the admission module).
    """

    handshake_timeout_s: float = 10.0
    request_timeout_s: float = 10.0
    max_pdu_bytes: int = 0
    gate: ConnectionGate | None = None
    #: A listening socket inherited from the node's main process (a receiver process,
    #: :mod:`rtcontrast.node.receive.workers`): used as it is, not bound again.
    inherited_socket: socket.socket | None = None
    _last_refusal_log: dict[str, float]

    def server_bind(self) -> None:
        if self.inherited_socket is None:
            super().server_bind()
            return
        self.socket.close()  # the fresh unbound socket TCPServer made
        self.socket = self.inherited_socket
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self.inherited_socket is None:
            super().server_activate()

    def share(self) -> socket.socket:
        """Make the listening socket shareable with receiver processes; return it.

        Several processes then accept from one socket (the pre-fork model): whichever is
        free takes the next connection.  Non-blocking, so that a process that loses the
        race for a connection gets EAGAIN at once (socketserver ignores it) instead of
        waiting in accept() for the next one.
        """
        self.socket.setblocking(False)
        return self.socket

    def _established(self, host: str) -> int:
        return sum(1 for a in self.ae.active_associations
                   if a.is_acceptor and getattr(a.requestor, "address", None) == host)

    def _log_refusal(self, host: str, port: int, why: str) -> None:
        """One WARNING per address and 10 s (a flood must not flood the journal too)."""
        now = time.monotonic()
        last = self.__dict__.setdefault("_last_refusal_log", {})
        if now - last.get(host, -1e9) < 10.0:
            return
        last[host] = now
        if len(last) > 10000:
            last.clear()
        LOG.warning("refused connection from %s:%s on port %d before any association: %s",
                    safe_text(host), port, self.server_address[1], why)

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """At accept, before any byte is read (listener thread: cheap checks only)."""
        if self.gate is None:
            return True
        host = str(client_address[0])
        why = self.gate.admit(host, self._established(host))
        if why is not None:
            self._log_refusal(host, client_address[1], why)
            return False
        return True

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client_socket, address = self.socket.accept()
        if self.socket.gettimeout() == 0:  # a shared listener: the connection itself blocks as usual
            client_socket.setblocking(True)
        if self.ssl_context:
            client_socket = self.ssl_context.wrap_socket(
                client_socket, server_side=True, do_handshake_on_connect=False
            )
        return client_socket, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if not self._pre_association(request, client_address):
                return
            if self.max_pdu_bytes and not isinstance(request, ssl.SSLSocket):
                request = PduLimitedSocket(request, self.max_pdu_bytes, f"{client_address[0]}:{client_address[1]}")
            super().process_request_thread(request, client_address)  # the association thread starts here
        finally:
            if self.gate is not None:
                self.gate.done(str(client_address[0]))

    def _pre_association(self, request: Any, client_address: Any) -> bool:
        """TLS handshake and the complete association request, both bounded; False: closed."""
        if isinstance(request, ssl.SSLSocket):
            previous = request.gettimeout()
            try:
                request.settimeout(self.handshake_timeout_s)
                request.do_handshake()
                request.settimeout(previous)
            except (OSError, ValueError) as exc:  # ssl.SSLError and timeouts are OSErrors
                reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
                if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE"):
                    reason += " (the peer does not speak TLS: plain DICOM on the TLS port?)"
                LOG.warning(
                    "refused TLS connection from %s:%s on port %d: handshake failed: %s",
                    client_address[0], client_address[1], self.server_address[1], reason,
                )
                self.shutdown_request(request)
                return False
        if self.gate is not None:
            why = await_association_request(request, self.request_timeout_s)
            if why is not None:
                self._log_refusal(str(client_address[0]), client_address[1], why)
                self.shutdown_request(request)
                return False
            if not isinstance(request, ssl.SSLSocket):
                malformed = inspect_association_request(peek_pdu(request))
                if malformed is not None:
                    why, rsr, reply = malformed
                    LOG.warning("refused association from %s:%s: malformed A-ASSOCIATE-RQ: %s; "
                                "A-ASSOCIATE-RJ result %d, source %d, reason %d",
                                safe_text(client_address[0]), client_address[1], why, *rsr)
                    try:
                        request.sendall(reply)
                    except OSError:
                        pass
                    self.shutdown_request(request)
                    return False
        return True



def inheriting(sock: socket.socket | None) -> type[AssociationServer]:
    """The server class for a listener: :class:`AssociationServer` itself, or one that uses ``sock``."""
    if sock is None:
        return AssociationServer
    sock.setblocking(False)
    return type("InheritedAssociationServer", (AssociationServer,), {"inherited_socket": sock})


#: A-ABORT (PS3.8 9.3.8): source service-provider, reason invalid PDU parameter value.
_ABORT_INVALID_PARAMETER = b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"
#: Other PDUs than P-DATA-TF are small; this bounds them too.
_MAX_OTHER_PDU = 1 << 16


class PduLimitedSocket:
    """A plain socket proxy that enforces the PDU size this node offered (#15 finding 10).

    pynetdicom reads whatever PDU length a peer announces, so an 8 MiB P-DATA-TF against
    a negotiated 256 KiB was accepted (and a 4 GiB one would be allocated).  This proxy
    follows the PDU headers in the byte stream pynetdicom reads; a P-DATA-TF longer than
    ``max_pdu`` (or another PDU over 64 KiB) gets an A-ABORT (invalid PDU parameter
    value), one log line, and the connection is closed before its body is read.
    Everything else is delegated to the wrapped socket.
    """

    def __init__(self, sock: socket.socket, max_pdu: int, peer: str) -> None:
        self._sock = sock
        self._max_pdu = max_pdu
        self._peer = peer
        self._header = b""
        self._remaining = 0  # body bytes of the current PDU still to come
        self._closed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    def recv(self, n: int, *flags: int) -> bytes:
        if self._closed:
            return b""
        data = self._sock.recv(n, *flags)
        if data and not flags:
            why = self._scan(data)
            if why is not None:
                LOG.warning("aborted association from %s: %s; A-ABORT sent", safe_text(self._peer), why)
                self._closed = True
                try:
                    self._sock.sendall(_ABORT_INVALID_PARAMETER)
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return b""
        return data

    def _scan(self, data: bytes) -> str | None:
        view = memoryview(data)
        while view:
            if self._remaining:
                take = min(self._remaining, len(view))
                self._remaining -= take
                view = view[take:]
                continue
            need = 6 - len(self._header)
            self._header += bytes(view[:need])
            view = view[need:]
            if len(self._header) < 6:
                return None
            kind, length = self._header[0], int.from_bytes(self._header[2:6], "big")
            self._header = b""
            limit = self._max_pdu if kind == 0x04 else max(self._max_pdu, _MAX_OTHER_PDU)
            if length > limit:
                what = "P-DATA-TF" if kind == 0x04 else f"PDU type 0x{kind:02X}"
                return f"{what} of {length} bytes exceeds the negotiated maximum of {limit} bytes (max_pdu_bytes)"
            self._remaining = length
        return None
