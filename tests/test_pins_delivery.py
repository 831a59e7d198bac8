"""Pins on delivery and durability: C-STORE failure statuses, dead-letter retention, the
row generation that protects a re-enqueued file, and the directory fsync of the outbox
and the spool.

The peer is a real pynetdicom Storage SCP on loopback that answers the status under test
(Orthanc cannot be made to answer 0xC000 on demand).  Durability is observed through a
recording/fault-injecting wrapper around ``os.fsync`` and ``os.replace`` (no strace): the
wrapper sees which directory was synced and after which rename.  Each test names the
mutation it guards (issue #17).
"""

from __future__ import annotations

import copy
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import MRImageStorage

from rtcontrast.node.dispatch.destinations import DicomDestination
from rtcontrast.node.dispatch.outbox import DEAD_LETTER, DELIVERED, PENDING, Outbox, Outcome, RetryPolicy
from rtcontrast.node.dispatch.sender import Sender
from rtcontrast.node.receive.spool import Spool, SpoolError
from rtcontrast.node.store.db import connect
from tests.conftest import free_port
from tests.support import mr_series

THREE = RetryPolicy(max_attempts=3, base_delay_s=10.0, max_delay_s=100.0, jitter=0.0)


class Peer:
    """A loopback C-STORE SCP (AE TPS) answering each request with the next of ``statuses``
    (the last one repeats); ``received`` lists the SOP Instance UIDs it was sent."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.received: list[str] = []
        ae = AE(ae_title="TPS")
        ae.add_supported_context(MRImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._handle)])

    def _handle(self, event: evt.Event) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return self.statuses[min(len(self.received), len(self.statuses)) - 1]

    def dest(self) -> DicomDestination:
        return DicomDestination("tps", "127.0.0.1", self.port, "TPS", connect_timeout_s=3,
                                acse_timeout_s=5, dimse_timeout_s=5, network_timeout_s=5)


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    try:
        yield p
    finally:
        p.server.shutdown()


# ----------------------------------------------------------------------------- C-STORE statuses


@pytest.mark.network
@pytest.mark.parametrize("status", [0xC000, 0xC211, 0xB001, 0xA900, 0x0122, 0xFE00])
def test_failure_statuses_are_failed_attempts_then_dead_letters(outbox: Outbox, peer: Peer, status: int) -> None:
    """Guards: failure statuses (0xCxxx "cannot understand", 0xA9xx, any status >= 0xB000 that
    is not one of the three PS3.4 warnings, 0x0122 SOP class not supported, 0xFE00 cancel)
    treated as delivered/warnings.  Each answer is one failed attempt with its status
    recorded; after ``max_attempts`` the row is a dead letter with its file kept."""
    peer.statuses.append(status)
    sender = Sender(outbox, {"tps": peer.dest()}, THREE)
    [ds] = mr_series(1)
    outbox.enqueue("j", "tps", [ds], now=0.0)
    now = 0.0
    for attempt in range(1, THREE.max_attempts + 1):
        assert sender.run_once(now) == 0
        [item] = outbox.items()
        assert item.attempts == attempt and item.last_status == status, item
        assert f"0x{status:04X}" in (item.last_error or "")
        assert item.delivered_at is None
        now = item.next_attempt_at
    assert item.state == DEAD_LETTER and item.path.exists()
    assert peer.received == [str(ds.SOPInstanceUID)] * THREE.max_attempts


@pytest.mark.network
@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xB006, 0xB007])
def test_success_and_the_three_warnings_are_delivered_once(outbox: Outbox, peer: Peer, status: int) -> None:
    """Guards the other side: success and the PS3.4 warnings (stored, possibly coerced) are
    delivered, recorded with their status, and never sent again."""
    peer.statuses.append(status)
    sender = Sender(outbox, {"tps": peer.dest()}, THREE)
    outbox.enqueue("j", "tps", mr_series(1), now=0.0)
    assert sender.run_once(0.0) == 1
    [item] = outbox.items()
    assert item.state == DELIVERED and item.last_status == status and item.attempts == 1
    assert (item.last_error is None) == (status == 0)
    assert sender.run_once(1e6) == 0
    assert len(peer.received) == 1


# ----------------------------------------------------------------------------- retention, generations


def _outcomes(outbox: Outbox, policy: RetryPolicy, now: float, delivered: bool, status: int | None) -> None:
    due = [it for items in outbox.due(now).values() for it in items]
    outbox.record([(it, Outcome(delivered, status, None if delivered else "refused")) for it in due], policy, now)


def test_prune_keeps_dead_letters_and_pending_with_their_files(outbox: Outbox) -> None:
    """Guards: ``prune()`` deleting dead letters (or pending rows) and their files: they are
    work still owed and ``retry_dead`` needs the file."""
    one = RetryPolicy(max_attempts=1, base_delay_s=1, max_delay_s=1)
    outbox.enqueue("dead", "tps", mr_series(2), now=0.0)
    _outcomes(outbox, one, 0.0, False, 0xC000)
    outbox.enqueue("done", "tps", mr_series(2), now=1.0)
    _outcomes(outbox, one, 1.0, True, 0)
    outbox.enqueue("late", "tps", mr_series(1), now=2.0)
    dead_files = [d.path for d in outbox.dead_letters()]
    assert len(dead_files) == 2 and all(p.exists() for p in dead_files)

    assert outbox.prune(delivered_before=1.0) == 0  # delivered at 1.0: not before 1.0
    assert outbox.prune(delivered_before=1e9) == 2  # the two delivered rows only
    assert outbox.counts()["tps"] == {PENDING: 1, DELIVERED: 0, DEAD_LETTER: 2}
    assert all(p.exists() for p in dead_files)
    assert outbox.items(job_id="late")[0].path.exists()
    assert outbox.retry_dead(now=3.0) == 2  # still possible after retention ran
    assert outbox.prune(delivered_before=1e9) == 0


def test_delivered_record_of_an_old_generation_leaves_the_new_file_pending(outbox: Outbox) -> None:
    """Guards: the "delivered" update ignoring the row generation.  An instance re-enqueued
    (a newer file) while the old one was on the wire must stay pending, its new file kept,
    and be sent next time."""
    [ds] = mr_series(1)
    outbox.enqueue("j", "tps", [ds], now=0.0)
    [(_, [in_flight])] = outbox.due(0.0).items()
    ds.SeriesDescription = "newer"
    outbox.enqueue("j", "tps", [ds], now=0.5)  # the job re-run while the sender was busy
    outbox.record([(in_flight, Outcome(True, 0, None))], THREE, now=1.0)
    [row] = outbox.items()
    assert row.state == PENDING and row.generation == in_flight.generation + 1 and row.delivered_at is None
    assert row.path.exists() and pydicom.dcmread(row.path).SeriesDescription == "newer"
    [(_, [again])] = outbox.due(1.0).items()
    outbox.record([(again, Outcome(True, 0, None))], THREE, now=2.0)
    [row] = outbox.items()
    assert row.state == DELIVERED and row.delivered_at == 2.0 and not row.path.exists()


def test_failed_record_of_an_old_generation_changes_nothing(outbox: Outbox) -> None:
    """Guards: a failure of the old file counting against (or dead-lettering) the newer one."""
    [ds] = mr_series(1)
    outbox.enqueue("j", "tps", [ds], now=0.0)
    [(_, [old])] = outbox.due(0.0).items()
    outbox.enqueue("j", "tps", [ds], now=0.5)
    outbox.record([(old, Outcome(False, 0xC000, "refused"))], RetryPolicy(max_attempts=1), now=1.0)
    [row] = outbox.items()
    assert row.state == PENDING and row.attempts == 0 and row.last_status is None and row.next_attempt_at == 0.5


def test_retry_dead_starts_a_new_generation(outbox: Outbox) -> None:
    """Guards: a stale outcome (recorded after an admin's resend) landing on the resent row."""
    outbox.enqueue("j", "tps", mr_series(1), now=0.0)
    [(_, [first])] = outbox.due(0.0).items()
    outbox.record([(first, Outcome(False, 0xA700, "full"))], RetryPolicy(max_attempts=1), now=1.0)
    assert outbox.retry_dead(now=2.0) == 1
    outbox.record([(first, Outcome(True, 0, None))], THREE, now=3.0)  # late duplicate of the old outcome
    [row] = outbox.items()
    assert row.state == PENDING and row.attempts == 0 and row.path.exists()


# ----------------------------------------------------------------------------- directory fsync


class FsyncRecorder:
    """Wraps ``os.fsync``/``os.replace``: records the order of renames and of file/directory
    syncs (by path), and can make directory syncs fail with EIO."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fail_dirs: bool = False) -> None:
        self.events: list[tuple[str, str]] = []
        self.fail_dirs = fail_dirs
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            path = os.readlink(f"/proc/self/fd/{fd}")
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
            self.events.append(("fsync-dir" if is_dir else "fsync-file", path))
            if is_dir and self.fail_dirs:
                raise OSError(errno.EIO, "injected I/O error on directory fsync")
            real_fsync(fd)

        def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
            real_replace(src, dst)
            self.events.append(("replace", str(Path(dst).resolve())))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def index(self, kind: str, path: Path) -> int:
        want = str(path.resolve())
        hits = [i for i, (k, p) in enumerate(self.events) if k == kind and p == want]
        assert hits, f"no {kind} of {want} in {self.events}"
        return hits[-1]


def test_outbox_syncs_the_job_directory_after_the_renames(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards: the directory fsync of :meth:`Outbox.enqueue` (without it a power cut after the
    rows commit can leave rows whose files never reached the disk)."""
    outbox = Outbox(connect(tmp_path / "node.db"), tmp_path / "outbox")
    rec = FsyncRecorder(monkeypatch)
    dss = mr_series(3)
    outbox.enqueue("j", "tps", dss, now=0.0)
    folder = tmp_path / "outbox" / "tps" / "j"
    synced = rec.index("fsync-dir", folder)
    for ds in dss:
        f = folder / f"{ds.SOPInstanceUID}.dcm"
        assert rec.index("replace", f) < synced
        assert any(k == "fsync-file" for k, _ in rec.events[: rec.index("replace", f)])


def test_outbox_directory_fsync_failure_records_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards: rows committed although the files' directory could not be made durable."""
    outbox = Outbox(connect(tmp_path / "node.db"), tmp_path / "outbox")
    FsyncRecorder(monkeypatch, fail_dirs=True)
    with pytest.raises(OSError, match="injected"):
        outbox.enqueue("j", "tps", mr_series(2), now=0.0)
    assert outbox.items() == []


def test_spool_syncs_file_then_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards: the spool's file fsync, its rename, and the fsync of the series directory (and of
    the new study/series directories' parents) before ``store`` returns (i.e. before the
    SCP answers success)."""
    spool = Spool(tmp_path / "spool")
    rec = FsyncRecorder(monkeypatch)
    [ds] = mr_series(1)
    final = spool.store(ds)
    series_dir, study_dir = final.parent, final.parent.parent
    i_rename = rec.index("replace", final)
    assert rec.events[i_rename - 1][0] == "fsync-file"  # the temp file's data before the rename
    assert rec.index("fsync-dir", series_dir) > i_rename
    rec.index("fsync-dir", study_dir)  # the new series directory's entry
    rec.index("fsync-dir", tmp_path / "spool")  # the new study directory's entry


def test_spool_directory_fsync_failure_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards: a failed directory fsync swallowed (the SCP would answer success for an
    instance a power cut can lose)."""
    spool = Spool(tmp_path / "spool")
    [ds] = mr_series(1)
    spool.store(ds)  # directories exist now: only the rename's directory sync is left
    rec = FsyncRecorder(monkeypatch, fail_dirs=True)
    ds2 = copy.deepcopy(ds)
    ds2.SOPInstanceUID = generate_uid()
    with pytest.raises(SpoolError):
        spool.store(ds2)
    assert any(k == "fsync-dir" for k, _ in rec.events)


