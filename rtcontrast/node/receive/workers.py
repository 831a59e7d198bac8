"""Receiver processes: several Python processes accept from the node's one listening socket.

Why: pynetdicom runs two busy threads per association (the DUL reactor and the
association's own loop) and everything it does holds the GIL, so one process receives
at the speed of one core however many scanners send at once (#13: 1.06x pynetdicom's
storescp with four senders on two cores).  With ``receive_processes: N`` the node's main
process starts N - 1 receiver processes that inherit its listening socket(s) (the
pre-fork model of Apache and gunicorn): whichever process is free accepts the next
connection, so concurrent associations spread over the cores.

What stays the same in a receiver process: it is the same
:class:`~rtcontrast.node.receive.scp.StorageSCP` (admission, TLS, PDU limit, refusals,
quarantine) writing to the same spool, and it records each instance in the same SQLite
database (``BEGIN IMMEDIATE`` transactions serialise the processes; a duplicate SOP
Instance UID is refused 0x0111 as before) *before* it answers Success.  Then it tells
the main process, which owns the series tracker, metrics and jobs, through a pipe of
JSON lines: ``stored``, ``released`` and ``end`` (how an association ended), in the
order they happened in that process.  If the main process dies, the pipe it holds on
the receiver's stdin closes and the receiver exits (and Linux's parent-death signal
kills it anyway); what it had acknowledged is in the spool and the database, so the
next start finds it (``series_with_unconsumed_instances``).  A receiver that dies is
logged and started again; the listening socket stays open in the main process, which
accepts connections itself meanwhile.

Limits such as ``max_associations`` apply per process (each runs its own pynetdicom
AE): with N processes up to N x ``max_associations`` associations may be open.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from rtcontrast.node.receive.scp_settings import ScpSettings, ScpTls, StoredInstance

if TYPE_CHECKING:
    from rtcontrast.node.receive.scp import StorageSCP
    from rtcontrast.settings.node import NodeConfig

__all__ = ["ReceiverPool", "ReceiverCallbacks", "start_receivers"]

log = logging.getLogger(__name__)

#: How long a receiver process may take to import, inherit the socket(s) and say ready.
_READY_TIMEOUT_S = 60.0
_Refusals = list[tuple[tuple[str, str] | None, str | None, int]]


@dataclasses.dataclass(frozen=True)
class ReceiverCallbacks:
    """What the main process does with a receiver's events (the node's own handlers)."""

    recorded: Callable[[str, str], None]  # (study, series): the instance is in the spool and the database
    released: Callable[[set[tuple[str, str]]], None]
    association_end: Callable[[str, set[tuple[str, str]], _Refusals], None]


@dataclasses.dataclass
class _Child:
    index: int
    proc: subprocess.Popen[bytes]
    events: IO[str]
    ready: threading.Event
    reader: threading.Thread | None = None


class ReceiverPool:
    """N - 1 receiver processes beside the main process's own listener; started and stopped with the node."""

    def __init__(self, count: int, settings: ScpSettings, listeners: dict[str, socket.socket], *,
                 spool_root: Path, min_free_bytes: int, db_file: Path, log_format: str, log_level: str,
                 callbacks: ReceiverCallbacks) -> None:
        self.count = count
        self.settings = settings
        self.listeners = listeners
        self.callbacks = callbacks
        self._config = {
            "settings": dataclasses.asdict(settings),
            "spool": str(spool_root), "min_free_bytes": min_free_bytes, "db": str(db_file),
            "log_format": log_format, "log_level": log_level,
        }
        self._children: dict[int, _Child] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._restarts: dict[int, int] = {}
        self._ready: dict[int, threading.Event] = {}
        self._spawn_q: queue.Queue[int | None] = queue.Queue()
        self._supervisor: threading.Thread | None = None

    def start(self) -> None:
        """Start the receivers and wait until each listens; raise if one does not."""
        self._ready = {index: threading.Event() for index in range(1, self.count)}
        self._supervisor = threading.Thread(target=self._supervise, name="receivers", daemon=True)
        self._supervisor.start()
        for index in self._ready:
            self._spawn_q.put(index)
        deadline = time.monotonic() + _READY_TIMEOUT_S
        for index, ready in self._ready.items():
            if not ready.wait(max(0.1, deadline - time.monotonic())):
                child = self._children.get(index)
                self.stop()
                raise RuntimeError(f"receiver process {index} did not start listening within {_READY_TIMEOUT_S:.0f} s "
                                   f"(exit code {None if child is None else child.proc.poll()}); see its log lines")
        log.info("%d receiver process(es) accept beside the main process (receive_processes %d; pids %s)",
                 self.count - 1, self.count, ", ".join(str(pid) for pid in self.pids()))

    def _supervise(self) -> None:
        """Every receiver is started from this one thread, which lives as long as the pool.

        Linux's parent-death signal fires when the *thread* that started a process ends,
        so a receiver started from a short-lived thread (the reader of a dead one) would
        be killed at once.
        """
        while True:
            index = self._spawn_q.get()
            if index is None or self._stopping.is_set():
                return
            try:
                self._spawn(index)
            except Exception:  # e.g. out of processes: try again later, the main process accepts meanwhile
                log.exception("receiver process %d could not be started; retrying in 30 s", index)
                threading.Timer(30.0, self._spawn_q.put, args=(index,)).start()

    def pids(self) -> list[int]:
        with self._lock:
            return [c.proc.pid for c in self._children.values()]

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask every receiver to stop (close its stdin), wait, then kill what is left."""
        self._stopping.set()
        self._spawn_q.put(None)
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join(5.0)
        with self._lock:
            children = list(self._children.values())
        for c in children:
            try:
                if c.proc.stdin is not None:
                    c.proc.stdin.close()
            except OSError:
                pass
        deadline = time.monotonic() + timeout_s
        for c in children:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("receiver process %d (pid %d) did not stop in time: killed", c.index, c.proc.pid)
                c.proc.kill()
                c.proc.wait()
        for c in children:
            if c.reader is not None and c.reader is not threading.current_thread():
                c.reader.join(2.0)

    # ------------------------------------------------------------------ children
    def _spawn(self, index: int) -> None:
        read_fd, write_fd = os.pipe()
        fds = {name: sock.fileno() for name, sock in self.listeners.items()}
        config = dict(self._config, index=index, fds=fds, events_fd=write_fd)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "rtcontrast.node.receive.workers"], env=_child_env(),
                stdin=subprocess.PIPE, pass_fds=[write_fd, *fds.values()], close_fds=True,
            )
        finally:
            os.close(write_fd)
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(config).encode() + b"\n")
        proc.stdin.flush()
        child = _Child(index, proc, os.fdopen(read_fd, "r", encoding="utf-8"), self._ready[index])
        child.reader = threading.Thread(target=self._read, args=(child,), name=f"receiver-{index}-events",
                                        daemon=True)
        with self._lock:
            self._children[index] = child
        child.reader.start()

    def _read(self, child: _Child) -> None:
        """Hand the child's events to the node, in order; restart the child if it dies."""
        cb = self.callbacks
        with child.events:
            for line in child.events:
                try:
                    ev = json.loads(line)
                    kind = ev["e"]
                    if kind == "stored":
                        cb.recorded(ev["study"], ev["series"])
                    elif kind == "released":
                        cb.released({(a, b) for a, b in ev["keys"]})
                    elif kind == "end":
                        refusals: _Refusals = [(None if k is None else (k[0], k[1]), sop, int(status))
                                               for k, sop, status in ev["refusals"]]
                        cb.association_end(ev["outcome"], {(a, b) for a, b in ev["series"]}, refusals)
                    elif kind == "ready":
                        child.ready.set()
                except Exception:  # one bad event must not stop the others (the data is durable)
                    log.exception("receiver process %d: event not handled: %.200s", child.index, line)
        code = child.proc.wait()
        if self._stopping.is_set():
            return
        n = self._restarts[child.index] = self._restarts.get(child.index, 0) + 1
        delay = min(30.0, 0.5 * 2 ** min(n, 6))
        log.error("receiver process %d (pid %d) exited with code %s; the main process accepts meanwhile; "
                  "restarting it in %.1f s (restart %d)", child.index, child.proc.pid, code, delay, n)
        if not self._stopping.wait(delay):
            self._spawn_q.put(child.index)


