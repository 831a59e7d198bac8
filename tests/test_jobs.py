"""Job store: claiming instances, states, audit, and resume after a restart."""

from __future__ import annotations

import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest

from rtcontrast.node.store.db import connect
from rtcontrast.node.store.jobs import JOB_STATES, JobStore
from rtcontrast.node.receive.scp import StoredInstance
from rtcontrast.node.receive.series import SeriesTracker

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES_A = "1.2.826.0.1.3680043.8.498.1.1"
SERIES_B = "1.2.826.0.1.3680043.8.498.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


def inst(series: str, n: int, root: Path = Path("/spool")) -> StoredInstance:
    sop = f"{series}.{n}"
    return StoredInstance(
        path=root / STUDY / series / f"{sop}.dcm",
        study_uid=STUDY,
        series_uid=series,
        sop_instance_uid=sop,
        sop_class_uid=MR,
        calling_ae="SCANNER",
        peer_address="127.0.0.1:40000",
        received_at=datetime.now(timezone.utc),
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "node.sqlite"


@pytest.fixture
def store(db_path: Path) -> JobStore:
    return JobStore(connect(db_path))


def test_create_job_claims_unconsumed_instances(store: JobStore) -> None:
    for i in range(1, 4):
        assert store.record_instance(inst(SERIES_A, i)) is True
    store.record_instance(inst(SERIES_B, 1))
    assert set(store.series_with_unconsumed_instances()) == {(STUDY, SERIES_A), (STUDY, SERIES_B)}

    job_id = store.create_job(STUDY, SERIES_A)
    assert job_id is not None
    job = store.job(job_id)
    assert job is not None and job.state == "received" and job.instance_count == 3
    assert [r.sop_instance_uid for r in store.job_instances(job_id)] == [f"{SERIES_A}.{i}" for i in (1, 2, 3)]
    assert store.series_with_unconsumed_instances() == [(STUDY, SERIES_B)]
    # nothing left to claim: a duplicate completion signal makes no empty job
    assert store.create_job(STUDY, SERIES_A) is None
    assert store.create_job(STUDY, "1.2.3.4") is None


def test_late_instance_makes_a_new_job_covering_the_whole_series(store: JobStore) -> None:
    for i in range(1, 3):
        store.record_instance(inst(SERIES_A, i))
    first = store.create_job(STUDY, SERIES_A)
    store.record_instance(inst(SERIES_A, 3))
    second = store.create_job(STUDY, SERIES_A)
    assert first is not None and second is not None and second != first
    assert len(store.job_instances(first)) == 2  # snapshot unchanged
    assert len(store.job_instances(second)) == 3
    created = [e for e in store.audit_events(second) if e.event == "job_created"]
    assert created[0].detail == {"instances": 3, "new_instances": 1, "earlier_jobs": [first]}


def test_resent_instance_is_unconsumed_again(store: JobStore) -> None:
    store.record_instance(inst(SERIES_A, 1))
    job_id = store.create_job(STUDY, SERIES_A)
    assert store.series_with_unconsumed_instances() == []
    assert store.record_instance(inst(SERIES_A, 1)) is False
    rec = store.instance(f"{SERIES_A}.1")
    assert rec is not None and rec.job_id is None
    assert store.series_with_unconsumed_instances() == [(STUDY, SERIES_A)]
    assert [e.event for e in store.audit_events(job_id)][-1] == "instance_resent"
    assert len(store.job_instances(job_id)) == 1  # the old job still sees its member


def test_set_state_fields_qa_and_audit(store: JobStore) -> None:
    store.record_instance(inst(SERIES_A, 1))
    job_id = store.create_job(STUDY, SERIES_A)
    assert job_id is not None
    store.set_state(job_id, "assembling")
    job = store.set_state(
        job_id, "inferring", model_name="qmap", model_version="1.0", model_sha256="ab" * 32,
        protocol_version="qmap/1", qa={"residual": 0.01},
    )
    assert job.state == "inferring" and job.model_name == "qmap" and job.qa == {"residual": 0.01}
    job = store.set_state(job_id, "failed", reason="model output not finite")
    assert job.reason == "model output not finite" and job.model_version == "1.0"
    events = store.audit_events(job_id)
    states = [(e.detail or {}).get("to") for e in events if e.event == "state"]
    assert states == ["assembling", "inferring", "failed"]
    assert events[-1].detail == {"from": "inferring", "to": "failed", "reason": "model output not finite"}
    assert all(e.study_uid == STUDY and e.series_uid == SERIES_A for e in events)

    with pytest.raises(ValueError, match="unknown job state"):
        store.set_state(job_id, "done")
    with pytest.raises(TypeError, match="unknown field"):
        store.set_state(job_id, "held", colour="blue")
    with pytest.raises(KeyError):
        store.set_state(9999, "held")


def test_audit_is_append_only(store: JobStore) -> None:
    store.audit(None, "node_started", {"version": "0.1"})
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        store.conn.execute("UPDATE audit SET event='x'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        store.conn.execute("DELETE FROM audit")
    assert store.audit_events()[0].event == "node_started"


def test_restart_resumes_unfinished_jobs_and_unconsumed_instances(db_path: Path) -> None:
    conn = connect(db_path)
    s = JobStore(conn)
    for i in range(1, 3):
        s.record_instance(inst(SERIES_A, i))
    ids = {}
    for state in ("inferring", "delivered", "failed", "ineligible", "held", "queued"):
        series = f"{SERIES_B}.{JOB_STATES.index(state)}"
        s.record_instance(inst(series, 1))
        ids[state] = s.create_job(STUDY, series)
        s.set_state(ids[state], state)
    s.record_instance(inst(SERIES_B, 7))  # received, never made into a job
    conn.close()

    s2 = JobStore(connect(db_path))
    assert [j.id for j in s2.unfinished_jobs()] == [ids["inferring"], ids["queued"]]
    assert set(s2.series_with_unconsumed_instances()) == {(STUDY, SERIES_A), (STUDY, SERIES_B)}
    assert len(s2.job_instances(ids["inferring"])) == 1
    # resume path: unconsumed series go back to the tracker and become jobs when due
    tracker = SeriesTracker(idle_seconds=5, release_grace_seconds=1)
    for study, series in s2.series_with_unconsumed_instances():
        tracker.touch(study, series, now=0.0)
    made = [s2.create_job(*key) for key in tracker.due(now=10.0)]
    assert all(made) and s2.series_with_unconsumed_instances() == []
    assert [e.event for e in s2.audit_events()].count("job_created") == 8
    assert len(s2.recent_jobs(3)) == 3 and s2.recent_jobs(3)[0].id == max(made)


def test_concurrent_record_from_threads(store: JobStore) -> None:
    def worker(k: int) -> None:
        for i in range(20):
            store.record_instance(inst(SERIES_A, k * 100 + i))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    job_id = store.create_job(STUDY, SERIES_A)
    assert job_id is not None and store.job(job_id).instance_count == 80  # type: ignore[union-attr]


def test_series_tracker_idle_release_and_late() -> None:
    t = SeriesTracker(idle_seconds=10, release_grace_seconds=2)
    t.touch(STUDY, SERIES_A, now=0)
    t.touch(STUDY, SERIES_B, now=0)
    t.touch(STUDY, SERIES_A, now=5)  # activity extends
    assert t.due(now=9) == []
    assert t.due(now=10) == [(STUDY, SERIES_B)]
    t.released([(STUDY, SERIES_A), (STUDY, "1.9")], now=11)  # shortens to 13, unknown ignored
    assert t.deadline(STUDY, SERIES_A) == 13
    t.released([(STUDY, SERIES_A)], now=12.5)  # never extends
    assert t.deadline(STUDY, SERIES_A) == 13
    assert t.due(now=12.9) == []
    assert t.due(now=13) == [(STUDY, SERIES_A)]
    assert t.pending() == [] and t.next_deadline() is None
    t.touch(STUDY, SERIES_A, now=20)  # late instance: a new window
    assert t.due(now=29) == [] and t.due(now=30) == [(STUDY, SERIES_A)]