# ----------------------------------------------------------------------------- queue bookkeeping


def test_due_groups_by_destination_oldest_first_and_bounded(outbox: Outbox) -> None:
    """Guards: what the sender is given: pending rows that are due, per destination, by job
    then insertion order, at most ``limit_per_destination``."""
    a = outbox.enqueue("j2", "tps", mr_series(2), now=5.0)
    b = outbox.enqueue("j1", "tps", mr_series(2), now=5.0)
    c = outbox.enqueue("j1", "archive", mr_series(1), now=10.0)
    assert outbox.due(4.9) == {}
    got = outbox.due(5.0)
    assert list(got) == ["tps"] and [it.id for it in got["tps"]] == b + a  # job j1 before j2
    got = outbox.due(10.0, limit_per_destination=3)
    assert [it.id for it in got["tps"]] == (b + a)[:3] and [it.id for it in got["archive"]] == c
    _outcomes(outbox, THREE, 10.0, True, 0)
    assert outbox.due(1e9) == {}


def test_counts_and_job_counts(outbox: Outbox) -> None:
    """Guards: the numbers `status` and the job state come from (a job is done when nothing is pending)."""
    one = RetryPolicy(max_attempts=1, base_delay_s=1, max_delay_s=1)
    outbox.enqueue("j", "tps", mr_series(3), now=0.0)
    outbox.enqueue("j", "archive", mr_series(1), now=0.0)
    outbox.enqueue("k", "tps", mr_series(1), now=100.0)
    [(_, items)] = [(d, v) for d, v in outbox.due(0.0).items() if d == "tps"]
    outbox.record([(items[0], Outcome(True, 0, None)), (items[1], Outcome(False, 0xC000, "x"))], one, now=1.0)
    assert outbox.counts() == {"tps": {PENDING: 2, DELIVERED: 1, DEAD_LETTER: 1},
                               "archive": {PENDING: 1, DELIVERED: 0, DEAD_LETTER: 0}}
    assert outbox.job_counts("j") == {PENDING: 2, DELIVERED: 1, DEAD_LETTER: 1}
    assert outbox.pending_for_job("j") == 2 and outbox.pending_for_job("k") == 1 and outbox.pending_for_job("z") == 0
    assert [i.state for i in outbox.items(job_id="j", destination="tps", state=DEAD_LETTER)] == [DEAD_LETTER]
    assert len(outbox.items(destination="archive")) == 1 and len(outbox.items(state=PENDING)) == 3
    with pytest.raises(ValueError, match="unknown outbox state 'lost'"):
        outbox.items(state="lost")