def start_receivers(config: NodeConfig, scp: StorageSCP, callbacks: ReceiverCallbacks) -> ReceiverPool | None:
    """The node's receiver processes (``receive_processes`` - 1 of them, sharing ``scp``'s listeners), started."""
    if config.receive_processes <= 1:
        return None
    pool = ReceiverPool(config.receive_processes, scp.settings, scp.share_listeners(),
                        spool_root=config.spool_path, min_free_bytes=config.limits.min_free_disk_bytes,
                        db_file=config.db_file, log_format=config.log_format, log_level=config.log_level,
                        callbacks=callbacks)
    pool.start()
    return pool


# ---------------------------------------------------------------------- the receiver process
def _child_env() -> dict[str, str]:
    """This environment, with this very package first on the path (``python node.py`` from a checkout)."""
    root = str(Path(__file__).resolve().parents[3])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when the main process dies (a receiver must never outlive it)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the closed stdin still ends the process
        pass


def _child_main() -> int:
    _die_with_parent()
    config = json.loads(sys.stdin.buffer.readline())
    from rtcontrast.node.ops.logs import setup_logging
    from rtcontrast.node.receive.scp import StorageSCP
    from rtcontrast.node.receive.spool import Spool
    from rtcontrast.node.store import db
    from rtcontrast.node.store.jobs import JobStore

    tag = f"receiver-{config['index']}"

    def tagged(record: logging.LogRecord) -> bool:  # every line says which process wrote it
        record.threadName = f"{tag}/{record.threadName}"
        return True

    setup_logging(config["log_format"], config["log_level"]).addFilter(tagged)
    raw = dict(config["settings"])
    if raw.get("tls") is not None:
        raw["tls"] = ScpTls(**raw["tls"])
    settings = ScpSettings(**raw)
    out = os.fdopen(config["events_fd"], "w", encoding="utf-8", buffering=1)
    lock = threading.Lock()

    def send(**event: Any) -> None:
        with lock:
            out.write(json.dumps(event) + "\n")

    jobs = JobStore(db.connect(config["db"]))

    def on_stored(inst: StoredInstance) -> None:
        jobs.record_instance(inst)  # durable (and a duplicate refused) before the Success response
        send(e="stored", study=inst.study_uid, series=inst.series_uid)

    def on_end(outcome: str, series: set[tuple[str, str]], refusals: _Refusals) -> None:
        send(e="end", outcome=outcome, series=sorted(series), refusals=refusals)

    listeners = {name: socket.socket(fileno=fd) for name, fd in config["fds"].items()}
    scp = StorageSCP(settings, Spool(config["spool"], config["min_free_bytes"]), on_stored=on_stored,
                     on_released=lambda keys: send(e="released", keys=sorted(keys)),
                     on_association_end=on_end, listeners=listeners)
    scp.start()
    send(e="ready")

    def on_term(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    try:
        sys.stdin.buffer.read()  # until the main process closes the pipe (stop) or dies
    finally:
        scp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
