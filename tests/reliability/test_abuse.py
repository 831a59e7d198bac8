"""Abuse and fault cases of the outside probe (#15), in their CI form, against one in-process node.

Lock-out (half-open connections), partial series (an aborted association, refusals in the
window), loops (a derived series sent back), a deflate bomb.  Real peers on loopback:
pynetdicom as the scanner (it records every status), raw sockets for the abuse.  Each
test states the finding it reproduces; all of them failed before #15.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

from rtcontrast.node.service import Node
from rtcontrast.node.store.jobs import JobState
from tests.reliability.helpers import LENIENT_QA, echo, scanner_ae, send, series, wait_for

pytestmark = pytest.mark.network
IDLE_S = 3.0
MAX_INSTANCE_BYTES = 8 * 1024**2


def folder_protocol(export: Path) -> dict[str, Any]:
    return {
        "destinations": {"out": {"folder": {"path": str(export)}}},
        "recipes": [{"key": "T2w", "label": "T2w", "te_ms": 100, "tr_ms": 4000, "series_number": 901,
                     "destinations": ["out"]}],
        "qa": LENIENT_QA,
    }


@pytest.fixture
def node(make_node: Any, tmp_path: Path) -> Node:
    n = make_node(folder_protocol(tmp_path / "export"), series_idle_timeout_s=IDLE_S, release_grace_s=0.3,
                  limits={"min_free_disk_bytes": 0, "max_associations": 4, "association_request_timeout_s": 2,
                          "max_instance_bytes": MAX_INSTANCE_BYTES})
    n.export_root = tmp_path / "export"  # type: ignore[attr-defined]
    return n


def _final_job(node: Node, study: str, series_uid: str, timeout_s: float = 120) -> Any:
    def final() -> Any:
        jobs = node.jobs.jobs_for_series(study, series_uid)
        return jobs and jobs[-1].finished and jobs[-1]
    return wait_for(final, timeout_s, f"a finished job for series {series_uid}", interval=0.1)


def _exported(node: Node, series_uid: str) -> list[Path]:
    root: Path = node.export_root  # type: ignore[attr-defined]
    return [p for p in root.rglob("*.dcm")
            if str(pydicom.dcmread(p, stop_before_pixels=True).ReferencedSeriesSequence[0].SeriesInstanceUID)
            == series_uid]


def test_lockout_by_half_open_connections(node: Node) -> None:
    """Four 3-byte partial PDU headers held every slot of max_associations 4 (>= 300 s)."""
    holders = []
    for _ in range(8):  # more than the limit; from another loopback address than the scanner's
        s = socket.socket()
        s.bind(("127.0.0.2", 0))
        s.settimeout(10)
        try:
            s.connect(("127.0.0.1", node.port))
            s.sendall(b"\x01\x00\x00")
        except OSError:
            pass
        holders.append(s)
    try:
        t0 = time.monotonic()
        assert echo(node.port) == 0 and time.monotonic() - t0 < 5
        dss = series("lockout", n=3, size=32)
        res = send(node.port, dss)
        assert res.succeeded == {str(d.SOPInstanceUID) for d in dss}, res
    finally:
        for s in holders:
            s.close()


def test_aborted_association_is_held_incomplete(node: Node) -> None:
    """Aborted after 2 of 6 instances: was a 2-slice derived series at the TPS."""
    dss = series("aborted", n=6, size=32)
    study, uid = str(dss[0].StudyInstanceUID), str(dss[0].SeriesInstanceUID)
    ae = scanner_ae()
    assoc = ae.associate("127.0.0.1", node.port, ae_title="RTCONTRAST")
    assert assoc.is_established
    for ds in dss[:2]:
        assert assoc.send_c_store(ds).Status == 0
    assoc.abort()
    job = _final_job(node, study, uid)
    assert job.state == JobState.HELD and "incomplete series" in (job.reason or "") and "abort" in job.reason
    assert _exported(node, uid) == []
    # the scanner sends the series again, completely: it is processed whole
    res = send(node.port, dss)
    assert len(res.succeeded) == 6
    again = wait_for(lambda: (j := node.jobs.jobs_for_series(study, uid)[-1]).id != job.id and j.finished and j,
                     120, "the re-sent series' job")
    assert again.state in (JobState.QUEUED, JobState.DELIVERED), again.reason
    wait_for(lambda: len(_exported(node, uid)) == 6, 60, "six derived slices")


def test_refusals_in_the_window_hold_the_series(node: Node) -> None:
    """Free-space guard reached mid-series (3 Success + 3 0xA700), association released: was a 3-slice series."""
    dss = series("refused", n=6, size=32)
    study, uid = str(dss[0].StudyInstanceUID), str(dss[0].SeriesInstanceUID)
    ae = scanner_ae()
    assoc = ae.associate("127.0.0.1", node.port, ae_title="RTCONTRAST")
    statuses = []
    for i, ds in enumerate(dss):
        if i == 3:
            node.spool.min_free_bytes = 1 << 62  # the disk "fills up" mid-series
        statuses.append(int(assoc.send_c_store(ds).Status))
    assoc.release()
    assert statuses == [0, 0, 0, 0xA700, 0xA700, 0xA700]
    time.sleep(1.0)  # past the release grace: not handed out as complete
    assert node.jobs.jobs_for_series(study, uid) == []
    job = _final_job(node, study, uid)
    assert job.state == JobState.HELD and "3 instance(s) refused (0xA700)" in (job.reason or ""), job.reason
    node.spool.min_free_bytes = 0  # space is back; the scanner re-sends what was refused
    res = send(node.port, dss[3:])
    assert len(res.succeeded) == 3
    wait_for(lambda: len(_exported(node, uid)) == 6, 120, "six derived slices after the re-send")


def test_derived_series_sent_back_is_not_processed(node: Node) -> None:
    """A forwarding rule sent the node's output back: the TPS ended with two of every synthetic series."""
    dss = series("loop", n=3, size=32)
    study, uid = str(dss[0].StudyInstanceUID), str(dss[0].SeriesInstanceUID)
    assert len(send(node.port, dss).succeeded) == 3
    exported = wait_for(lambda: len(e := _exported(node, uid)) == 3 and e, 120, "the derived series")
    derived = [pydicom.dcmread(p) for p in exported]
    back_uid = str(derived[0].SeriesInstanceUID)
    assert len(send(node.port, derived).succeeded) == 3  # accepted (nothing received is lost) ...
    job = _final_job(node, study, back_uid)
    assert job.state == JobState.INELIGIBLE and "SyntheticData YES" in (job.reason or "")  # ... never processed
    root: Path = node.export_root  # type: ignore[attr-defined]
    assert len(list(root.rglob("*.dcm"))) == 3