def test_failed_attempt_backs_off_and_keeps_the_error(outbox: Outbox) -> None:
    """Guards: attempts counted, next attempt = now + base * 2**(n-1) (no jitter here), status
    and error kept for the admin."""
    policy = RetryPolicy(max_attempts=5, base_delay_s=10.0, max_delay_s=25.0, jitter=0.0)
    outbox.enqueue("j", "tps", mr_series(1), now=0.0)
    expected = [10.0, 20.0, 25.0]  # capped at max_delay_s
    now = 0.0
    for n, wait in enumerate(expected, start=1):
        [(_, [it])] = outbox.due(now).items()
        outbox.record([(it, Outcome(False, 0xA700, "out of resources"))], policy, now)
        [row] = outbox.items()
        assert (row.state, row.attempts, row.last_status, row.last_error) == (PENDING, n, 0xA700, "out of resources")
        assert row.next_attempt_at == pytest.approx(now + wait) and row.updated_at == now
        now = row.next_attempt_at
    assert policy.delay(1) == 10.0 and policy.delay(2) == 20.0 and policy.delay(60) == 25.0


def test_reenqueue_resets_the_row_and_replaces_the_file(outbox: Outbox, tmp_path: Path) -> None:
    """Guards: re-sending a job (same instances) makes each row pending again with attempts,
    status and delivery time reset, and the new file in place; a file path is copied, not moved."""
    one = RetryPolicy(max_attempts=1, base_delay_s=1, max_delay_s=1)
    [ds] = mr_series(1)
    outbox.enqueue("j", "tps", [ds], now=0.0)
    _outcomes(outbox, one, 0.0, False, 0xC000)
    [dead] = outbox.dead_letters()
    ds.SeriesDescription = "again"
    src = tmp_path / "again.dcm"
    ds.save_as(src, enforce_file_format=True)
    [rid] = outbox.enqueue("j", "tps", [src], now=7.0)
    [row] = outbox.items()
    assert row.id == rid == dead.id
    assert (row.state, row.attempts, row.last_status, row.last_error, row.delivered_at) == (PENDING, 0, None, None, None)
    assert row.next_attempt_at == 7.0 and row.generation == dead.generation + 1
    assert row.study_instance_uid == ds.StudyInstanceUID and row.series_instance_uid == ds.SeriesInstanceUID
    assert row.sop_class_uid == ds.SOPClassUID and row.transfer_syntax_uid == str(ds.file_meta.TransferSyntaxUID)
    assert pydicom.dcmread(row.path).SeriesDescription == "again" and src.exists()


