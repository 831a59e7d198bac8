"""Group commit: concurrent callers share one durable write, each still waits for it.

Why: every received instance must be durable (file fsync, directory fsync, SQLite commit
with ``synchronous=FULL``) before the SCP answers *Success*.  With several associations at
once (4 scanners/consoles, or a re-send beside a new series), each of them paying its own
directory fsync and its own WAL fsync serialises them on the disk.  Here the first caller
becomes the *leader*: it takes every request queued so far and does the work once (one
fsync per distinct directory, one SQLite transaction for all rows); callers arriving
meanwhile queue for the next round and are led by one of them.  Nobody returns before the
round holding its request has finished, so the guarantee per instance is unchanged; with a
single caller a round is exactly the old one-at-a-time write (no waiting, no timer).

A failure of a round is raised in every caller of that round (each answers its own
C-STORE with a failure status); per-request outcomes (a duplicate UID refused in one
row) are returned by ``work`` per request.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["GroupCommit"]

Req = TypeVar("Req")
Res = TypeVar("Res")


@dataclass
class _Round(Generic[Req, Res]):
    requests: list[Req] = field(default_factory=list)
    results: list[Res] | None = None
    error: BaseException | None = None
    done: bool = False


class GroupCommit(Generic[Req, Res]):
    """Run ``work(requests) -> results`` (one result per request, same order) for concurrent callers in rounds."""

    def __init__(self, work: Callable[[Sequence[Req]], list[Res]]) -> None:
        self._work = work
        self._cv = threading.Condition()
        self._open: _Round[Req, Res] = _Round()
        self._busy = False
        #: rounds run and requests served (tests and the benchmark read them: grouping happened)
        self.rounds = 0
        self.requests = 0

    def submit(self, request: Req) -> Res:
        """Queue ``request``, wait for the round that carries it, return its result (or raise the round's error)."""
        with self._cv:
            rnd = self._open
            rnd.requests.append(request)
            index = len(rnd.requests) - 1
            while not rnd.done:
                if self._busy:
                    self._cv.wait()
                    continue
                # lead: the open round is ours (an earlier one being run would have kept us waiting)
                self._busy = True
                self._open = _Round()
                self._cv.release()
                try:
                    rnd.results = self._work(rnd.requests)
                    if len(rnd.results) != len(rnd.requests):
                        raise RuntimeError(f"group work returned {len(rnd.results)} results for "
                                           f"{len(rnd.requests)} requests")
                except BaseException as exc:  # noqa: BLE001 - stored, raised in every caller of the round
                    rnd.error = exc
                finally:
                    self._cv.acquire()
                    rnd.done = True
                    self._busy = False
                    self.rounds += 1
                    self.requests += len(rnd.requests)
                    self._cv.notify_all()
            if rnd.error is not None:
                raise rnd.error
            assert rnd.results is not None
            return rnd.results[index]
