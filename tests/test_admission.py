"""Admission before cost (#15 finding 1): half-open and connect/close peers cannot lock scanners out.

Real peers on loopback: raw TCP sockets for the abuse (bound to 127.0.0.2, a second
loopback address, so the per-address limits can tell them from the scanner on
127.0.0.1) and dcmtk ``storescu`` as the scanner.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rtcontrast.node.receive.scp import ScpSettings, StorageSCP, StoredInstance
from rtcontrast.node.receive.spool import Spool
from rtcontrast.settings.node import NodeConfig
from tests.conftest import dcmtk, free_port
from tests.dicomgen import make_series, phantom, write_series

pytestmark = pytest.mark.network
AET = "RTCONTRAST"
ATTACKER = "127.0.0.2"


@pytest.fixture
def phantom_files(tmp_path: Path) -> list[Path]:
    return write_series(make_series(phantom(n=2, rows=16, cols=16)), tmp_path / "in")


@pytest.fixture
def scp_factory(tmp_path: Path) -> Iterator[Any]:
    made: list[StorageSCP] = []

    def make(**cfg: Any) -> tuple[StorageSCP, list[StoredInstance]]:
        config = NodeConfig.model_validate({"bind_host": "127.0.0.1", "port": free_port(), **cfg})
        settings = ScpSettings.from_config(config)
        settings = ScpSettings(**{**settings.__dict__, "network_timeout": 10, "acse_timeout": 10,
                                  "dimse_timeout": 10})
        stored: list[StoredInstance] = []
        scp = StorageSCP(settings, Spool(tmp_path / f"spool{len(made)}"), stored.append, lambda keys: None)
        scp.start()
        made.append(scp)
        return scp, stored

    yield make
    for scp in made:
        scp.stop()


def storescu(port: int, files: list[Path]) -> subprocess.CompletedProcess[str]:
    cmd = [dcmtk("storescu"), "-aet", "SCANNER", "-aec", AET, "-to", "10", "-ta", "10", "-td", "10",
           "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def attacker_socket(port: int, payload: bytes = b"") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((ATTACKER, 0))
    s.settimeout(15)
    s.connect(("127.0.0.1", port))
    if payload:
        s.sendall(payload)
    return s


def closed_by_server(s: socket.socket, within_s: float) -> float:
    """Seconds until the server closed ``s`` (recv returns EOF or reset); fails after ``within_s``."""
    t0 = time.monotonic()
    s.settimeout(within_s)
    try:
        data = s.recv(1024)
    except ConnectionResetError:
        data = b""
    except TimeoutError:
        pytest.fail(f"the server kept a pre-association connection open for more than {within_s} s")
    assert data == b"", data
    return time.monotonic() - t0


def test_partial_pdu_holders_do_not_lock_out_scanners(scp_factory: Any, phantom_files: list[Path],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Finding 1: 4 connections with a 3-byte PDU header held every slot of max_associations 4 for >= 300 s."""
    caplog.set_level(logging.INFO)
    scp, stored = scp_factory(limits={"max_associations": 4, "association_request_timeout_s": 3,
                                      "max_associations_per_peer": 10, "min_free_disk_bytes": 0})
    holders = [attacker_socket(scp.port, b"\x01\x00\x00") for _ in range(4)]
    try:
        time.sleep(0.3)
        t0 = time.monotonic()
        res = storescu(scp.port, phantom_files)  # while all four are held
        assert res.returncode == 0, res.stderr
        assert len(stored) == len(phantom_files) and time.monotonic() - t0 < 10
        # and the holders are closed by the node after association_request_timeout_s
        waited = [closed_by_server(s, 10) for s in holders]
        assert max(waited) < 6, waited
    finally:
        for s in holders:
            s.close()
    lines = [r.getMessage() for r in caplog.records if "before any association" in r.getMessage()]
    assert lines and "no complete association request within 3 s" in lines[0] and ATTACKER in lines[0], lines


