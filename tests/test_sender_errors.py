"""Delivery errors as an admin needs them (#16): the true cause in the dead letter, one log
line per series and attempt.  Real peers on loopback: a closed port, a silent listener, a
pynetdicom SCP answering 0xA700."""

from __future__ import annotations

import logging
import socket

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import MRImageStorage

from rtcontrast.node.dispatch.destinations import DicomDestination
from rtcontrast.node.dispatch.outbox import DEAD_LETTER, Outbox, RetryPolicy
from rtcontrast.node.dispatch.sender import Sender
from tests.conftest import free_port
from tests.support import mr_series

pytestmark = pytest.mark.network

ONE_SHOT = RetryPolicy(max_attempts=1, base_delay_s=1.0, max_delay_s=1.0, jitter=0.0)
TWO_SHOT = RetryPolicy(max_attempts=2, base_delay_s=1.0, max_delay_s=1.0, jitter=0.0)


def _sender_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "rtcontrast.node.dispatch.sender" and r.levelno >= logging.INFO]


def test_refused_connection_is_called_refused_and_logged_once_per_series(
        outbox: Outbox, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens here
    dest = DicomDestination("tps", "127.0.0.1", port, "TPS", connect_timeout_s=2)
    outbox.enqueue(5, "tps", mr_series(7, "1.2.3.4.5"), now=0.0)
    outbox.enqueue(5, "tps", mr_series(4, "1.2.3.4.6"), now=0.0)
    caplog.set_level(logging.DEBUG)
    Sender(outbox, {"tps": dest}, ONE_SHOT).run_once(0.0)
    dead = outbox.dead_letters()
    assert len(dead) == 11 and all(d.state == DEAD_LETTER for d in dead)
    assert all("connection refused" in (d.last_error or "") and "aborted" not in (d.last_error or "") for d in dead)
    lines = _sender_records(caplog)
    assert len(lines) == 2, [r.getMessage() for r in lines]  # one per series, not one per instance (11)
    assert all(r.levelno == logging.ERROR for r in lines)
    by_series = {r.series_uid: r for r in lines}  # type: ignore[attr-defined]
    assert set(by_series) == {"1.2.3.4.5", "1.2.3.4.6"}
    msg = by_series["1.2.3.4.5"].getMessage()
    assert msg.startswith("outbox: job 5 series 1.2.3.4.5 -> tps: 0 delivered, 7 dead-lettered after 1 attempts")
    assert "connection refused" in msg
    assert by_series["1.2.3.4.5"].destination == "tps" and by_series["1.2.3.4.5"].job == 5  # type: ignore[attr-defined]
    # the outbox itself no longer writes an ERROR per instance
    assert not [r for r in caplog.records if r.name.endswith("outbox") and r.levelno >= logging.ERROR]


def test_silent_peer_is_a_timeout_and_retry_is_a_warning(outbox: Outbox, caplog: pytest.LogCaptureFixture) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    try:
        dest = DicomDestination("tps", "127.0.0.1", silent.getsockname()[1], "TPS", connect_timeout_s=2,
                                acse_timeout_s=1, network_timeout_s=2)
        outbox.enqueue(6, "tps", mr_series(3), now=0.0)
        caplog.set_level(logging.INFO)
        Sender(outbox, {"tps": dest}, TWO_SHOT).run_once(0.0)
    finally:
        silent.close()
    items = outbox.items(job_id=6)
    assert all("no answer to the association request within acse_timeout_s 1 s" in (i.last_error or "")
               for i in items), items[0].last_error
    [line] = _sender_records(caplog)
    assert line.levelno == logging.WARNING and "3 failed (attempt 1 of 2, will retry)" in line.getMessage()


def test_out_of_resources_status_is_named(outbox: Outbox, caplog: pytest.LogCaptureFixture) -> None:
    ae = AE(ae_title="FAKE_TPS")
    ae.add_supported_context(MRImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0xA700)])
    try:
        dest = DicomDestination("tps", "127.0.0.1", port, "FAKE_TPS", connect_timeout_s=3)
        outbox.enqueue(7, "tps", mr_series(5), now=0.0)
        caplog.set_level(logging.INFO)
        Sender(outbox, {"tps": dest}, ONE_SHOT).run_once(0.0)
    finally:
        server.shutdown()
    dead = outbox.dead_letters()
    assert len(dead) == 5
    assert all((d.last_error or "").lower().startswith("c-store status 0xa700 (refused: out of resources)") for d in dead), \
        dead[0].last_error
    [line] = _sender_records(caplog)
    assert "5 dead-lettered" in line.getMessage() and "0xA700" in line.getMessage()


def test_a_response_the_reactor_takes_is_not_lost(outbox: Outbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom's requestor race, made to happen every time: after each C-STORE request goes
    out, the association's reactor takes the response off the DIMSE queue first (as it does
    now and then under CPU load).  Without ``keep_responses`` each instance waits out
    dimse_timeout_s and fails; with it every instance is delivered at once."""
    from pynetdicom.dimse import DIMSEServiceProvider

    original = DIMSEServiceProvider.send_msg
    stolen: list[int] = []

    def send_then_steal(self: DIMSEServiceProvider, primitive: object, context_id: int) -> None:
        original(self, primitive, context_id)
        if not self.assoc.is_requestor:  # the fake TPS in this process sends through here too
            return
        cx, msg = self.msg_queue.get(timeout=5)  # the response, taken by "the reactor"
        stolen.append(cx)
        self.assoc._serve_request(msg, cx)

    monkeypatch.setattr(DIMSEServiceProvider, "send_msg", send_then_steal)
    ae = AE(ae_title="FAKE_TPS")
    ae.add_supported_context(MRImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0x0000)])
    try:
        dest = DicomDestination("tps", "127.0.0.1", port, "FAKE_TPS", connect_timeout_s=3, dimse_timeout_s=3)
        outbox.enqueue(8, "tps", mr_series(3), now=0.0)
        Sender(outbox, {"tps": dest}, ONE_SHOT).run_once(0.0)
    finally:
        server.shutdown()
    assert len(stolen) == 3  # every response went through the reactor first
    assert outbox.dead_letters() == []
    assert outbox.counts()["tps"]["delivered"] == 3
