"""The node database's schema, versioned with ``PRAGMA user_version`` and migrated in order.

Why one module: every table of the node database (jobs, instances, audit, outbox,
deliveries) is created and changed here, explicitly, in numbered steps.  Before this
module each stage registered ``CREATE ... IF NOT EXISTS`` text at import time, which
could add tables but never change a column (``outbox_items.job_id`` stayed TEXT) and
made the schema depend on which modules happened to be imported.

Rules for a new step: append to :data:`MIGRATIONS`, never edit an old one (a site's
database was made by it); a step runs in the same transaction as the ``user_version``
bump, so a crash leaves the old version intact; a database newer than the code is
refused (roll back the database with the release, see docs/admin.md).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

__all__ = ["LATEST_VERSION", "MIGRATIONS", "SchemaError", "ensure_schema", "schema_version", "V1_DDL"]


class SchemaError(RuntimeError):
    """The database cannot be used by this release (newer schema, failed migration)."""


#: Version 1: the schema as released up to the reorganisation (jobs.py / outbox.py of
#: commit e509851).  Frozen: sites' databases were created by it.
V1_DDL = """
CREATE TABLE IF NOT EXISTS jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid        TEXT NOT NULL,
    series_uid       TEXT NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('received', 'assembling', 'inferring', 'rendering',
                     'deriving', 'queued', 'delivered', 'failed', 'ineligible', 'held')),
    reason           TEXT,
    protocol_version TEXT,
    model_name       TEXT,
    model_version    TEXT,
    model_sha256     TEXT,
    created_at       TEXT NOT NULL,
    updated_at       TEXT NOT NULL,
    instance_count   INTEGER NOT NULL DEFAULT 0,
    qa_json          TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_series ON jobs(study_uid, series_uid);

CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    study_uid        TEXT NOT NULL,
    series_uid       TEXT NOT NULL,
    path             TEXT NOT NULL,
    sop_class_uid    TEXT NOT NULL,
    calling_ae       TEXT,
    peer             TEXT,
    received_at      TEXT NOT NULL,
    job_id           INTEGER REFERENCES jobs(id)
);
CREATE INDEX IF NOT EXISTS instances_series ON instances(study_uid, series_uid);
CREATE INDEX IF NOT EXISTS instances_unconsumed ON instances(study_uid, series_uid) WHERE job_id IS NULL;

CREATE TABLE IF NOT EXISTS job_instances (
    job_id           INTEGER NOT NULL REFERENCES jobs(id),
    sop_instance_uid TEXT NOT NULL,
    PRIMARY KEY (job_id, sop_instance_uid)
);

CREATE TABLE IF NOT EXISTS audit (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    ts          TEXT NOT NULL,
    job_id      INTEGER,
    study_uid   TEXT,
    series_uid  TEXT,
    event       TEXT NOT NULL,
    detail_json TEXT
);
CREATE INDEX IF NOT EXISTS audit_job ON audit(job_id);
CREATE TRIGGER IF NOT EXISTS audit_append_only_u BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_append_only_d BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'audit is append-only'); END;

CREATE TABLE IF NOT EXISTS outbox_items (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id              TEXT NOT NULL,
    destination         TEXT NOT NULL,
    sop_instance_uid    TEXT NOT NULL,
    sop_class_uid       TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL DEFAULT '',
    series_instance_uid TEXT NOT NULL DEFAULT '',
    path                TEXT NOT NULL,
    state               TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'dead_letter')),
    attempts            INTEGER NOT NULL DEFAULT 0,
    generation          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     REAL NOT NULL,
    created_at          REAL NOT NULL,
    updated_at          REAL NOT NULL,
    delivered_at        REAL,
    last_status         INTEGER,
    last_error          TEXT,
    UNIQUE (destination, job_id, sop_instance_uid)
);
CREATE INDEX IF NOT EXISTS outbox_items_due ON outbox_items (state, destination, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_items_job ON outbox_items (job_id, state);
"""

_OUTBOX_V2 = """
CREATE TABLE outbox_items_v2 (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id              INTEGER NOT NULL,
    destination         TEXT NOT NULL,
    sop_instance_uid    TEXT NOT NULL,
    sop_class_uid       TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL DEFAULT '',
    series_instance_uid TEXT NOT NULL DEFAULT '',
    path                TEXT NOT NULL,
    state               TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'dead_letter')),
    attempts            INTEGER NOT NULL DEFAULT 0,
    generation          INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     REAL NOT NULL,
    created_at          REAL NOT NULL,
    updated_at          REAL NOT NULL,
    delivered_at        REAL,
    last_status         INTEGER,
    last_error          TEXT,
    UNIQUE (destination, job_id, sop_instance_uid)
);
INSERT INTO outbox_items_v2 SELECT id, CAST(job_id AS INTEGER), destination, sop_instance_uid, sop_class_uid,
    transfer_syntax_uid, study_instance_uid, series_instance_uid, path, state, attempts, generation,
    next_attempt_at, created_at, updated_at, delivered_at, last_status, last_error FROM outbox_items;
