"""Sending to one DICOM peer over several associations at once (``max_associations``, #13).

Real pynetdicom SCPs on loopback.  The SCP records each association's open/close and
every stored SOP Instance UID; concurrency is forced by the SCP itself (a C-STORE waits,
bounded, until the situation under test has come about), so nothing here asserts a time.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import MRImageStorage

from rtcontrast.node.dispatch.destinations import DicomDestination, build_destinations
from rtcontrast.node.dispatch.outbox import DELIVERED, PENDING, Outbox, RetryPolicy
from rtcontrast.node.dispatch.sender import (
    MIN_ITEMS_PER_ASSOCIATION,
    Sender,
    split_parts,
)
from rtcontrast.settings.protocol import ProtocolConfig
from tests.conftest import free_port
from tests.support import mr_series

pytestmark = pytest.mark.network

RETRY = RetryPolicy(max_attempts=3, base_delay_s=1.0, max_delay_s=1.0, jitter=0.0)
WAIT_S = 15.0  # bound on every wait inside the SCP


class RecordingSCP:
    """A pynetdicom C-STORE SCP that records connections and stored instances.

    ``hold_until``: the first C-STORE on each association waits (at most WAIT_S) for this
    event, so that associations that are open at the same time stay open together; it is
    set when ``release_at_open`` connections are open at once, or when one is rejected.
    ``third_after_two``: the third connection's association starts only once two were
    accepted (pynetdicom counts association threads for ``maximum_associations``, so
    three that arrive together could all be rejected).
    """

    def __init__(self, max_associations: int = 10, hold_until: threading.Event | None = None,
                 release_at_open: int | None = None, third_after_two: bool = False,
                 abort_third_at_store: int | None = None) -> None:
        self.release_at_open = release_at_open
        self.abort_third_at_store = abort_third_at_store
        self.by_assoc: dict[int, list[str]] = {}
        self.third_after_two = third_after_two
        self.accepted = 0
        self.two_accepted = threading.Event()
        self.lock = threading.Lock()
        self.open_now = 0
        self.max_open = 0
        self.opened: list[int] = []          # connection ids in open order
        self.events: list[tuple[str, int]] = []  # ("open"|"close", id) in order
        self.stored: list[str] = []           # SOP Instance UIDs, duplicates would show
        self.rejected = 0
        self.hold_until = hold_until
        self._held: set[int] = set()
        self.all_rejected = threading.Event()
        ae = AE(ae_title="TPS")
        ae.add_supported_context(MRImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        ae.maximum_associations = max_associations
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        self.port = free_port()
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_CONN_OPEN, self._open), (evt.EVT_CONN_CLOSE, self._close),
            (evt.EVT_REJECTED, self._rejected), (evt.EVT_ACCEPTED, self._accepted), (evt.EVT_C_STORE, self._store),
        ])

    def _open(self, event: Any) -> None:
        with self.lock:
            self.open_now += 1
            self.max_open = max(self.max_open, self.open_now)
            self.opened.append(id(event.assoc))
            self.events.append(("open", id(event.assoc)))
            if self.hold_until is not None and self.release_at_open and self.open_now >= self.release_at_open:
                self.hold_until.set()
            third = len(self.opened) == 3
        if third and self.third_after_two:  # runs before this association's thread starts
            self.two_accepted.wait(WAIT_S)

    def _accepted(self, event: Any) -> None:
        with self.lock:
            self.accepted += 1
            if self.accepted >= 2:
                self.two_accepted.set()

    def _close(self, event: Any) -> None:
        with self.lock:
            self.open_now -= 1
            self.events.append(("close", id(event.assoc)))

    def _rejected(self, event: Any) -> None:
        with self.lock:
            self.rejected += 1
        if self.hold_until is not None:
            self.hold_until.set()

    def _store(self, event: Any) -> int:
        key = id(event.assoc)
        with self.lock:
            mine = self.by_assoc.setdefault(key, [])
            doomed = (self.abort_third_at_store is not None and len(self.opened) >= 3 and key == self.opened[2]
                      and len(mine) + 1 == self.abort_third_at_store)
        if doomed:  # an A-ABORT instead of this C-STORE's response; the instance is not kept
            event.assoc.abort()
            return 0xA700
        if self.hold_until is not None and key not in self._held:
            self._held.add(key)
            self.hold_until.wait(WAIT_S)
        ds = event.dataset
        with self.lock:
            self.stored.append(str(ds.SOPInstanceUID))
            self.by_assoc[key].append(str(ds.SOPInstanceUID))
        return 0x0000

    def shutdown(self) -> None:
        self.server.shutdown()


def _dest(port: int, k: int) -> DicomDestination:
    return DicomDestination("tps", "127.0.0.1", port, "TPS", connect_timeout_s=3, acse_timeout_s=10,
                            dimse_timeout_s=30, network_timeout_s=30, max_associations=k)


def test_split_parts_is_contiguous_and_bounded() -> None:
    items = list(range(20))
    parts = split_parts(items, 3)  # type: ignore[arg-type]
    assert [x for p in parts for x in p] == items and len(parts) == 3
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert split_parts(items, 1) == [items]  # type: ignore[arg-type]
    few = list(range(2 * MIN_ITEMS_PER_ASSOCIATION - 1))
    assert len(split_parts(few, 8)) == 1  # type: ignore[arg-type]  # too few for two associations
    assert len(split_parts(list(range(100)), 8)) == 8  # type: ignore[arg-type]
    assert split_parts([], 3) == [[]]


def test_three_associations_deliver_each_instance_once(outbox: Outbox, caplog: pytest.LogCaptureFixture) -> None:
    scp = RecordingSCP(hold_until=threading.Event(), release_at_open=2)  # held until two are open at once
    try:
        a, b = mr_series(13, "1.2.3.4.1"), mr_series(11, "1.2.3.4.2")
        outbox.enqueue(1, "tps", a + b, now=0.0)
        caplog.set_level(logging.INFO)
        assert Sender(outbox, {"tps": _dest(scp.port, 3)}, RETRY).run_once(0.0) == 24
    finally:
        scp.shutdown()
    sent = [str(ds.SOPInstanceUID) for ds in a + b]
    assert sorted(scp.stored) == sorted(sent) and len(set(scp.stored)) == 24  # each exactly once
    assert scp.max_open > 1 and len(scp.opened) == 3, (scp.max_open, scp.events)
    assert all(i.state == DELIVERED for i in outbox.items(job_id=1))
    lines = [r for r in caplog.records if r.name == "rtcontrast.node.dispatch.sender"]
    assert sorted(r.getMessage() for r in lines) == [
        "outbox: job 1 series 1.2.3.4.1 -> tps: 13 delivered",
        "outbox: job 1 series 1.2.3.4.2 -> tps: 11 delivered",
    ]  # one line per series and attempt, not per part


def test_a_rejected_part_fails_only_its_items_and_is_retried(outbox: Outbox,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """The SCP takes 2 associations at a time; the third part is rejected while the others wait."""
    rejected = threading.Event()
    scp = RecordingSCP(max_associations=2, hold_until=rejected, third_after_two=True)
    try:
        ds = mr_series(12, "1.2.3.4.9")
        outbox.enqueue(2, "tps", ds, now=0.0)
        caplog.set_level(logging.INFO)
        sender = Sender(outbox, {"tps": _dest(scp.port, 3)}, RETRY)
        assert sender.run_once(0.0) == 8
        items = outbox.items(job_id=2)
        failed = [i for i in items if i.state != DELIVERED]
        assert scp.rejected == 1 and len(failed) == 4
        assert all(i.state == PENDING and i.attempts == 1 and "rejected" in (i.last_error or "") for i in failed)
        ids = sorted(i.id for i in failed)  # one contiguous part of the batch
        assert ids == list(range(ids[0], ids[0] + 4))
        assert len(scp.stored) == 8 and not {i.sop_instance_uid for i in failed} & set(scp.stored)
        [line] = [r for r in caplog.records if r.name == "rtcontrast.node.dispatch.sender"]
        assert line.levelno == logging.WARNING and "8 delivered, 4 failed (attempt 1 of 3, will retry)" in line.getMessage()
        # the retry: only the 4 failed items go out (fewer than two parts' worth: one association)
        assert sender.run_once(10.0) == 4
    finally:
        scp.shutdown()
    assert sorted(scp.stored) == sorted(str(d.SOPInstanceUID) for d in ds)  # each exactly once in all
    assert all(i.state == DELIVERED for i in outbox.items(job_id=2))


def test_an_aborted_part_fails_only_its_unacknowledged_items(outbox: Outbox) -> None:
    """The TPS aborts the third association at its second C-STORE: its first instance is
    delivered, the other three of that part fail and are retried; the other parts are unaffected."""
    scp = RecordingSCP(abort_third_at_store=2)
    try:
        ds = mr_series(12, "1.2.3.4.7")
        outbox.enqueue(5, "tps", ds, now=0.0)
        sender = Sender(outbox, {"tps": _dest(scp.port, 3)}, RETRY)
        assert sender.run_once(0.0) == 9
        items = outbox.items(job_id=5)
        [kept] = scp.by_assoc[scp.opened[2]]  # the aborted association's one acknowledged instance
        pos = [i.sop_instance_uid for i in items].index(kept)
        failed = [i for i in items if i.state != DELIVERED]
        assert [i.id for i in failed] == [i.id for i in items[pos + 1:pos + 4]]  # the rest of its part
        assert all(i.state == PENDING and i.attempts == 1 and i.last_error for i in failed)
        # the sender ended the aborted association at once: no later C-STORE waited out dimse_timeout_s
        assert not any("dimse_timeout_s" in (i.last_error or "") for i in failed), [i.last_error for i in failed]
        assert len(scp.stored) == 9 and not {i.sop_instance_uid for i in failed} & set(scp.stored)
        assert sender.run_once(10.0) == 3
    finally:
        scp.shutdown()
    assert sorted(scp.stored) == sorted(str(d.SOPInstanceUID) for d in ds)  # each exactly once in all
    assert all(i.state == DELIVERED for i in outbox.items(job_id=5))


def test_one_association_is_as_before(outbox: Outbox) -> None:
    scp = RecordingSCP()
    try:
        ds = mr_series(20)
        outbox.enqueue(3, "tps", ds, now=0.0)
        assert Sender(outbox, {"tps": _dest(scp.port, 1)}, RETRY).run_once(0.0) == 20
    finally:
        scp.shutdown()
    assert scp.max_open == 1 and len(scp.opened) == 1  # one association for the whole batch
    assert scp.stored == [str(d.SOPInstanceUID) for d in ds]  # in order, each once


def test_max_associations_from_the_protocol() -> None:
    base = {"destinations": {"tps": {"dicom": {"host": "10.0.0.2", "port": 104, "ae_title": "TPS"}}},
            "recipes": [{"key": "a", "label": "A", "te_ms": 80, "tr_ms": 3000, "series_number": 950,
                         "destinations": ["tps"]}]}
    dest = build_destinations(ProtocolConfig.model_validate(base), "NODE")["tps"]
    assert isinstance(dest, DicomDestination) and dest.max_associations == 3  # the default
    base["destinations"]["tps"]["dicom"]["max_associations"] = 1  # type: ignore[index]
    dest = build_destinations(ProtocolConfig.model_validate(base), "NODE")["tps"]
    assert isinstance(dest, DicomDestination) and dest.max_associations == 1
    for bad in (0, 9):
        base["destinations"]["tps"]["dicom"]["max_associations"] = bad  # type: ignore[index]
        with pytest.raises(ValueError):
            ProtocolConfig.model_validate(base)


def test_a_part_that_raises_fails_only_its_items(outbox: Outbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected error in one part's thread: that part's items fail (retried), the others' outcomes stand."""
    import rtcontrast.node.dispatch.sender as sender_mod
    from rtcontrast.node.dispatch.outbox import Outcome

    outbox.enqueue(4, "tps", mr_series(12), now=0.0)
    items = outbox.due(0.0)["tps"]
    bad = items[5].id  # in the second of three parts

    def fake(dest: DicomDestination, part: list[Any]) -> list[Outcome]:
        if any(it.id == bad for it in part):
            raise RuntimeError("boom")
        return [Outcome(True, 0, None) for _ in part]

    monkeypatch.setattr(sender_mod, "send_dicom", fake)
    assert Sender(outbox, {"tps": _dest(free_port(), 3)}, RETRY).run_once(0.0) == 8
    after = {i.id: i for i in outbox.items(job_id=4)}
    failed = sorted(i for i, it in after.items() if it.state != DELIVERED)
    assert failed == [it.id for it in items[4:8]]
    assert all("sender error" in (after[i].last_error or "") and after[i].state == PENDING for i in failed)