def test_retry_dead_needs_the_file(outbox: Outbox) -> None:
    """Guards: a dead letter whose file is gone is not put back (re-sending it cannot work)."""
    one = RetryPolicy(max_attempts=1, base_delay_s=1, max_delay_s=1)
    outbox.enqueue("j", "tps", mr_series(2), now=0.0)
    _outcomes(outbox, one, 0.0, False, 0xC000)
    first, second = outbox.dead_letters()
    first.path.unlink()
    assert outbox.retry_dead(now=5.0) == 1
    assert outbox.items(state=DEAD_LETTER)[0].id == first.id
    [back] = outbox.items(state=PENDING)
    assert back.id == second.id and back.attempts == 0 and back.next_attempt_at == 5.0


@pytest.mark.parametrize("bad", ["", ".", "..", ".hidden", "a/b", "a\\b", "a\0b"])
def test_names_that_escape_the_outbox_are_refused(outbox: Outbox, bad: str) -> None:
    """Guards: job/destination names used as directory names (path traversal)."""
    with pytest.raises(ValueError, match="cannot be used"):
        outbox.enqueue(bad, "tps", mr_series(1))
    with pytest.raises(ValueError, match="cannot be used"):
        outbox.enqueue("j", bad, mr_series(1))
    assert outbox.items() == [] and not any(outbox.root.rglob("*.dcm"))


