"""Is a series known to be complete?  Durable records of aborted associations and refused instances.

Why (issue #15, finding 8): DICOM has no "series complete" message.  The node takes a
series as complete after an idle timeout, shortened to a grace period when the sender
releases its association normally.  An association that was *aborted* after 2 of 16
instances, or that had instances refused (the free-space guard answered 0xA700 for 9 of
15), produced a 2- or 6-slice derived series at the TPS as if it were the whole series.

So every association that ends records, per series it touched, one of:

* ``aborted``: the association ended in A-ABORT (or the connection dropped);
* ``refused``: an instance of the series was refused (its SOP Instance UID and status
  when known);
* ``clean``: the association was released normally with no refusal.

:meth:`SeriesEvents.outstanding` says what is still missing since the series' newest
job: an abort not followed by a clean association for the series, and refused instances
that have not arrived since.  The scheduler holds such a series as incomplete (with the
counts) instead of processing it; the grace period is not applied to it.

Records are per (study, series), in the node database (table ``series_events``, see
:mod:`rtcontrast.node.store.schema`), so a restart keeps them.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

from rtcontrast.node.store.db import transaction
from rtcontrast.node.store.schema import ensure_schema

__all__ = ["Outstanding", "SeriesEvents"]

SeriesKey = tuple[str, str]


@dataclass(frozen=True)
class Outstanding:
    """What is missing from a series: aborted associations and refused instances not re-sent."""

    aborted: int
    refused: int
    statuses: tuple[int, ...]

    def __bool__(self) -> bool:
        return bool(self.aborted or self.refused)

    def reason(self) -> str:
        """The held job's reason: what happened, with counts, and what to do."""
        return self.summary() + " (send the series again, or node.py release to use it as is)"

    def summary(self) -> str:
        """What happened, with counts."""
        parts = []
        if self.aborted:
            parts.append(f"{self.aborted} association(s) carrying it ended in an abort")
        if self.refused:
            codes = ", ".join(f"0x{s:04X}" for s in self.statuses) or "unknown status"
            parts.append(f"{self.refused} instance(s) refused ({codes}) and not received since")
        return "incomplete series: " + "; ".join(parts)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class SeriesEvents:
    """The ``series_events`` table on its own connection (thread-safe)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.conn.row_factory = sqlite3.Row
        ensure_schema(conn)
        self._lock = threading.Lock()

    def record(
        self,
        *,
        aborted: Iterable[SeriesKey] = (),
        clean: Iterable[SeriesKey] = (),
        refused: Iterable[tuple[SeriesKey, str | None, int]] = (),
    ) -> None:
        """Record one association's end: series it left aborted or clean, instances it refused."""
        now = _now()
        rows = [(k[0], k[1], now, "aborted", None, None) for k in aborted]
        rows += [(k[0], k[1], now, "clean", None, None) for k in clean]
        rows += [(k[0], k[1], now, "refused", sop, status) for k, sop, status in refused]
        if not rows:
            return
        with self._lock, transaction(self.conn):
            self.conn.executemany(
                "INSERT INTO series_events (study_uid, series_uid, ts, kind, sop_instance_uid, status) "
                "VALUES (?, ?, ?, ?, ?, ?)", rows)

    def record_association(
        self, outcome: str, series: set[SeriesKey], refusals: list[tuple[SeriesKey | None, str | None, int]],
    ) -> dict[SeriesKey, Outstanding]:
        """Record how one association ended; what is now outstanding for each series it touched.

        A refusal whose series is unknown (unparseable data) counts against every series
        of the association: which one it belonged to cannot be told.
        """
        refused = [(key, sop, status) for key, sop, status in refusals if key is not None]
        unknown = [status for key, _, status in refusals if key is None]
        refused += [(key, None, status) for key in series for status in unknown]
        touched = set(series) | {key for key, _, _ in refused}
        bad = {key for key, _, _ in refused}
        aborted = touched if outcome != "released" else set()
        self.record(aborted=aborted, clean=touched - bad - aborted, refused=refused)
        return {key: self.outstanding(*key) for key in touched}

    def outstanding(self, study_uid: str, series_uid: str) -> Outstanding:
        """What is missing since the series' newest job (see the module doc)."""
        with self._lock:
            since = self.conn.execute(
                "SELECT COALESCE(MAX(created_at), '') FROM jobs WHERE study_uid=? AND series_uid=?",
                (study_uid, series_uid)).fetchone()[0]
            aborted = self.conn.execute(
                """SELECT COUNT(*) FROM series_events a WHERE a.study_uid=? AND a.series_uid=? AND a.kind='aborted'
                   AND a.ts > ? AND NOT EXISTS (SELECT 1 FROM series_events c WHERE c.study_uid=a.study_uid
                       AND c.series_uid=a.series_uid AND c.kind='clean' AND c.id > a.id)""",
                (study_uid, series_uid, since)).fetchone()[0]
            refused = self.conn.execute(
                """SELECT r.status FROM series_events r WHERE r.study_uid=? AND r.series_uid=? AND r.kind='refused'
                   AND r.ts > ? AND NOT EXISTS (SELECT 1 FROM instances i WHERE i.sop_instance_uid=r.sop_instance_uid
                       AND i.series_uid=r.series_uid AND i.received_at > r.ts)""",
                (study_uid, series_uid, since)).fetchall()
        statuses = tuple(sorted({int(r[0]) for r in refused if r[0] is not None}))
        return Outstanding(aborted=int(aborted), refused=len(refused), statuses=statuses)
