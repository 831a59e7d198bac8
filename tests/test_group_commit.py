"""Group commit (#13): concurrent durable writes share one round, each caller still waits for its own.

Real threads, a real SQLite job store, the real spool on disk.  No timing assertions:
rounds are forced by holding the first round open until the others have queued.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from rtcontrast.node.receive.scp import StoredInstance
from rtcontrast.node.receive.spool import Spool
from rtcontrast.node.store import db
from rtcontrast.node.store.group import GroupCommit
from rtcontrast.node.store.jobs import DuplicateInstance, JobStore
from tests.support import phantom_series


def _queued(gc: GroupCommit, n: int) -> None:
    for _ in range(2000):
        with gc._cv:
            if len(gc._open.requests) >= n:
                return
        threading.Event().wait(0.005)
    raise AssertionError(f"{n} requests never queued")


def test_callers_arriving_during_a_round_share_the_next_one() -> None:
    release = threading.Event()
    rounds: list[list[int]] = []

    def work(reqs: Sequence[int]) -> list[int]:
        rounds.append(list(reqs))
        if len(rounds) == 1:
            release.wait(10)
        return [r * 10 for r in reqs]

    gc: GroupCommit[int, int] = GroupCommit(work)
    results: dict[int, int] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, gc.submit(i))) for i in range(6)]
    threads[0].start()
    while not rounds:
        threading.Event().wait(0.005)
    for t in threads[1:]:
        t.start()
    _queued(gc, 5)
    release.set()
    for t in threads:
        t.join(10)
    assert results == {i: i * 10 for i in range(6)}
    assert rounds[0] == [0] and sorted(rounds[1]) == [1, 2, 3, 4, 5] and (gc.rounds, gc.requests) == (2, 6)


def test_a_failed_round_fails_every_caller_of_it_and_not_the_next() -> None:
    release = threading.Event()
    calls: list[list[str]] = []

    def work(reqs: Sequence[str]) -> list[str]:
        calls.append(list(reqs))
        if len(calls) == 1:
            release.wait(10)
            return list(reqs)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return list(reqs)

    gc: GroupCommit[str, str] = GroupCommit(work)
    errors: dict[str, BaseException | None] = {}

    def call(x: str) -> None:
        try:
            gc.submit(x)
            errors[x] = None
        except OSError as exc:
            errors[x] = exc

    first = threading.Thread(target=call, args=("a",))
    first.start()
    while not calls:
        threading.Event().wait(0.005)
    others = [threading.Thread(target=call, args=(x,)) for x in ("b", "c")]
    for t in others:
        t.start()
    _queued(gc, 2)
    release.set()
    for t in [first, *others]:
        t.join(10)
    assert errors["a"] is None and isinstance(errors["b"], OSError) and isinstance(errors["c"], OSError)
    assert gc.submit("d") == "d"  # the next round works


def _inst(ds, path: Path) -> StoredInstance:
    return StoredInstance(path=path, study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                          sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, calling_ae="S",
                          peer_address="127.0.0.1:1", received_at=datetime.now(UTC))


def test_concurrent_receives_are_all_durable_and_recorded_with_fewer_commits(tmp_path: Path) -> None:
    """8 threads x 6 instances through the spool and the job store at once: every row and file is there."""
    spool = Spool(tmp_path / "spool")
    jobs = JobStore(db.connect(tmp_path / "node.db"))
    series = [phantom_series(uid_seed=f"g{k}") for k in range(8)]
    barrier = threading.Barrier(8)
    failures: list[BaseException] = []

    def receive(dss: list) -> None:
        try:
            barrier.wait(10)
            for ds in dss:
                assert jobs.record_instance(_inst(ds, spool.store(ds))) is True
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=receive, args=(s,)) for s in series]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == []
    rows = jobs.conn.execute("SELECT sop_instance_uid, path FROM instances").fetchall()
    assert len(rows) == 48 and all(Path(r["path"]).is_file() for r in rows)
    assert jobs._recorder.requests == 48 and spool._dirsync.requests == 48


def test_a_duplicate_uid_in_a_round_is_refused_alone(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    jobs = JobStore(db.connect(tmp_path / "node.db"))
    a = phantom_series(uid_seed="dupA")
    b = phantom_series(uid_seed="dupB")
    b[0].SOPInstanceUID = a[0].SOPInstanceUID  # same UID, another series
    assert jobs.record_instance(_inst(a[0], spool.store(a[0])))
    with pytest.raises(DuplicateInstance):
        jobs.record_instance(_inst(b[0], tmp_path / "x.dcm"))
    assert jobs.record_instance(_inst(b[1], spool.store(b[1])))
