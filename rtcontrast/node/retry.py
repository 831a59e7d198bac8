"""Transient failures: which errors pass by themselves, and how long to wait before trying again.

Why (issue #15, finding 4): all 15 instances of a series were answered Success, then
derivation hit ENOSPC and the job failed for good; after space returned nothing re-ran
it.  A job that fails because the disk (or the database) is full or busy is not a bad
series: the worker puts it back with capped exponential backoff, for as long as it
takes, with a metric (``rtcontrast_job_retries_total{cause}``) and a log line per retry.
"""

from __future__ import annotations

import errno
import sqlite3

__all__ = ["RETRY_BASE_S", "RETRY_MAX_S", "retry_delay_s", "transient_cause"]

#: First retry after this many seconds, doubling per retry, capped at RETRY_MAX_S.
RETRY_BASE_S = 5.0
RETRY_MAX_S = 300.0

FULL_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG})
_SQLITE_TRANSIENT = ("database is locked", "database or disk is full", "disk i/o error", "database table is locked")


def transient_cause(exc: BaseException) -> str | None:
    """``disk_full`` / ``database_busy`` when ``exc`` (or what caused it) will pass by itself; else None.

    Why: a job that failed because the disk was full after the series was acknowledged
    must run again once space returns; the scanner was told Success and will not resend.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
            return "disk_full"
        if isinstance(e, sqlite3.OperationalError) and any(t in str(e).lower() for t in _SQLITE_TRANSIENT):
            return "disk_full" if "full" in str(e).lower() else "database_busy"
        e = e.__cause__ or e.__context__
    return None


def retry_delay_s(n: int) -> float:
    """Seconds before the ``n``-th retry (n >= 1)."""
    return min(RETRY_MAX_S, RETRY_BASE_S * 2.0 ** max(0, min(n - 1, 30)))