# ----------------------------------------------------------------------------- spool guards


class _FixedFree(Spool):
    """A spool on a file system with exactly 1000 bytes free (the guard's arithmetic, not the disk)."""

    def free_bytes(self) -> int:
        return 1000


class _BigFree(Spool):
    """A spool with exactly 1 MB free."""

    def free_bytes(self) -> int:
        return 10**6


def test_spool_free_space_guard_boundary(tmp_path: Path) -> None:
    """Guards: the guard's arithmetic: refused only when free - incoming would fall BELOW the
    guard (an off-by-one turns 'Out of Resources' into a full disk, or refuses needlessly)."""
    spool = _FixedFree(tmp_path, min_free_bytes=400)
    spool.check_space(600)  # exactly down to the guard: allowed
    with pytest.raises(SpoolError, match="free space 1000 bytes minus incoming 601 .* guard of 400 bytes"):
        spool.check_space(601)
    _FixedFree(tmp_path, min_free_bytes=0).check_space(10**12)  # guard off


def test_spool_raw_bytes_size_counts_against_the_guard(tmp_path: Path) -> None:
    """Guards: the size of raw received bytes passed to the guard (a 0 would never refuse)."""
    [ds] = mr_series(1)
    raw_path = tmp_path / "in.dcm"
    ds.save_as(raw_path, enforce_file_format=True)
    raw = raw_path.read_bytes()
    spool = _BigFree(tmp_path / "spool", min_free_bytes=10**6 - len(raw) + 1)
    with pytest.raises(SpoolError, match=f"incoming {len(raw)} "):
        spool.store(raw)
    with pytest.raises(SpoolError, match=f"incoming {len(raw)} "):
        spool.store(raw_path)
    assert spool.iter_all_files() == []
    ok = _BigFree(tmp_path / "spool2", min_free_bytes=10**6 - len(raw))
    assert ok.store(raw).read_bytes() == raw


@pytest.mark.parametrize(("uid", "ok"), [("1.2.3", True), ("1.2.0.3", True), ("0", True), ("1." + "2" * 62, True),
                                         ("1." + "2" * 63, False), ("1.02", False), ("1..2", False), (".1.2", False),
                                         ("1.2.", False), ("1.2.3a", False), (" 1.2", False)])
def test_uid_rule(uid: str, ok: bool) -> None:
    """Guards: the UID syntax the spool uses for file names (64 characters, no leading zeros)."""
    from rtcontrast.node.receive.spool import InvalidUID, validate_uid

    if ok:
        assert validate_uid(uid, "SOPInstanceUID") == uid
    else:
        with pytest.raises(InvalidUID, match="SOPInstanceUID"):
            validate_uid(uid, "SOPInstanceUID")


# ----------------------------------------------------------------------------- retry policy, quarantine


