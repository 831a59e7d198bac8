"""Outbox delivery against a real Orthanc on loopback (the stand-in TPS) and a folder."""

from __future__ import annotations

import random
import socket
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import MRImageStorage

from rtcontrast.node.store.db import connect
from rtcontrast.node.dispatch.outbox import (
    DEAD_LETTER,
    DELIVERED,
    PENDING,
    Outbox,
    RetryPolicy,
)
from rtcontrast.node.dispatch.destinations import DicomDestination, FolderDestination
from rtcontrast.node.dispatch.sender import Sender
from tests.conftest import free_port
from tests.support import mr_series
from tests.orthanc import Orthanc, orthanc  # noqa: F401  (fixture)

pytestmark = pytest.mark.network

FAST = RetryPolicy(max_attempts=3, base_delay_s=10.0, max_delay_s=100.0, jitter=0.2)


def dicom_dest(o: Orthanc, name: str = "tps", **kw: object) -> DicomDestination:
    return DicomDestination(name=name, host="127.0.0.1", port=o.dicom_port, ae_title=o.aet,
                            calling_ae="RTCONTRAST", connect_timeout_s=3, acse_timeout_s=5,
                            dimse_timeout_s=10, network_timeout_s=10, **kw)  # type: ignore[arg-type]


def test_delivers_to_orthanc_by_sop_uid(outbox: Outbox, orthanc: Orthanc) -> None:
    dss = mr_series(3)
    ids = outbox.enqueue(7, "tps", dss, now=1000.0)
    assert len(ids) == 3
    for ds in dss:
        assert (outbox.root / "tps" / "7" / f"{ds.SOPInstanceUID}.dcm").exists()
    assert outbox.pending_for_job(7) == 3
    assert outbox.counts() == {"tps": {PENDING: 3, DELIVERED: 0, DEAD_LETTER: 0}}

    sender = Sender(outbox, {"tps": dicom_dest(orthanc)}, FAST)
    assert sender.run_once(999.0) == 0  # nothing due yet
    assert sender.run_once(1000.0) == 3

    assert sorted(orthanc.sop_instance_uids()) == sorted(str(d.SOPInstanceUID) for d in dss)
    got = orthanc.dataset(str(dss[0].SOPInstanceUID))
    assert got.SeriesInstanceUID == dss[0].SeriesInstanceUID
    assert (got.pixel_array == dss[0].pixel_array).all()
    assert outbox.pending_for_job(7) == 0
    rows = outbox.items(job_id=7)
    assert {r.state for r in rows} == {DELIVERED}
    assert all(r.last_status == 0 and r.delivered_at == 1000.0 and r.attempts == 1 for r in rows)
    assert not any(r.path.exists() for r in rows)  # delivered files leave the outbox dir
    assert sender.run_once(5000.0) == 0  # nothing sent twice


def test_down_then_up_backs_off_then_delivers(outbox: Outbox, orthanc: Orthanc) -> None:
    orthanc.stop()
    policy = RetryPolicy(max_attempts=10, base_delay_s=10.0, max_delay_s=1000.0, jitter=0.2)
    sender = Sender(outbox, {"tps": dicom_dest(orthanc)}, policy, rng=random.Random(1))
    [ds] = mr_series(1)
    outbox.enqueue("j1", "tps", [ds], now=0.0)

    now, waits = 0.0, []
    for _ in range(4):
        assert sender.run_once(now) == 0
        [item] = outbox.items(job_id="j1")
        assert item.state == PENDING
        assert item.last_error and "association" in item.last_error
        waits.append(item.next_attempt_at - now)
        assert sender.run_once(now + 0.5 * waits[-1]) == 0  # not due yet: no attempt
        assert outbox.items(job_id="j1")[0].attempts == item.attempts
        now = item.next_attempt_at
    assert item.attempts == 4
    assert all(b > a for a, b in zip(waits, waits[1:])), waits
    assert 8.0 <= waits[0] <= 12.0 and waits[-1] <= 1000.0

    orthanc.start()
    assert sender.run_once(now) == 1
    assert orthanc.sop_instance_uids() == [str(ds.SOPInstanceUID)]
    assert outbox.items(job_id="j1")[0].state == DELIVERED


