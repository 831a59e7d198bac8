"""Schema versions and migrations (#14): a database made by the previous release opens with this one.

The previous schema below is copied verbatim from the release before ``PRAGMA user_version``
(commit e509851: ``jobs.py`` DDL and ``outbox.py`` _SCHEMA), so the test does not trust the
code under test to remember it.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from rtcontrast.node.dispatch.outbox import DELIVERED, PENDING, Outbox, Outcome, RetryPolicy
from rtcontrast.node.store import db
from rtcontrast.node.store.jobs import JobRole, JobState, JobStore
from rtcontrast.node.store.schema import LATEST_VERSION, SchemaError, schema_version
from tests.support import phantom_series

PREVIOUS_JOBS_DDL = """
CREATE TABLE IF NOT EXISTS jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    study_uid        TEXT NOT NULL,
    series_uid       TEXT NOT NULL,
    state            TEXT NOT NULL CHECK (state IN ('received', 'assembling', 'inferring', 'rendering', 'deriving', 'queued',
                     'delivered', 'failed', 'ineligible', 'held')),
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
"""

PREVIOUS_OUTBOX_DDL = """
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


def _previous_database(path: Path) -> None:
    """A database as the previous release left it: a fusion input, a released hold, a delivery."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(PREVIOUS_JOBS_DDL + PREVIOUS_OUTBOX_DDL)
    now = "2026-11-01T10:00:00.000000+00:00"
    jobs = [
        (1, "1.2.3", "1.2.3.1", "ineligible",
         "fusion input to series 1.2.3.2 (fusion.target: t2w); no derived series of its own"),
        (2, "1.2.3", "1.2.3.2", "received", "released by an admin (QA hold overridden)"),
        (3, "1.2.3", "1.2.3.3", "delivered", None),
        (4, "1.2.3", "1.2.3.4", "held", "QA hold: self NRMSE 0.4 > 0.2"),
    ]
    for jid, study, series, state, reason in jobs:
        conn.execute("INSERT INTO jobs (id, study_uid, series_uid, state, reason, created_at, updated_at, "
                     "instance_count) VALUES (?, ?, ?, ?, ?, ?, ?, 1)", (jid, study, series, state, reason, now, now))
        conn.execute("INSERT INTO instances VALUES (?, ?, ?, ?, '1.2.840.10008.5.1.4.1.1.4', 'MR1', "
                     "'10.0.0.5:4000', ?, ?)", (f"{series}.1", study, series, f"/spool/{series}.1.dcm", now, jid))
        conn.execute("INSERT INTO job_instances VALUES (?, ?)", (jid, f"{series}.1"))
    for jid, event in ((2, "held"), (2, "released"), (4, "released"), (4, "held")):
        conn.execute("INSERT INTO audit (ts, job_id, event) VALUES (?, ?, ?)", (now, jid, event))
    for i, (state, delivered_at) in enumerate(((DELIVERED, 1000.0), (PENDING, None))):
        conn.execute(
            "INSERT INTO outbox_items (job_id, destination, sop_instance_uid, sop_class_uid, transfer_syntax_uid, "
            "study_instance_uid, series_instance_uid, path, state, next_attempt_at, created_at, updated_at, "
            "delivered_at, last_status) VALUES ('3', 'tps', ?, '1.2.840.10008.5.1.4.1.1.4', '1.2.840.10008.1.2.1', "
            "'1.2.3', '9.9.9', ?, ?, 0, 0, 0, ?, ?)",
            (f"9.9.9.{i}", f"/outbox/tps/3/9.9.9.{i}.dcm", state, delivered_at, 0 if delivered_at else None),
        )
    conn.close()


def test_previous_schema_with_data_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "rtcontrast.db"
    _previous_database(path)
    conn = db.connect(path)
    assert schema_version(conn) == LATEST_VERSION
    store = JobStore(conn)
    j1, j2, j3, j4 = (store.job(i) for i in (1, 2, 3, 4))
    assert j1 is not None and j1.role == JobRole.FUSION_INPUT and j1.fusion_target == "1.2.3.2"
    assert j2 is not None and j2.hold_override and j2.state == JobState.RECEIVED and j2.role == JobRole.TARGET
    assert j4 is not None and not j4.hold_override  # held again after its release
    assert j3 is not None and j3.state is JobState.DELIVERED
    # outbox_items.job_id is an INTEGER like jobs.id now, and the rows kept
    assert {r[0] for r in conn.execute("SELECT typeof(job_id) FROM outbox_items")} == {"integer"}
    outbox = Outbox(conn, tmp_path / "outbox")
    assert [i.state for i in outbox.items(job_id=3)] == [DELIVERED, PENDING]
    assert conn.execute("SELECT COUNT(*) FROM outbox_items o JOIN jobs j ON j.id = o.job_id").fetchone()[0] == 2
    # the delivery that happened before the upgrade is in the append-only log
    assert [tuple(r) for r in conn.execute("SELECT job_id, sop_instance_uid FROM deliveries")] == [(3, "9.9.9.0")]
    # the new code works on the migrated data: new instances, jobs, audit still append-only
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM audit")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM deliveries")
    conn.close()
    again = db.connect(path)  # idempotent: nothing runs twice
    assert schema_version(again) == LATEST_VERSION
    assert again.execute("SELECT COUNT(*) FROM deliveries").fetchone()[0] == 1
    again.close()


def test_fresh_database_is_latest_and_newer_is_refused(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "new.db")
    assert schema_version(conn) == LATEST_VERSION
    cols = {r[1]: r[2] for r in conn.execute("PRAGMA table_info(outbox_items)")}
    assert cols["job_id"] == "INTEGER"
    conn.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}")
    conn.close()
    with pytest.raises(SchemaError, match="newer than this release"):
        db.connect(tmp_path / "new.db")


def test_delivery_record_survives_retention_prune(tmp_path: Path) -> None:
    """Finding 10: a purge erased the audit's delivery record; the deliveries log is append-only."""
    conn = db.connect(tmp_path / "n.db")
    outbox = Outbox(conn, tmp_path / "outbox")
    outbox.enqueue(7, "tps", phantom_series(2, size=16), now=0.0)
    items = outbox.items(job_id=7)
    outbox.record([(i, Outcome(True, 0)) for i in items], RetryPolicy(), now=100.0)
    assert outbox.prune(delivered_before=time.time()) == 2
    assert outbox.items(job_id=7) == []
    [out] = outbox.job_outputs(7)
    assert out["states"] == {DELIVERED: 2} and out["delivered_at"] == 100.0