class _Fixed:
    """A random source returning one fixed value (to read the jitter formula exactly)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def test_retry_delay_formula_with_jitter() -> None:
    """Guards: base * 2**(n-1) scaled by 1 +- jitter (uniform over [1 - j, 1 + j]), capped."""
    p = RetryPolicy(max_attempts=5, base_delay_s=10.0, max_delay_s=1000.0, jitter=0.2)
    assert p.delay(1, _Fixed(0.0)) == pytest.approx(8.0)  # type: ignore[arg-type]
    assert p.delay(1, _Fixed(0.5)) == pytest.approx(10.0)  # type: ignore[arg-type]
    assert p.delay(1, _Fixed(1.0)) == pytest.approx(12.0)  # type: ignore[arg-type]
    assert p.delay(3, _Fixed(0.25)) == pytest.approx(40.0 * 0.9)  # type: ignore[arg-type]
    assert p.delay(0, _Fixed(0.5)) == pytest.approx(10.0)  # type: ignore[arg-type]
    huge = RetryPolicy(max_attempts=5, base_delay_s=1e-300, max_delay_s=1e300, jitter=0.0)
    assert huge.delay(1000) == pytest.approx(1e-300 * 2.0**60)  # exponent capped at 60: no overflow


@pytest.mark.parametrize(("kw", "message"), [
    ({"max_attempts": 0}, "max_attempts must be >= 1"),
    ({"base_delay_s": -1.0}, "need 0 <= base_delay_s <= max_delay_s"),
    ({"base_delay_s": 10.0, "max_delay_s": 9.0}, "need 0 <= base_delay_s <= max_delay_s"),
    ({"jitter": 1.0}, r"jitter must be in \[0, 1\)"),
    ({"jitter": -0.1}, r"jitter must be in \[0, 1\)"),
])
def test_retry_policy_refuses_nonsense(kw: dict[str, float], message: str) -> None:
    """Guards: the policy's own checks (a zero max_attempts would dead-letter before any send)."""
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kw)  # type: ignore[arg-type]
    RetryPolicy(max_attempts=1, base_delay_s=0.0, max_delay_s=0.0, jitter=0.0)  # the edges are legal


def test_retry_dead_is_due_now_by_default(outbox: Outbox) -> None:
    """Guards: an admin's resend without a time is due at once (not at epoch 0 or never)."""
    import time

    one = RetryPolicy(max_attempts=1, base_delay_s=1, max_delay_s=1)
    outbox.enqueue("j", "tps", mr_series(1), now=0.0)
    _outcomes(outbox, one, 0.0, False, 0xC000)
    t0 = time.time()
    assert outbox.retry_dead() == 1
    [row] = outbox.items()
    assert t0 - 1 <= row.next_attempt_at <= time.time() + 1 and row.updated_at == row.next_attempt_at


def test_quarantine_keeps_bytes_and_reason_and_logs_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Guards: "nothing received is lost": a refused instance kept under a unique, dated name
    with its reason (non-UTF-8 safe) and a log line naming file and reason."""
    import logging
    import re

    spool = Spool(tmp_path)
    with caplog.at_level(logging.INFO):
        a = spool.quarantine(b"\x00bad", "cannot parse \udcff")
        src = tmp_path / "received.part"
        src.write_bytes(b"\x01bad too")
        b = spool.quarantine(src, "wrong SOP class")
    assert a is not None and b is not None and a != b
    assert re.fullmatch(r"\d{8}T\d{6}-[0-9a-f]{12}\.dcm", a.name), a.name
    assert a.read_bytes() == b"\x00bad" and b.read_bytes() == b"\x01bad too"
    assert a.with_suffix(".reason").read_bytes() == b"cannot parse ?\n"
    assert b.with_suffix(".reason").read_text() == "wrong SOP class\n"
    assert f"quarantined a refused instance as {b.name}: wrong SOP class" in caplog.text
    full = _FixedFree(tmp_path / "full", min_free_bytes=10**6)  # no room even for quarantine
    with caplog.at_level(logging.INFO):
        assert full.quarantine(b"\x00" * 10, "refused") is None
    assert "could not quarantine a refused instance (refused): " in caplog.text and "below the guard" in caplog.text


@pytest.mark.parametrize("data", [b"", b"\x00" * 131 + b"D", b"\x00" * 128 + b"DICX" + b"\x00" * 100,
                                  b"DICM" + b"\x00" * 200])
def test_not_part10_refused_from_bytes_and_files(tmp_path: Path, data: bytes) -> None:
    """Guards: the Part 10 check on raw bytes and on a streamed file (preamble + DICM at 128)."""
    from rtcontrast.node.receive.spool import UnreadableInstance, _check_part10

    with pytest.raises(UnreadableInstance, match=r"not a DICOM Part 10 stream \(no DICM prefix\)"):
        _check_part10(data)
    f = tmp_path / "x.bin"
    f.write_bytes(data)
    with pytest.raises(UnreadableInstance, match="no DICM prefix"):
        _check_part10(f)
    _check_part10(b"\x00" * 128 + b"DICM")  # exactly the prefix: passes this check


def test_remove_partial_logs_how_many(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Guards: the start-up clean-up of interrupted writes (temp files only) and its log line."""
    import logging

    spool = Spool(tmp_path)
    [ds] = mr_series(1)
    kept = spool.store(ds)
    for name in (".a.dcm.tmp", ".b.dcm.tmp"):
        (kept.parent / name).write_bytes(b"x")
    (kept.parent / "c.dcm.tmp").write_bytes(b"x")  # not hidden: not ours, kept
    with caplog.at_level(logging.INFO):
        assert spool.remove_partial() == 2
        assert spool.remove_partial() == 0
    assert "removed 2 partial spool file(s) left by an interrupted write" in caplog.text
    assert kept.exists() and (kept.parent / "c.dcm.tmp").exists()


