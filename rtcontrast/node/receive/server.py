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
    safe_text,
)

__all__ = ["AssociationServer"]

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
    gate: ConnectionGate | None = None
    _last_refusal_log: dict[str, float]

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
        if self.ssl_context:
            client_socket = self.ssl_context.wrap_socket(
                client_socket, server_side=True, do_handshake_on_connect=False
            )
        return client_socket, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            if not self._pre_association(request, client_address):
                return
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
        return True
