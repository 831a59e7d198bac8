"""systemd service integration without a dependency: sd_notify and the watchdog.

Why hand-written: the protocol is one datagram to the UNIX socket named by
``$NOTIFY_SOCKET`` (``READY=1``, ``WATCHDOG=1``, ``STATUS=...``; see sd_notify(3)); a
dozen lines here beat a C extension (python-systemd) that has to be built on the target.
The socket may be a path or an abstract-namespace name (leading ``@``, sent as a NUL).

Outside systemd (no ``$NOTIFY_SOCKET``) every function is a cheap no-op, so the node
calls them unconditionally.

The watchdog: with ``WatchdogSec=`` in the unit, systemd sets ``$WATCHDOG_USEC`` (and
``$WATCHDOG_PID``); the service must send ``WATCHDOG=1`` at least that often or it is
killed and restarted (``Restart=on-failure``).  :class:`Watchdog` pings at half the
interval, and the node only calls it while its threads are healthy, so a hung scheduler
or a dead worker turns into a restart instead of a node that listens but does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["notify", "watchdog_interval_s", "Watchdog"]

log = logging.getLogger(__name__)


def _address(env: Mapping[str, str]) -> str | None:
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr.startswith("@"):  # abstract namespace
        return "\0" + addr[1:]
    return addr


def notify(state: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=listening"``) to systemd; True when sent.

    Never raises: a service must not die because its supervisor's socket is gone.  Never
    blocks either: a datagram socket whose reader is behind (Linux queues at most
    ``net.unix.max_dgram_qlen`` datagrams, 10 by default) would otherwise stop the main
    loop in ``send`` — and with it SIGTERM handling — until the reader catches up.  A
    message that finds the queue full is dropped (the next watchdog ping follows within
    a period).
    """
    addr = _address(os.environ if env is None else env)
    if addr is None:
        return False
    if addr.startswith("vsock:"):  # systemd >= 254 in VMs; not supported here
        log.debug("NOTIFY_SOCKET %s (vsock) not supported", addr)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.send(state.encode("utf-8"), socket.MSG_DONTWAIT)
        return True
    except BlockingIOError:
        log.debug("sd_notify(%s) dropped: the supervisor's queue is full", state.split("\n", 1)[0])
        return False
    except OSError as exc:
        log.warning("sd_notify(%s) failed: %s", state.split("\n", 1)[0], exc)
        return False


def watchdog_interval_s(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout systemd expects us to honour, in seconds, or None when off.

    ``$WATCHDOG_PID``, when set, must be this process (a child must not ping for us).
    """
    env = os.environ if env is None else env
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


class Watchdog:
    """Pings ``WATCHDOG=1`` at half the configured interval; call :meth:`maybe_ping` often."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.timeout_s = watchdog_interval_s(env)
        self._env = env
        self._last = 0.0

    @property
    def enabled(self) -> bool:
        return self.timeout_s is not None

    @property
    def period_s(self) -> float:
        """How often to ping (half the timeout); a long period when disabled."""
        return self.timeout_s / 2 if self.timeout_s is not None else 3600.0

    def maybe_ping(self, healthy: bool, now: float | None = None) -> bool:
        """Ping if due and ``healthy``; True when a ping was sent.

        An unhealthy node stops pinging: systemd then kills and restarts it after the
        timeout (and logs "Watchdog timeout").
        """
        if self.timeout_s is None or not healthy:
            return False
        now = time.monotonic() if now is None else now
        if now - self._last < self.period_s:
            return False
        self._last = now
        return notify("WATCHDOG=1", self._env)
