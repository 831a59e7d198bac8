"""Running the node as a service: signals, and the systemd protocol (READY, WATCHDOG, STOPPING).

Apart from :class:`~rtcontrast.node.service.Node` because it is about the process, not the
node: which signals mean what, and what systemd is told while the node runs.
"""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType
from typing import TYPE_CHECKING

from rtcontrast.node.ops import systemd as sd

if TYPE_CHECKING:
    from rtcontrast.node.service import Node

log = logging.getLogger(__name__)


def supervise(node: Node) -> None:
    """Start, then block until SIGTERM/SIGINT (or :meth:`request_stop`), then stop cleanly.

    Under systemd (``$NOTIFY_SOCKET``): READY=1 once the SCP listens, WATCHDOG=1 while
    :meth:`healthy`, STOPPING=1 at shutdown.  SIGHUP reloads the protocol (the signal
    handler only sets a flag; the reload runs in this loop, not in the handler).
    """
    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        node._stop.set()
        node._stop_wait.set()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        node._reload_requested.set()
        node._stop_wait.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    old[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
    watchdog = sd.Watchdog()
    try:
        node.start()
        sd.notify(f"READY=1\nSTATUS=listening on port {node.port}, protocol {node.protocol.audit_version}"
                  f"\nMAINPID={os.getpid()}")
        if watchdog.enabled:
            log.info("systemd watchdog: %.0f s, pinging every %.1f s while healthy",
                     watchdog.timeout_s, watchdog.period_s)
        while not node._stop.is_set():
            if node._reload_requested.is_set():
                node._reload_requested.clear()
                sd.notify("STATUS=reloading protocol")
                node.reload()
                sd.notify(f"STATUS=listening on port {node.port}, protocol {node.protocol.audit_version}")
            watchdog.maybe_ping(node.healthy())
            node._stop_wait.wait(min(1.0, watchdog.period_s))
            node._stop_wait.clear()
    finally:
        sd.notify("STOPPING=1")
        node.stop()
        for s, h in old.items():
            signal.signal(s, h)

