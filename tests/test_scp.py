"""Storage SCP against real dcmtk peers (echoscu, storescu) on 127.0.0.1.

Every transfer syntax is negotiated for real (a storescu profile proposing only that
syntax), stored without transcoding and decoded back to the original pixels.  The
refusal paths answer the documented statuses and leave nothing outside the spool.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE, _config

from rtcontrast.node.receive.scp import ACCEPTED_TRANSFER_SYNTAXES, ScpSettings, StorageSCP, StoredInstance
from rtcontrast.node.receive.spool import Spool
from tests.conftest import dcmtk
from tests.dicomgen_receive import (
    ENHANCED_MR_IMAGE,
    MR_IMAGE,
    TRANSFER_SYNTAXES,
    mismatched_sop_class,
    mr_in_syntax,
    reference,
    relabelled,
    storescu_profile,
)

pytestmark = pytest.mark.network

AET = "RTCONTRAST"


@dataclass
class Node:
    scp: StorageSCP
    spool: Spool
    port: int
    stored: list[StoredInstance] = field(default_factory=list)
    released: list[set[tuple[str, str]]] = field(default_factory=list)


@pytest.fixture
def node_factory(tmp_path: Path, port: int) -> Iterator[Callable[..., Node]]:
    made: list[StorageSCP] = []

    def make(min_free_bytes: int = 0, on_stored: Callable[[StoredInstance], None] | None = None, **kw: object) -> Node:
        settings = ScpSettings(
            ae_title=AET, host="127.0.0.1", port=port, network_timeout=10, acse_timeout=10, dimse_timeout=10, **kw
        )  # type: ignore[arg-type]
        spool = Spool(tmp_path / "spool", min_free_bytes=min_free_bytes)
        node = Node(scp=None, spool=spool, port=port)  # type: ignore[arg-type]

        def stored(inst: StoredInstance) -> None:
            if on_stored is not None:
                on_stored(inst)
            node.stored.append(inst)

        node.scp = StorageSCP(settings, spool, stored, node.released.append)
        node.scp.start()
        made.append(node.scp)
        return node

    yield make
    for scp in made:
        scp.stop()


def run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def storescu(port: int, *files: Path | str, extra: list[str] | None = None, aet: str = "SCANNER",
             aec: str = AET) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu, verbose, with bounded network timeouts."""
    cmd = [dcmtk("storescu"), "-v", "-to", "10", "-ta", "10", "-td", "20", "-aet", aet, "-aec", aec,
           *(extra or []), "127.0.0.1", str(port), *map(str, files)]
    return run(cmd)


def wait_for(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------- echo
def test_c_echo_with_echoscu(node_factory: Callable[..., Node]) -> None:
    node = node_factory()
    res = run([dcmtk("echoscu"), "-to", "10", "-ta", "10", "-aec", AET, "127.0.0.1", str(node.port)])
    assert res.returncode == 0, res.stderr


def test_accepted_sockets_have_tcp_nodelay(node_factory: Callable[..., Node]) -> None:
    node = node_factory()
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AET)
    try:
        assert assoc.is_established
        assert wait_for(lambda: len(node.scp.ae.active_associations) == 1)
        server_side = node.scp.ae.active_associations[0]
        sock = server_side.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()


