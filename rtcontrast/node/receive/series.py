"""Series completion by idle timeout.

DICOM has no "series complete" signal (pynetdicom#369, mercure#32/#45): a series is
taken as complete when no instance of it has arrived for ``idle_seconds``.  When the
association that carried it is released normally, the sender has said it is done, so
the deadline is shortened to ``release_grace_seconds`` (a short grace for a second
association that may follow).  An aborted association does not shorten anything, and
neither does a release for a series marked :meth:`SeriesTracker.suspect` (an abort or a
refusal touched it: it waits for the full idle timeout).  A
late instance after the series was handed out simply starts a new idle window: the
caller makes a new job for it.

Times are plain floats (``time.monotonic()`` in production) passed in by the caller,
which keeps the class deterministic to test.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

__all__ = ["SeriesTracker", "SeriesKey"]

SeriesKey = tuple[str, str]  # (StudyInstanceUID, SeriesInstanceUID)


class SeriesTracker:
    """Thread-safe map of open series to their completion deadline."""

    def __init__(self, idle_seconds: float, release_grace_seconds: float) -> None:
        if idle_seconds <= 0 or release_grace_seconds < 0:
            raise ValueError("idle_seconds must be > 0 and release_grace_seconds >= 0")
        self.idle_seconds = float(idle_seconds)
        self.release_grace_seconds = float(release_grace_seconds)
        self._deadlines: dict[SeriesKey, float] = {}
        self._suspect: set[SeriesKey] = set()
        self._lock = threading.Lock()

    def touch(self, study_uid: str, series_uid: str, now: float) -> None:
        """An instance of the series arrived: (re)start its idle window at ``now``."""
        with self._lock:
            self._deadlines[(study_uid, series_uid)] = now + self.idle_seconds

    def released(self, keys: Iterable[SeriesKey], now: float) -> None:
        """The association carrying ``keys`` was released: complete them after the grace.

        Only shortens (never extends) a deadline; unknown keys (already handed out) and
        suspect ones (:meth:`suspect`) are ignored.
        """
        with self._lock:
            for key in keys:
                if key in self._deadlines and key not in self._suspect:
                    self._deadlines[key] = min(self._deadlines[key], now + self.release_grace_seconds)

    def suspect(self, key: SeriesKey, is_suspect: bool) -> None:
        """Mark a series as possibly incomplete (an abort or a refusal): no release grace for it.

        It then completes by the idle timeout only, giving the sender time to send the
        missing instances (see :mod:`rtcontrast.node.store.completeness`).
        """
        with self._lock:
            if is_suspect:
                self._suspect.add(key)
            else:
                self._suspect.discard(key)

    def due(self, now: float) -> list[SeriesKey]:
        """Remove and return the series whose deadline has passed, oldest deadline first."""
        with self._lock:
            ready = sorted((d, k) for k, d in self._deadlines.items() if d <= now)
            for _, key in ready:
                del self._deadlines[key]
                self._suspect.discard(key)
            return [k for _, k in ready]

    def defer(self, study_uid: str, series_uid: str, until: float) -> None:
        """Re-open a series handed out by :meth:`due` until ``until`` (e.g. to wait for a partner).

        A later instance of the series still restarts its idle window as usual.
        """
        with self._lock:
            key = (study_uid, series_uid)
            self._deadlines[key] = max(self._deadlines.get(key, until), until)

    def discard(self, study_uid: str, series_uid: str) -> None:
        """Close a series now (it is handed out by other means, e.g. with its fusion partner)."""
        with self._lock:
            self._deadlines.pop((study_uid, series_uid), None)

    def deadline(self, study_uid: str, series_uid: str) -> float | None:
        """The current deadline of a series, or ``None`` if it is not open."""
        with self._lock:
            return self._deadlines.get((study_uid, series_uid))

    def pending(self) -> list[SeriesKey]:
        """Series still open (not yet due)."""
        with self._lock:
            return list(self._deadlines)

    def next_deadline(self) -> float | None:
        """Earliest deadline, so a scheduler can sleep until then."""
        with self._lock:
            return min(self._deadlines.values(), default=None)
