"""The job queue of the workers: smallest series first, and a lane that a huge series cannot block.

Why (issue #15, finding 10): one worker ran jobs in arrival order, so a 1000-slice series
of 16x16 images held it for 244 s and every scanner's series behind it waited.  Two
rules fix that without giving up the predictability of one job at a time for big work:

* jobs are taken **smallest first** (instance count, then arrival): a queue of big
  series does not delay a small one that arrives later;
* a second, **small-series lane** worker runs only series of at most
  ``small_max`` instances, so even while the main worker is busy with a huge series,
  ordinary series keep flowing.  The main worker also takes small jobs when it has
  nothing else.  ``small_max`` 0 switches the lane off (one worker, as before).

Thread-safe; ``None`` from :meth:`get` means "stop".
"""

from __future__ import annotations

import itertools
import threading

__all__ = ["WorkQueues"]


class WorkQueues:
    """Two priority queues (main, small) of job ids keyed by (size, arrival)."""

    def __init__(self, small_max: int) -> None:
        self.small_max = small_max
        self._items: dict[str, list[tuple[int, int, int]]] = {"main": [], "small": []}
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._running = 0

    def put(self, job_id: int, size: int, lane_allowed: bool = True) -> None:
        """Queue a job of ``size`` instances; ``lane_allowed`` False keeps it off the small lane."""
        lane = "small" if lane_allowed and self.small_max and size <= self.small_max else "main"
        with self._cond:
            self._items[lane].append((size, next(self._seq), job_id))
            self._items[lane].sort()
            self._cond.notify_all()

    def get(self, lane: str) -> int | None:
        """The next job for a worker of ``lane`` (``main`` also takes small jobs); None when stopped."""
        with self._cond:
            while True:
                if self._stopped:
                    return None
                sources = ["small"] if lane == "small" else ["main", "small"]
                for src in sources:
                    if self._items[src]:
                        self._running += 1
                        return self._items[src].pop(0)[2]
                self._cond.wait()

    def done(self) -> None:
        """The worker finished the job it got."""
        with self._cond:
            self._running -= 1

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def idle(self) -> bool:
        """Nothing queued and nothing running."""
        with self._cond:
            return not self._running and not any(self._items.values())
