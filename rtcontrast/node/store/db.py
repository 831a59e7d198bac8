"""One SQLite database for the node's durable state (jobs, instances, outbox, audit).

The schema is versioned and migrated explicitly (:mod:`rtcontrast.node.store.schema`,
``PRAGMA user_version``): :func:`connect` opens the file in WAL mode and brings it to the
current version, whichever modules are imported.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from rtcontrast.node.store.schema import ensure_schema


def connect(path: str | Path) -> sqlite3.Connection:
    """Open the node database: WAL, foreign keys, a busy timeout, schema migrated.

    The connection is in autocommit mode (``isolation_level=None``); use ``with
    transaction(conn):`` for multi-statement atomic updates.  ``check_same_thread`` is
    off because the SCP's worker threads and the pipeline share one process; callers
    that use a connection from several threads must serialise access themselves
    (each component normally opens its own connection).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=30000")
    ensure_schema(conn)
    return conn


class transaction:
    """``with transaction(conn):`` runs the block in BEGIN IMMEDIATE ... COMMIT/ROLLBACK."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