def test_retry_dead_filters_and_logs_the_missing_file(outbox: Outbox, caplog: pytest.LogCaptureFixture) -> None:
    """Guards: an admin's resend restricted to one job or destination puts back only those, and a
    dead letter whose file is gone is named in the log (UID and path, no patient data)."""
    import logging

    one = RetryPolicy(max_attempts=1, base_delay_s=1, max_delay_s=1)
    outbox.enqueue("a", "tps", mr_series(1), now=0.0)
    outbox.enqueue("b", "tps", mr_series(1), now=0.0)
    outbox.enqueue("a", "archive", mr_series(1), now=0.0)
    _outcomes(outbox, one, 0.0, False, 0xC000)
    assert len(outbox.dead_letters()) == 3
    assert outbox.dead_letters(destination="archive")[0].job_id == "a"
    assert [d.destination for d in outbox.dead_letters(job_id="b")] == ["tps"]
    assert outbox.retry_dead(job_id="a", destination="tps", now=1.0) == 1
    assert {(d.job_id, d.destination) for d in outbox.dead_letters()} == {("b", "tps"), ("a", "archive")}
    [gone] = outbox.dead_letters(job_id="b")
    gone.path.unlink()
    with caplog.at_level(logging.INFO):
        assert outbox.retry_dead(destination="tps", now=2.0) == 0
    assert f"cannot retry {gone.sop_instance_uid}: file {gone.path} is gone" in caplog.text
    assert "0 dead letter(s) put back to pending (destination=tps job=None)" in caplog.text


def test_record_uses_the_senders_random_source_and_logs_dead_letters(outbox: Outbox,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Guards: the sender's (seedable) random source reaching the backoff, and the log line an
    admin greps for when an instance is dead-lettered (UID, destination, attempts, error; DEBUG per
    instance, since the sender writes one ERROR line per series and attempt)."""
    import logging

    policy = RetryPolicy(max_attempts=2, base_delay_s=10.0, max_delay_s=100.0, jitter=0.2)
    [ds] = mr_series(1)
    outbox.enqueue("j", "tps", [ds], now=0.0)
    [(_, [it])] = outbox.due(0.0).items()
    outbox.record([(it, Outcome(False, 0xC000, "refused"))], policy, now=0.0, rng=_Fixed(0.0))  # type: ignore[arg-type]
    [row] = outbox.items()
    assert row.next_attempt_at == pytest.approx(8.0)
    with caplog.at_level(logging.DEBUG):
        outbox.record([(row, Outcome(False, 0xC000, "refused again"))], policy, now=8.0, rng=_Fixed(1.0))  # type: ignore[arg-type]
    assert f"outbox: {ds.SOPInstanceUID} -> tps dead-lettered after 2 attempts: refused again" in caplog.text