DROP TABLE outbox_items;
ALTER TABLE outbox_items_v2 RENAME TO outbox_items;
CREATE INDEX outbox_items_due ON outbox_items (state, destination, next_attempt_at);
CREATE INDEX outbox_items_job ON outbox_items (job_id, state);

CREATE TABLE deliveries (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    ts                  REAL NOT NULL,
    job_id              INTEGER NOT NULL,
    destination         TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    sop_instance_uid    TEXT NOT NULL,
    status              INTEGER
);
CREATE INDEX deliveries_job ON deliveries (job_id, destination);
CREATE TRIGGER deliveries_append_only_u BEFORE UPDATE ON deliveries
BEGIN SELECT RAISE(ABORT, 'deliveries is append-only'); END;
CREATE TRIGGER deliveries_append_only_d BEFORE DELETE ON deliveries
BEGIN SELECT RAISE(ABORT, 'deliveries is append-only'); END;
INSERT INTO deliveries (ts, job_id, destination, study_instance_uid, series_instance_uid, sop_instance_uid, status)
    SELECT delivered_at, job_id, destination, study_instance_uid, series_instance_uid, sop_instance_uid, last_status
    FROM outbox_items WHERE state = 'delivered' AND delivered_at IS NOT NULL ORDER BY delivered_at;

ALTER TABLE jobs ADD COLUMN role TEXT NOT NULL DEFAULT 'target' CHECK (role IN ('target', 'fusion_input'));
ALTER TABLE jobs ADD COLUMN fusion_target TEXT;
ALTER TABLE jobs ADD COLUMN hold_override INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN retry_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN retry_at TEXT;
UPDATE jobs SET role = 'fusion_input',
    fusion_target = substr(reason, length('fusion input to series ') + 1,
                           instr(substr(reason, length('fusion input to series ') + 1) || ' ', ' ') - 1)
    WHERE state = 'ineligible' AND reason LIKE 'fusion input to series %';
UPDATE jobs SET hold_override = 1 WHERE id IN (
    SELECT a.job_id FROM audit a WHERE a.event IN ('released', 'held') AND a.id = (
        SELECT MAX(b.id) FROM audit b WHERE b.job_id = a.job_id AND b.event IN ('released', 'held'))
    AND a.event = 'released');

CREATE TABLE series_events (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid        TEXT NOT NULL,
    series_uid       TEXT NOT NULL,
    ts               TEXT NOT NULL,
    kind             TEXT NOT NULL CHECK (kind IN ('aborted', 'refused', 'clean')),
    sop_instance_uid TEXT,
    status           INTEGER,
    count            INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX series_events_series ON series_events (study_uid, series_uid, id);
"""


def _statements(script: str) -> list[str]:
    """Split a script into statements (triggers keep their ``;`` inside BEGIN ... END)."""
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                out.append(buf.strip())
            buf = ""
    if buf.strip():
        raise ValueError(f"incomplete SQL statement: {buf.strip()[:60]}")
    return out


def _run(script: str) -> Callable[[sqlite3.Connection], None]:
    def step(conn: sqlite3.Connection) -> None:
        for stmt in _statements(script):
            conn.execute(stmt)
    return step


#: (version reached, what it does, the step).  Append only.
MIGRATIONS: list[tuple[int, str, Callable[[sqlite3.Connection], None]]] = [
    (1, "jobs, instances, job_instances, audit, outbox_items", _run(V1_DDL)),
    (2, "job role/fusion_target/hold_override/retry columns; outbox_items.job_id INTEGER; append-only "
        "deliveries; series_events (completeness)", _run(_OUTBOX_V2)),
]
LATEST_VERSION = MIGRATIONS[-1][0]


def schema_version(conn: sqlite3.Connection) -> int:
    """``PRAGMA user_version`` of the open database."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def ensure_schema(conn: sqlite3.Connection) -> int:
    """Bring the database to :data:`LATEST_VERSION`; the version it had before.

    Each pending step runs with its version bump in one ``BEGIN IMMEDIATE`` transaction,
    so concurrent openers (the node's connections, ``status`` from the shell) wait for
    each other and never run a step twice.
    """
    before = schema_version(conn)
    if before == LATEST_VERSION:
        return before
    if before > LATEST_VERSION:
        raise SchemaError(
            f"database schema version {before} is newer than this release's ({LATEST_VERSION}): "
            "run the release that wrote it, or restore the database backup made before the upgrade"
        )
    for version, what, step in MIGRATIONS:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if schema_version(conn) >= version:
                conn.execute("COMMIT")
                continue
            step(conn)
            conn.execute(f"PRAGMA user_version = {int(version)}")
            conn.execute("COMMIT")
        except Exception as exc:
            conn.execute("ROLLBACK")
            raise SchemaError(f"schema migration to version {version} ({what}) failed: {exc}") from exc
    return before