# ---------------------------------------------------------------------------- store
@pytest.mark.parametrize("ts", TRANSFER_SYNTAXES, ids=lambda ts: pydicom.uid.UID(ts).keyword or ts)
def test_store_each_transfer_syntax(node_factory: Callable[..., Node], tmp_path: Path, ts: str,
                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rtcontrast")
    assert ts in ACCEPTED_TRANSFER_SYNTAXES
    node = node_factory()
    src = mr_in_syntax(ts, tmp_path)
    res = storescu(node.port, src, extra=storescu_profile(tmp_path, MR_IMAGE, ts))
    assert res.returncode == 0, res.stderr
    assert "Received Store Response (Success)" in res.stderr

    ref = reference()
    [inst] = node.stored
    assert (inst.study_uid, inst.series_uid, inst.sop_instance_uid) == (
        ref.StudyInstanceUID, ref.SeriesInstanceUID, ref.SOPInstanceUID)
    assert inst.sop_class_uid == MR_IMAGE and inst.calling_ae == "SCANNER"
    assert inst.path.parent.parent.parent == node.spool.root
    got = pydicom.dcmread(inst.path)
    assert got.file_meta.TransferSyntaxUID == ts  # kept as negotiated, not transcoded
    assert (got.pixel_array == ref.pixel_array).all()
    # pixel data bytes are exactly what the sender's file held
    if pydicom.uid.UID(ts).is_compressed:
        assert got.PixelData == pydicom.dcmread(src).PixelData
    assert wait_for(lambda: node.released == [{(inst.study_uid, inst.series_uid)}])
    assert node.spool.iter_series_files(inst.study_uid, inst.series_uid) == [inst.path]
    logged = " ".join(r.getMessage() for r in caplog.records if r.name.startswith("rtcontrast"))
    assert "association released" in logged and "1 instance(s) stored" in logged
    for ident in (str(ref.PatientName), str(ref.PatientID)):
        assert ident not in logged


def test_enhanced_mr_is_accepted(node_factory: Callable[..., Node], tmp_path: Path) -> None:
    node = node_factory()
    src = relabelled(get_testdata_file("MR_small.dcm"), tmp_path / "emr.dcm", SOPClassUID=ENHANCED_MR_IMAGE)
    res = storescu(node.port, src, extra=["-R"])
    assert res.returncode == 0, res.stderr
    assert [i.sop_class_uid for i in node.stored] == [ENHANCED_MR_IMAGE]


def test_resend_overwrites_same_file(node_factory: Callable[..., Node]) -> None:
    node = node_factory()
    src = get_testdata_file("MR_small.dcm")
    assert storescu(node.port, src).returncode == 0
    assert storescu(node.port, src).returncode == 0
    assert len(node.stored) == 2 and node.stored[0].path == node.stored[1].path
    assert len(node.spool.iter_all_files()) == 1


def test_aborted_association_stores_but_does_not_shorten(node_factory: Callable[..., Node],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="rtcontrast")
    node = node_factory()
    res = storescu(node.port, get_testdata_file("MR_small.dcm"), extra=["--abort"])
    assert "Received Store Response (Success)" in res.stderr
    assert len(node.stored) == 1 and node.stored[0].path.exists()
    assert wait_for(lambda: "association aborted" in caplog.text)
    assert node.released == []


def test_stream_to_disk_receive(node_factory: Callable[..., Node], tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    # the setting flips a process-wide pynetdicom flag: restore it after the test
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", _config.STORE_RECV_CHUNKED_DATASET)
    node = node_factory(stream_to_disk=True)
    ts = str(pydicom.uid.JPEG2000Lossless)
    src = mr_in_syntax(ts, tmp_path)
    res = storescu(node.port, src, extra=storescu_profile(tmp_path, MR_IMAGE, ts))
    assert res.returncode == 0, res.stderr
    got = pydicom.dcmread(node.stored[0].path)
    assert got.file_meta.TransferSyntaxUID == ts
    assert (got.pixel_array == reference().pixel_array).all()


# ---------------------------------------------------------------------------- refusals
def test_other_sop_class_refused_at_negotiation(node_factory: Callable[..., Node]) -> None:
    node = node_factory()
    res = storescu(node.port, get_testdata_file("CT_small.dcm"), extra=["-R"])
    assert res.returncode != 0
    assert "No Acceptable Presentation Contexts" in res.stderr or "No presentation context" in res.stderr
    assert node.stored == [] and files_under(node.spool.root) == []


@pytest.mark.parametrize(
    "attrs",
    [
        {"SOPInstanceUID": "../../../../outside"},
        {"SeriesInstanceUID": "1.2/../../../outside"},
        {"StudyInstanceUID": "1." + "2" * 80},
    ],
    ids=["sop-path-trick", "series-path-trick", "study-overlong"],
)
def test_bad_uids_refused_nothing_written_outside(node_factory: Callable[..., Node], tmp_path: Path,
                                                  attrs: dict[str, str]) -> None:
    node = node_factory()
    src = relabelled(get_testdata_file("MR_small.dcm"), tmp_path / "bad.dcm", **attrs)
    before = set(files_under(tmp_path))
    res = storescu(node.port, src)
    assert res.returncode != 0
    assert "DataSetDoesNotMatchSOPClass" in res.stderr  # 0xA900
    assert node.stored == []
    new = set(files_under(tmp_path)) - before
    assert new and all(p.parent == node.spool.quarantine_dir for p in new), new
    assert not (tmp_path.parent / "outside").exists() and not (tmp_path / "outside").exists()
    assert node.spool.iter_all_files() == []


def test_sop_class_mismatch_with_context_is_refused(node_factory: Callable[..., Node], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    # storescu derives the context from the dataset; pynetdicom's raw file send lets the
    # file meta (MR) pick the context while the dataset says CT.
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    node = node_factory()
    src = mismatched_sop_class(tmp_path / "mismatch.dcm")
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(MR_IMAGE, "1.2.840.10008.1.2.1")
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = 10
    assoc = ae.associate("127.0.0.1", node.port, ae_title=AET)
    try:
        assert assoc.is_established
        status = assoc.send_c_store(src)
    finally:
        assoc.release()
    assert status.Status == 0xA900
    assert node.stored == [] and node.spool.iter_all_files() == []


def test_full_spool_answers_out_of_resources(node_factory: Callable[..., Node]) -> None:
    node = node_factory(min_free_bytes=1 << 62)
    res = storescu(node.port, get_testdata_file("MR_small.dcm"))
    assert res.returncode != 0
    assert "OutOfResources" in res.stderr  # 0xA700
    assert node.stored == [] and files_under(node.spool.root) == []


def test_oversized_instance_refused(node_factory: Callable[..., Node]) -> None:
    node = node_factory(max_instance_bytes=1000)
    res = storescu(node.port, get_testdata_file("MR_small.dcm"))
    assert "OutOfResources" in res.stderr and node.stored == []


def test_record_failure_is_not_success(node_factory: Callable[..., Node]) -> None:
    def broken(_: StoredInstance) -> None:
        raise RuntimeError("database is locked")

    node = node_factory(on_stored=broken)
    res = storescu(node.port, get_testdata_file("MR_small.dcm"))
    assert res.returncode != 0 and "OutOfResources" in res.stderr


def test_calling_ae_allow_list(node_factory: Callable[..., Node]) -> None:
    node = node_factory(allowed_calling_aets=["SCANNER"])
    res = storescu(node.port, get_testdata_file("MR_small.dcm"), aet="INTRUDER")
    assert res.returncode != 0
    assert "Calling AE Title Not Recognized" in res.stderr, res.stderr
    assert node.stored == [] and files_under(node.spool.root) == []
    ok = storescu(node.port, get_testdata_file("MR_small.dcm"), aet="SCANNER")
    assert ok.returncode == 0 and len(node.stored) == 1


def test_called_ae_must_match(node_factory: Callable[..., Node]) -> None:
    node = node_factory(require_called_aet=True)
    res = storescu(node.port, get_testdata_file("MR_small.dcm"), aec="SOMEONE_ELSE")
    assert res.returncode != 0
    assert "Called AE Title Not Recognized" in res.stderr, res.stderr
    assert node.stored == []