def test_dead_letter_then_retry_dead(outbox: Outbox, orthanc: Orthanc) -> None:
    orthanc.stop()
    sender = Sender(outbox, {"tps": dicom_dest(orthanc)}, FAST)
    outbox.enqueue("j2", "tps", mr_series(2), now=0.0)
    now = 0.0
    for _ in range(FAST.max_attempts):
        sender.run_once(now)
        now += FAST.max_delay_s * 2
    dead = outbox.dead_letters()
    assert len(dead) == 2 and all(d.attempts == FAST.max_attempts for d in dead)
    assert all(d.path.exists() for d in dead)  # kept for the resend
    assert outbox.pending_for_job("j2") == 0
    assert outbox.counts()["tps"][DEAD_LETTER] == 2
    assert sender.run_once(now + 10_000) == 0  # dead letters are not retried by themselves

    orthanc.start()
    assert outbox.retry_dead(destination="other") == 0
    assert outbox.retry_dead(job_id="j2", now=now) == 2
    assert outbox.pending_for_job("j2") == 2
    assert sender.run_once(now) == 2
    assert len(orthanc.instances()) == 2
    assert outbox.dead_letters() == []


def test_resend_same_instance_does_not_duplicate(outbox: Outbox, orthanc: Orthanc) -> None:
    dss = mr_series(2)
    sender = Sender(outbox, {"tps": dicom_dest(orthanc)}, FAST)
    outbox.enqueue(1, "tps", dss, now=0.0)
    assert sender.run_once(0.0) == 2
    dss[0].SeriesDescription = "changed"
    outbox.enqueue(1, "tps", dss, now=1.0)  # the same job again: rows go back to pending
    assert outbox.pending_for_job(1) == 2
    assert sender.run_once(1.0) == 2
    assert sorted(orthanc.sop_instance_uids()) == sorted(str(d.SOPInstanceUID) for d in dss)
    assert len(orthanc.series()) == 1
    assert orthanc.dataset(str(dss[0].SOPInstanceUID)).SeriesDescription == "changed"
    assert len(outbox.items()) == 2


def test_rejected_status_is_a_failure(outbox: Outbox, tmp_path: Path) -> None:
    """A peer answering 0xA700 (out of resources) is not 'delivered'; 0xB000 is, with a warning."""
    statuses = iter([0xA700, 0xB000])

    def handle(event: evt.Event) -> int:
        return next(statuses)

    ae = AE(ae_title="FAKE_TPS")
    ae.add_supported_context(MRImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    p = free_port()
    server = ae.start_server(("127.0.0.1", p), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])
    try:
        dest = DicomDestination("tps", "127.0.0.1", p, "FAKE_TPS", connect_timeout_s=3)
        sender = Sender(outbox, {"tps": dest}, FAST)
        outbox.enqueue("j", "tps", mr_series(1), now=0.0)
        assert sender.run_once(0.0) == 0
        [item] = outbox.items()
        assert item.state == PENDING and item.last_status == 0xA700 and "0xA700" in (item.last_error or "")
        assert sender.run_once(item.next_attempt_at) == 1
        [item] = outbox.items()
        assert item.state == DELIVERED and item.last_status == 0xB000 and "warning" in (item.last_error or "")
    finally:
        server.shutdown()