def test_per_peer_limit_and_allow_list_at_accept(scp_factory: Any, phantom_files: list[Path]) -> None:
    """One address cannot take every slot; an address outside allowed_ips is closed before any data."""
    scp, stored = scp_factory(limits={"max_associations": 4, "min_free_disk_bytes": 0})  # per peer: 2
    first = [attacker_socket(scp.port) for _ in range(2)]
    third = attacker_socket(scp.port)
    try:
        assert closed_by_server(third, 5) < 2  # refused at accept, the first two still wait
        assert storescu(scp.port, phantom_files).returncode == 0
    finally:
        for s in (*first, third):
            s.close()
    fenced, fenced_stored = scp_factory(allowed_ips=["127.0.0.1/32"], limits={"min_free_disk_bytes": 0})
    stranger = attacker_socket(fenced.port, b"\x01\x00\x00")
    try:
        assert closed_by_server(stranger, 5) < 2
    finally:
        stranger.close()
    assert storescu(fenced.port, phantom_files).returncode == 0 and len(fenced_stored) == len(phantom_files)


def test_connect_close_cycles_do_not_block(scp_factory: Any, phantom_files: list[Path]) -> None:
    """Finding 1: four plain connect+close cycles blocked all associations for 30 s."""
    scp, stored = scp_factory(limits={"max_associations": 4, "min_free_disk_bytes": 0})
    for _ in range(20):
        attacker_socket(scp.port).close()
    t0 = time.monotonic()
    res = storescu(scp.port, phantom_files)
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - t0 < 5 and len(stored) == len(phantom_files)


# ----------------------------------------------------------------------------- malformed PDUs (finding 10)
def _item(kind: int, value: bytes) -> bytes:
    return bytes([kind, 0]) + len(value).to_bytes(2, "big") + value


def associate_rq(calling: bytes = b"SCANNER", called: bytes = AET.encode(), cid: int = 1) -> bytes:
    """A raw A-ASSOCIATE-RQ (PS3.8 9.3.2) for Verification, Implicit VR LE, max PDU 16 KiB."""
    pc = _item(0x20, bytes([cid, 0, 0, 0]) + _item(0x30, b"1.2.840.10008.1.1") + _item(0x40, b"1.2.840.10008.1.2"))
    user = _item(0x50, _item(0x51, (16384).to_bytes(4, "big")) + _item(0x52, b"1.2.826.0.1.3680043.9.9"))
    body = (b"\x00\x01\x00\x00" + called.ljust(16) + calling.ljust(16) + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + pc + user)
    return b"\x01\x00" + len(body).to_bytes(4, "big") + body


def _exchange(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        out = b""
        try:
            while chunk := s.recv(4096):
                out += chunk
                if len(out) >= 10:
                    break
        except (ConnectionResetError, TimeoutError):
            pass
        return out


@pytest.mark.parametrize(("rq", "why"), [
    (associate_rq(cid=2), "presentation context ID 2 is not odd"),
    (associate_rq(calling=b"EVIL\nFORGED LINE"), "calling AE title 'EVIL?FORGED LINE' holds characters"),
])
def test_malformed_association_request_gets_a_clean_rejection(scp_factory: Any, rq: bytes, why: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """An even context ID got no reply and a traceback; a newline in the calling AE forged a log line."""
    caplog.set_level(logging.DEBUG)
    scp, _ = scp_factory(require_called_ae=False, limits={"min_free_disk_bytes": 0})
    reply = _exchange(scp.port, rq)
    assert reply[:1] == b"\x03" and reply[7] == 1, reply  # A-ASSOCIATE-RJ, rejected-permanent
    assert any(why in r.getMessage() for r in caplog.records), caplog.text
    assert not [r for r in caplog.records if "\n" in r.getMessage() or r.exc_info], "a forged line or a traceback"
    assert _exchange(scp.port, associate_rq())[:1] == b"\x02"  # and a correct one is still accepted


def test_oversized_pdata_is_aborted(scp_factory: Any, caplog: pytest.LogCaptureFixture) -> None:
    """An 8 MiB P-DATA-TF against a negotiated 256 KiB was accepted."""
    scp, _ = scp_factory(require_called_ae=False, limits={"min_free_disk_bytes": 0, "max_pdu_bytes": 262144})
    with socket.create_connection(("127.0.0.1", scp.port), timeout=10) as s:
        s.sendall(associate_rq())
        ac = s.recv(6)
        assert ac[:1] == b"\x02"
        s.recv(int.from_bytes(ac[2:6], "big"), socket.MSG_WAITALL)
        s.sendall(b"\x04\x00" + (8 * 1024**2).to_bytes(4, "big") + bytes(65536))
        abort = s.recv(10, socket.MSG_WAITALL)
    assert abort[:1] == b"\x07", abort  # A-ABORT, before the 8 MiB were read
    assert "P-DATA-TF of 8388608 bytes exceeds the negotiated maximum of 262144" in caplog.text
