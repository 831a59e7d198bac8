"""One SQLite database for the node's durable state (jobs, instances, outbox, audit).

Each stage module owns its tables and registers its DDL with :func:`register_schema`;
:func:`connect` opens the file in WAL mode and applies every registered schema, so a
newcomer finds a table's definition next to the code that uses it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

_SCHEMAS: dict[str, str] = {}


def register_schema(owner: str, ddl: str) -> None:
    """Register ``ddl`` (idempotent CREATE ... IF NOT EXISTS statements) under ``owner``."""
    _SCHEMAS[owner] = ddl


def connect(path: str | Path) -> sqlite3.Connection:
    """Open the node database: WAL, foreign keys, a busy timeout, all schemas applied.

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
    for ddl in _SCHEMAS.values():
        conn.executescript(ddl)
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