def test_tcp_nodelay_is_set(outbox: Outbox) -> None:
    """The sender turns Nagle off on its association socket (DCMTK peers stall otherwise)."""
    seen: list[int] = []

    def on_store(event: evt.Event) -> int:
        return 0x0000

    ae = AE(ae_title="TPS")
    ae.add_supported_context(MRImageStorage, ["1.2.840.10008.1.2.1"])
    p = free_port()
    server = ae.start_server(("127.0.0.1", p), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    import rtcontrast.node.dispatch.sender as ob

    orig = ob._set_nodelay

    def spy(event: evt.Event) -> None:
        orig(event)
        seen.append(event.assoc.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    try:
        ob._set_nodelay = spy
        outbox.enqueue("j", "tps", mr_series(1), now=0.0)
        assert Sender(outbox, {"tps": DicomDestination("tps", "127.0.0.1", p, "TPS")}, FAST).run_once(0.0) == 1
    finally:
        ob._set_nodelay = orig
        server.shutdown()
    assert seen and seen[0] != 0


def test_folder_destination_and_files(outbox: Outbox, tmp_path: Path) -> None:
    dss = mr_series(2)
    src = tmp_path / "src.dcm"
    extra = mr_series(1)[0]
    extra.save_as(src, enforce_file_format=True)
    outbox.enqueue("j9", "export", dss + [src], now=0.0)
    export = tmp_path / "export"
    sender = Sender(outbox, {"export": FolderDestination("export", export)}, FAST)
    assert sender.run_once(0.0) == 3
    for ds in dss + [extra]:
        f = export / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert pydicom.dcmread(f).SOPInstanceUID == ds.SOPInstanceUID
    assert not list(export.rglob(".*"))  # no temp files left
    assert src.exists()  # the caller's file is copied, never moved


def test_unknown_destination_goes_dead(outbox: Outbox) -> None:
    outbox.enqueue("j", "nowhere", mr_series(1), now=0.0)
    sender = Sender(outbox, {}, RetryPolicy(max_attempts=1, base_delay_s=1, max_delay_s=1))
    assert sender.run_once(0.0) == 0
    [d] = outbox.dead_letters()
    assert "not configured" in (d.last_error or "")


def test_restart_picks_up_pending(tmp_path: Path, orthanc: Orthanc) -> None:
    db, root = tmp_path / "node.db", tmp_path / "outbox"
    first = Outbox(connect(db), root)
    dss = mr_series(3)
    first.enqueue(5, "tps", dss, now=0.0)
    first.conn.close()  # the node dies before sending anything

    second = Outbox(connect(db), root)
    assert second.pending_for_job(5) == 3
    sender = Sender(second, {"tps": dicom_dest(orthanc)}, FAST, poll_interval_s=0.1)
    sender.start()
    try:
        deadline = time.monotonic() + 20
        while second.pending_for_job(5) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        sender.stop()
    assert not sender.running
    assert second.pending_for_job(5) == 0
    assert sorted(orthanc.sop_instance_uids()) == sorted(str(d.SOPInstanceUID) for d in dss)


def test_background_sender_and_concurrent_enqueue(outbox: Outbox, orthanc: Orthanc) -> None:
    sender = Sender(outbox, {"tps": dicom_dest(orthanc)}, FAST, poll_interval_s=0.05)
    sender.start()
    try:
        batches = [mr_series(2) for _ in range(4)]
        threads = [threading.Thread(target=outbox.enqueue, args=(i, "tps", b)) for i, b in enumerate(batches)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        sender.wake()
        deadline = time.monotonic() + 20
        while sum(c[PENDING] for c in outbox.counts().values()) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        sender.stop()
    assert outbox.counts()["tps"][DELIVERED] == 8
    assert len(orthanc.instances()) == 8
    # retention drops delivered rows only, and the emptied job directories
    outbox.enqueue("late", "tps", mr_series(1), now=time.time() + 3600)
    assert outbox.prune(time.time() + 1) == 8
    assert outbox.counts()["tps"] == {PENDING: 1, DELIVERED: 0, DEAD_LETTER: 0}
    assert [p.name for p in (outbox.root / "tps").iterdir()] == ["late"]


def test_bad_names_rejected(outbox: Outbox) -> None:
    with pytest.raises(ValueError):
        outbox.enqueue("../x", "tps", mr_series(1))
    with pytest.raises(ValueError):
        outbox.enqueue("j", "a/b", mr_series(1))
    assert outbox.items() == []


def test_retry_policy_bounds() -> None:
    p = RetryPolicy(max_attempts=5, base_delay_s=2, max_delay_s=30, jitter=0.2)
    rng = random.Random(0)
    delays = [p.delay(n, rng) for n in range(1, 12)]
    assert 1.6 <= delays[0] <= 2.4
    assert max(delays) <= 30
    assert delays[-1] == 30
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)


def test_rejected_and_silent_peers_are_failures(outbox: Outbox) -> None:
    """Association rejected (wrong calling AE) and a peer that never answers (ACSE timeout)."""
    ae = AE(ae_title="TPS")
    ae.add_supported_context(MRImageStorage, ["1.2.840.10008.1.2.1"])
    ae.require_calling_aet = ["SOMEONE_ELSE"]
    p = free_port()
    server = ae.start_server(("127.0.0.1", p), block=False)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        outbox.enqueue("r", "rejecting", mr_series(1), now=0.0)
        outbox.enqueue("s", "silent", mr_series(1), now=0.0)
        dests = {
            "rejecting": DicomDestination("rejecting", "127.0.0.1", p, "TPS", connect_timeout_s=3),
            "silent": DicomDestination("silent", "127.0.0.1", silent.getsockname()[1], "TPS",
                                       connect_timeout_s=2, acse_timeout_s=1, network_timeout_s=2),
        }
        t0 = time.monotonic()
        assert Sender(outbox, dests, FAST).run_once(0.0) == 0
        assert time.monotonic() - t0 < 15
    finally:
        server.shutdown()
        silent.close()
    [r] = outbox.items(job_id="r")
    [s] = outbox.items(job_id="s")
    assert r.state == PENDING and "rejected" in (r.last_error or ""), r.last_error
    assert s.state == PENDING and s.attempts == 1 and "association" in (s.last_error or ""), s.last_error
