"""Admission before cost: who may connect, and what a connection must do before it takes a slot.

Why this exists (issue #15, finding 1): pynetdicom creates an association - a thread and
one of ``max_associations`` slots - for every accepted TCP connection, and applies the
allow-lists only once a complete A-ASSOCIATE-RQ has arrived.  Four connections that sent
three bytes and stayed open blocked every scanner for as long as they were held.  So:

* **At accept** (:meth:`ConnectionGate.admit`, in the listener thread, no data read): a
  peer address outside ``allowed_ips`` is closed at once; one address may hold at most
  ``max_associations_per_peer`` connections (pending plus established), and at most
  ``max_pending_connections`` connections may wait for their association request.
* **Before the association exists** (:func:`await_association_request`, in the
  connection's own thread): the complete first PDU must arrive within
  ``association_request_timeout_s``, be an A-ASSOCIATE-RQ and be of sane size; else the
  connection is closed with one log line.  Only then does pynetdicom see the socket, so
  half-open, silent, trickling or connect-and-close peers never take an association slot.

:class:`Admission` is the one admission check of the node (addresses with their
IPv4-mapped IPv6 form, calling and called AE titles): the gate and the SCP's
A-ASSOCIATE-RQ handler both use it.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterable

__all__ = ["Admission", "ConnectionGate", "await_association_request", "rj_text", "safe_text"]

#: A-ASSOCIATE-RQ PDU type (PS3.8 9.3.2).
_ASSOCIATE_RQ = 0x01
#: An A-ASSOCIATE-RQ with 128 presentation contexts stays far below this (and below the socket
#: receive buffer, which the peek needs to hold the whole PDU).
MAX_ASSOCIATE_RQ_BYTES = 1 << 16


def safe_text(value: object, limit: int = 80) -> str:
    """A peer-supplied string for a log line: printable, no line breaks, bounded.

    Why: a calling AE title with a newline forged a second log line (finding 10).
    """
    text = "".join(c if c.isprintable() else "?" for c in str(value))
    return text if len(text) <= limit else text[:limit] + "..."


# PS3.8 9.3.4: A-ASSOCIATE-RJ (result, source, reason) names for the log.
_RJ_RESULT = {1: "rejected-permanent", 2: "rejected-transient"}
_RJ_SOURCE = {1: "service-user", 2: "service-provider (ACSE)", 3: "service-provider (presentation)"}
_RJ_REASON = {
    (1, 1): "no reason given", (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised", (1, 7): "called AE title not recognised",
    (2, 1): "no reason given", (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion", (3, 2): "local limit exceeded",
}


def rj_text(result: int, source: int, reason: int) -> str:
    """An A-ASSOCIATE-RJ as words for a log line."""
    return (
        f"A-ASSOCIATE-RJ {_RJ_RESULT.get(result, result)}, source {_RJ_SOURCE.get(source, source)}, "
        f"reason {reason} ({_RJ_REASON.get((source, reason), '?')})"
    )


class Admission:
    """Allow-lists: peer networks, calling AE titles, the called AE title."""

    def __init__(
        self,
        allowed_networks: Iterable[str] | None,
        allowed_calling_aets: Iterable[str] | None,
        ae_title: str,
        require_called_aet: bool,
    ) -> None:
        self.networks = [ipaddress.ip_network(n, strict=False) for n in allowed_networks or ()]
        self.calling = [a.strip() for a in allowed_calling_aets or ()]
        self.ae_title = ae_title.strip()
        self.require_called_aet = require_called_aet

    def address_allowed(self, host: str) -> bool:
        """True when no address allow-list is set or ``host`` is in it (``::ffff:a.b.c.d`` as IPv4)."""
        if not self.networks:
            return True
        try:
            addr = ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # a dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d
        return any(addr in net for net in self.networks if net.version == addr.version)

    def verdict(self, host: str, calling_ae: str, called_ae: str) -> tuple[int, str] | None:
        """``(A-ASSOCIATE-RJ reason, why)`` (rejected-permanent, service-user), or None to accept."""
        if not self.address_allowed(host):
            return 1, f"peer address {safe_text(host)} is not in allowed_ips"
        if self.calling and calling_ae.strip() not in self.calling:
            return 3, f"calling AE title {safe_text(calling_ae)!r} is not in the allow-list"
        if self.require_called_aet and called_ae.strip() != self.ae_title:
            return 7, f"called AE title {safe_text(called_ae)!r} is not this node's ({self.ae_title!r})"
        return None


class ConnectionGate:
    """Counts of connections per peer address, pending (no association yet) and total.

    ``established(host)`` is asked for the number of associations pynetdicom holds for a
    host, so the per-peer limit covers both stages.  Thread-safe.
    """

    def __init__(self, admission: Admission, max_per_peer: int, max_pending: int) -> None:
        self.admission = admission
        self.max_per_peer = max(1, max_per_peer)
        self.max_pending = max(1, max_pending)
        self._pending: Counter[str] = Counter()
        self._lock = threading.Lock()

    def admit(self, host: str, established: int) -> str | None:
        """Why a new connection from ``host`` is closed at accept, or None (it is counted pending)."""
        if not self.admission.address_allowed(host):
            return "peer address is not in allowed_ips"
        with self._lock:
            if self._pending[host] + established >= self.max_per_peer:
                return (f"this address already holds {self._pending[host] + established} connection(s) "
                        f"(max_associations_per_peer {self.max_per_peer})")
            if sum(self._pending.values()) >= self.max_pending:
                return f"{self.max_pending} connections are already waiting for their association request"
            self._pending[host] += 1
        return None

    def done(self, host: str) -> None:
        """The connection from ``host`` left the pending stage (association created, or closed)."""
        with self._lock:
            self._pending[host] -= 1
            if self._pending[host] <= 0:
                del self._pending[host]

    def pending(self) -> int:
        with self._lock:
            return sum(self._pending.values())


def await_association_request(sock: socket.socket, timeout_s: float) -> str | None:
    """Wait until a complete A-ASSOCIATE-RQ PDU is buffered on ``sock``; None, or why not.

    Reads with ``MSG_PEEK`` only, so pynetdicom later reads the same bytes (and
    :func:`peek_pdu` can inspect them).  TLS sockets cannot peek; for them the handshake
    timeout bounds the silent case and this returns None.
    """
    if isinstance(sock, ssl.SSLSocket):
        return None
    deadline = time.monotonic() + timeout_s
    previous = sock.gettimeout()
    need = 6
    seen = 0
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return (f"no complete association request within {timeout_s:g} s "
                        f"({seen} byte(s) received; association_request_timeout_s)")
            sock.settimeout(left)
            try:
                data = sock.recv(need, socket.MSG_PEEK)
            except TimeoutError:
                continue
            except OSError as exc:
                return f"connection error before the association request: {exc}"
            if not data:
                return f"closed by the peer before a complete association request ({seen} byte(s))"
            seen = len(data)
            if len(data) >= 6 and need == 6:
                if data[0] != _ASSOCIATE_RQ:
                    return f"first PDU is type 0x{data[0]:02X}, not an A-ASSOCIATE-RQ"
                length = int.from_bytes(data[2:6], "big")
                if length > MAX_ASSOCIATE_RQ_BYTES:
                    return f"association request of {length} bytes exceeds {MAX_ASSOCIATE_RQ_BYTES}"
                need = 6 + length
            if len(data) >= need:
                return None
            time.sleep(0.01)  # more bytes of the same PDU are on their way (PEEK returns what is buffered)
    finally:
        try:
            sock.settimeout(previous)
        except OSError:
            pass


def peek_pdu(sock: socket.socket) -> bytes:
    """The first PDU buffered on ``sock`` (after :func:`await_association_request` said it is all there)."""
    head = sock.recv(6, socket.MSG_PEEK)
    return sock.recv(6 + int.from_bytes(head[2:6], "big"), socket.MSG_PEEK)


def _rj(result: int, source: int, reason: int) -> bytes:
    """An A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return b"\x03\x00" + (4).to_bytes(4, "big") + bytes([0, result, source, reason])