def _deflate_bomb(path: Path, inflated_bytes: int) -> str:
    """A Deflated Explicit VR MR file whose PixelData inflates to ``inflated_bytes`` (written streaming)."""
    import struct
    import zlib

    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    ds = series("bomb", n=1, size=16)[0]
    del ds.PixelData
    ds.Rows = ds.Columns = int((inflated_bytes // 2) ** 0.5)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta.ImplementationClassUID = generate_uid()
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    n = ds.Rows * ds.Columns * 2
    with open(path, "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        mb = DicomBytesIO()
        mb.is_little_endian, mb.is_implicit_VR = True, False
        write_file_meta_info(mb, meta)
        fh.write(mb.getvalue())
        fh.write(z.compress(body.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, n)))
        zeros = bytes(1 << 20)
        for _ in range(n // len(zeros)):
            fh.write(z.compress(zeros))
        fh.write(z.compress(bytes(n % len(zeros))) + z.flush())
    return str(ds.SOPInstanceUID)


def test_deflate_bomb_refused_in_bounded_memory(node: Node, tmp_path: Path) -> None:
    """A 1 MiB Deflated upload inflated to 1 GiB: Success, +3 GB memory, past max_instance_bytes.

    dcmtk storescu sends it (``--propose-deflated``), so the memory traced here is the node's.
    """
    import subprocess
    import tracemalloc

    from tests.conftest import dcmtk

    bomb = tmp_path / "bomb.dcm"
    _deflate_bomb(bomb, 256 * 1024**2)
    assert bomb.stat().st_size < 2 * 1024**2
    tracemalloc.start()
    try:
        res = subprocess.run([dcmtk("storescu"), "-v", "-xd", "-aet", "SCANNER", "-aec", "RTCONTRAST",
                              "127.0.0.1", str(node.port), str(bomb)], capture_output=True, text=True, timeout=120)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "-> Deflated Explicit VR" in res.stderr and "Store Response (Refused: OutOfResources)" in res.stderr, res.stderr
    assert peak < 64 * 1024**2, f"{peak / 1024**2:.0f} MiB allocated by the node while refusing the bomb"
    assert echo(node.port) == 0