def inspect_association_request(pdu: bytes) -> tuple[str, tuple[int, int, int], bytes] | None:
    """Structural checks pynetdicom does not make (or makes with a traceback and no reply).

    Returns ``(why, (result, source, reason), A-ASSOCIATE-RJ PDU)`` for a malformed
    request, else None.  Checked: the fixed fields are there, the AE titles hold only
    characters an AE title may have (a newline forged a log line, #15 finding 10),
    presentation context IDs are odd and unique (an even one got no reply and a
    traceback), items are not truncated.
    """
    def bad(why: str, rsr: tuple[int, int, int]) -> tuple[str, tuple[int, int, int], bytes]:
        return why, rsr, _rj(*rsr)

    if len(pdu) < 74:
        return bad(f"association request of {len(pdu)} bytes is shorter than its fixed fields", (1, 2, 1))
    for name, raw, reason in (("called", pdu[10:26], 7), ("calling", pdu[26:42], 3)):
        if any(b < 0x20 or b > 0x7E or b == 0x5C for b in raw):
            shown = safe_text(raw.decode("latin-1"))
            return bad(f"{name} AE title {shown!r} holds characters an AE title cannot have", (1, 1, reason))
    ids: list[int] = []
    pos = 74
    while pos < len(pdu):
        if pos + 4 > len(pdu):
            return bad("truncated item header in the association request", (1, 2, 1))
        kind, length = pdu[pos], int.from_bytes(pdu[pos + 2:pos + 4], "big")
        if pos + 4 + length > len(pdu):
            return bad(f"item 0x{kind:02X} runs past the end of the association request", (1, 2, 1))
        if kind == 0x20:
            cid = pdu[pos + 4] if length >= 1 else 0
            if cid % 2 == 0:
                return bad(f"presentation context ID {cid} is not odd (PS3.8 9.3.2.2: odd, 1-255)", (1, 2, 1))
            if cid in ids:
                return bad(f"presentation context ID {cid} is used twice", (1, 2, 1))
            ids.append(cid)
        pos += 4 + length
    return None
