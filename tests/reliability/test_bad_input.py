"""Bad-input corpus: every case has a defined outcome, the node keeps serving, nothing valid is lost.

Why: scanners, PACS forwards and misconfigured modalities send all kinds of wrong data.
The node must answer each with its defined DIMSE status or accept it and end the job in
a logged, audited refusal (job state + reason), answer C-ECHO afterwards, and still
process every valid series.  One in-process node serves the whole module (the corpus is
table-driven: one parametrized case per entry), with a folder destination so outputs
can be counted.

Outcomes:

* ``Status(code)``: every instance answered ``code`` (refusals with a log line; 0xC000
  and 0xA900 refusals are also quarantined, nothing received is dropped);
* ``Job(state, reason, outputs)``: accepted, the series' job ends ``state`` with
  ``reason`` in its reason and audit, and ``outputs`` derived files per recipe in the
  export folder;
* ``Rejected(why)``: the association is rejected (logged with the reason);
* ``NoContext(why)``: the association is accepted but the presentation context is
  refused, so nothing can be sent (logged).
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from rtcontrast.settings.node import NodeConfig
from rtcontrast.node.service import Node
from rtcontrast.settings.protocol import ProtocolConfig
from rtcontrast.core.inference import QMapModel
from tests.dicomgen import Geometry, make_series
from tests.reliability.helpers import LENIENT_QA, MODEL_PATH, echo, node_settings, phantom_volume, series, wait_for

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI", "ignore:The value length")

N_RECIPES = 1
MAX_INSTANCE_BYTES = 8_000_000
FINAL = {"delivered", "ineligible", "failed", "held"}


# ----------------------------------------------------------------------------- outcomes


@dataclass(frozen=True)
class Status:
    code: int
    log: str = ""
    quarantined: bool = False


@dataclass(frozen=True)
class Job:
    state: str
    reason: str = ""
    outputs: int = 0  # derived files per recipe


@dataclass(frozen=True)
class Rejected:
    why: str


@dataclass(frozen=True)
class NoContext:
    why: str


Outcome = Status | Job | Rejected | NoContext


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], list[Any]]  # datasets, or Paths of raw files to send as they are
    expect: Outcome
    ae_title: str = "SCANNER"
    abort: bool = False  # abort the association instead of releasing it
    contexts: tuple[tuple[str, str], ...] = ()  # (SOP class, transfer syntax) proposed instead of the default


# ----------------------------------------------------------------------------- builders


def base(name: str, n: int = 4, size: int = 64, **spec: Any) -> list[Dataset]:
    return series(f"bad-{name}", n=n, size=size, **spec)


def _set_pixels(ds: Dataset, arr: np.ndarray, bits: int) -> None:
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelData = np.ascontiguousarray(arr).tobytes()


def raw_files(dss: list[Dataset], d: Path, mutate: Callable[[bytes], bytes]) -> list[Path]:
    """Part 10 files whose bytes went through ``mutate`` (sent as they are)."""
    d.mkdir(parents=True, exist_ok=True)
    out = []
    for i, ds in enumerate(dss):
        p = d / f"{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        p.write_bytes(mutate(p.read_bytes()))
        out.append(p)
    return out


def each(dss: list[Dataset], fn: Callable[[Dataset], None]) -> list[Dataset]:
    for ds in dss:
        fn(ds)
    return dss


def eight_bit(d: Path) -> list[Dataset]:
    dss = base("8bit")
    for ds in dss:
        arr = ds.pixel_array.astype(np.float32)
        _set_pixels(ds, (arr * 255 / max(1.0, float(arr.max()))).astype(np.uint8), 8)
    return dss


def rgb(d: Path) -> list[Dataset]:
    dss = base("rgb")
    for ds in dss:
        g = (ds.pixel_array // 4).clip(0, 255).astype(np.uint8)
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        _set_pixels(ds, np.stack([g, g, g], axis=-1), 8)
    return dss


def signed(d: Path) -> list[Dataset]:
    vol = phantom_volume(4, 64, 7) - 50.0  # negative background: int16, PixelRepresentation 1
    return make_series(vol, te=90.0, tr=4000.0, uid_seed="bad-signed")


def mixed(name: str, fn: Callable[[Dataset], None]) -> Callable[[Path], list[Dataset]]:
    def build(d: Path) -> list[Dataset]:
        dss = base(name)
        fn(dss[-1])
        return dss
    return build


def tilt(ds: Dataset) -> None:
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]  # coronal slice in an axial stack


def resize(ds: Dataset) -> None:
    ds.Rows, ds.Columns = 32, 32
    ds.PixelData = np.zeros((32, 32), np.uint16).tobytes()


def duplicate_positions(d: Path) -> list[Dataset]:
    dss = base("duppos")
    dss[2].ImagePositionPatient = list(dss[1].ImagePositionPatient)
    return dss


def missing_pixels(d: Path) -> list[Dataset]:
    return each(base("nopixels"), lambda ds: delattr(ds, "PixelData"))


def short_pixels(d: Path) -> list[Dataset]:
    def cut(ds: Dataset) -> None:
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    return each(base("shortpixels"), cut)


def claims_huge(d: Path) -> list[Dataset]:
    def huge(ds: Dataset) -> None:
        ds.Rows, ds.Columns = 40000, 40000  # 3.2 GB of pixels claimed, 8 kB sent
    return each(base("hugeclaim"), huge)


def huge_length_field(d: Path) -> list[Path]:
    """Pixel Data's explicit length says ~4 GB; the stream ends after a few kB."""
    def mutate(b: bytes) -> bytes:
        tag = b"\xe0\x7f\x10\x00OW\x00\x00"
        i = b.rindex(tag)
        return b[: i + len(tag)] + struct.pack("<I", 0xFFFFFFF0) + b[i + len(tag) + 4:]
    return raw_files(base("hugelength"), d / "hugelength", mutate)


def truncated_header(d: Path) -> list[Path]:
    return raw_files(base("trunchdr", n=2), d / "trunchdr", lambda b: b[:300])


def truncated_pixels(d: Path) -> list[Path]:
    return raw_files(base("truncpix", n=2), d / "truncpix", lambda b: b[:-3000])


def bad_uid(name: str, keyword: str, value: str) -> Callable[[Path], list[Dataset]]:
    def build(d: Path) -> list[Dataset]:
        dss = base(name, n=2)
        for ds in dss:
            setattr(ds, keyword, value)
            if keyword == "SOPInstanceUID":
                ds.file_meta.MediaStorageSOPInstanceUID = value
        return dss
    return build


def sop_class_mismatch(d: Path) -> list[Path]:
    """File meta (and so the presentation context) says MR, the dataset itself says CT."""
    mr, ct = b"1.2.840.10008.5.1.4.1.1.4\x00", b"1.2.840.10008.5.1.4.1.1.2\x00"

    def mutate(b: bytes) -> bytes:
        i = b.rindex(mr)
        return b[:i] + ct + b[i + len(ct):]
    return raw_files(base("classmismatch", n=2), d / "classmismatch", mutate)


def oversize(d: Path) -> list[Dataset]:
    return base("oversize", n=1, size=2048)


def no_te(d: Path) -> list[Dataset]:
    return each(base("note"), lambda ds: delattr(ds, "EchoTime"))


def no_tr(d: Path) -> list[Dataset]:
    return each(base("notr"), lambda ds: delattr(ds, "RepetitionTime"))


CASES: list[Case] = [
    # -- refused at C-STORE (status), quarantined when the data itself is wrong
    # pydicom reads a dataset cut short up to where it ends: no SOP Class left -> 0xA900
    Case("truncated-header", truncated_header, Status(0xA900, "does not match the presentation context",
                                                      quarantined=True)),
    # the length field lies, the bytes that follow are exactly Rows x Columns: read as sent, no 4 GB allocation
    Case("huge-length-field", huge_length_field, Job("delivered", "", 4)),
    Case("truncated-pixels", truncated_pixels, Job("failed", "volume")),
    Case("uid-path-trick", bad_uid("uidpath", "SeriesInstanceUID", "1.2.3/../../../etc"),
         Status(0xA900, "not a valid DICOM UID", quarantined=True)),
    Case("uid-dotdot", bad_uid("uiddots", "StudyInstanceUID", ".."), Status(0xA900, "not a valid DICOM UID",
                                                                         quarantined=True)),
    Case("uid-over-64", bad_uid("uidlong", "SeriesInstanceUID", "1.2." + "3" * 70),
         Status(0xA900, "characters long", quarantined=True)),
    Case("uid-missing", bad_uid("uidmissing", "StudyInstanceUID", ""), Status(0xA900, "is missing",
                                                                           quarantined=True)),
    Case("sop-class-mismatch", sop_class_mismatch, Status(0xA900, "does not match the presentation context",
                                                          quarantined=True)),
    Case("oversize-instance", oversize, Status(0xA700, "exceeds the limit")),
    # -- refused at association
    Case("unknown-calling-ae", lambda d: base("intruder", n=1), Rejected("calling AE title 'INTRUDER' is not in the allow-list"),
         ae_title="INTRUDER"),
    Case("unknown-sop-class", lambda d: [], NoContext("1.2.840.10008.5.1.4.1.1.2"),
         contexts=((str(CTImageStorage), str(ExplicitVRLittleEndian)),)),
    Case("private-sop-class", lambda d: [], NoContext("1.2.3.4.5.6.7"),
         contexts=(("1.2.3.4.5.6.7", str(ExplicitVRLittleEndian)),)),
    Case("unknown-transfer-syntax", lambda d: [], NoContext(str(MRImageStorage)),
         contexts=((str(MRImageStorage), "1.2.3.4.5.6.7.8"),)),
    Case("lossy-transfer-syntax", lambda d: [], NoContext(str(MRImageStorage)),
         contexts=((str(MRImageStorage), str(JPEGBaseline8Bit)),)),
    # -- accepted, refused by the job with a reason
    Case("missing-pixel-data", missing_pixels, Job("failed", "volume")),
    Case("pixel-data-short", short_pixels, Job("failed", "volume")),
    Case("claims-huge-matrix", claims_huge, Job("failed", "volume")),
    Case("rgb", rgb, Job("failed", "volume")),
    Case("non-mr-modality", lambda d: each(base("ct"), lambda ds: setattr(ds, "Modality", "CT")),
         Job("ineligible", "Modality 'CT'")),
    Case("gradient-echo", lambda d: base("gre", scanning_sequence="GR"), Job("ineligible", "gradient echo")),
    Case("inversion-recovery", lambda d: base("ir", scanning_sequence="IR"), Job("ineligible", "inversion recovery")),
    Case("se-with-ir", lambda d: base("seir", scanning_sequence=["SE", "IR"]), Job("ineligible", "inversion recovery")),
    Case("te-missing", no_te, Job("ineligible", "TE missing")),
    Case("tr-missing", no_tr, Job("ineligible", "TR missing")),
    Case("te-out-of-range", lambda d: base("te300", te=300.0), Job("ineligible", "TE 300 ms outside")),
    Case("tr-out-of-range", lambda d: base("tr20000", tr=20000.0), Job("ineligible", "TR 20000 ms outside")),
    Case("te-zero", lambda d: base("te0", te=0.0), Job("ineligible", "TE 0 ms is not positive")),
    Case("mixed-orientations", mixed("mixori", tilt), Job("failed", "volume")),
    Case("mixed-matrix", mixed("mixmat", resize), Job("failed", "volume")),
    Case("duplicate-positions", duplicate_positions, Job("failed", "volume")),
    # an aborted association is never presented as a complete series (#15 finding 8): held, nothing sent
    Case("series-never-completes", lambda d: base("neverends", n=6)[:3], Job("held", "incomplete series", 0),
         abort=True),
    # -- valid but unusual: processed, nothing lost
    Case("valid-control", lambda d: base("control"), Job("delivered", "", 4)),
    Case("one-slice", lambda d: base("oneslice", n=1), Job("delivered", "", 1)),
    Case("eight-bit", eight_bit, Job("delivered", "", 4)),
    Case("signed-pixels", signed, Job("delivered", "", 4)),
    Case("matrix-64", lambda d: base("m64", n=3, size=64), Job("delivered", "", 3)),
    Case("matrix-1024", lambda d: base("m1024", n=2, size=1024), Job("delivered", "", 2)),
    Case("non-square", lambda d: make_series(np.full((3, 48, 80), 500, np.float32) + phantom_volume(3, 80)[:, 16:64],
                                             te=90.0, tr=4000.0, uid_seed="bad-nonsquare",
                                             geometry=Geometry(pixel_spacing=(1.0, 1.0))),
         Job("delivered", "", 3)),
    Case("rle-lossless", lambda d: base("rle", transfer_syntax=RLELossless), Job("delivered", "", 4)),
]


# ----------------------------------------------------------------------------- the node


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("badinput")
    settings = node_settings(root / "var", series_idle_timeout_s=2.0, release_grace_s=0.2,
                             allowed_calling_aes=["SCANNER"],
                             limits={"min_free_disk_bytes": 0, "max_instance_bytes": MAX_INSTANCE_BYTES})
    protocol = {
        "version": "bad-input",
        "qa": LENIENT_QA,  # the malformed inputs are the subject, not QA (see helpers.LENIENT_QA)
        "destinations": {"out": {"folder": {"path": str(root / "export")}}},
        "recipes": [{"key": "T2w", "label": "T2w", "te_ms": 100, "tr_ms": 4000, "series_number": 901,
                     "destinations": ["out"]}],
    }
    n = Node(NodeConfig.model_validate(settings), ProtocolConfig.model_validate(protocol),
             model=QMapModel(MODEL_PATH, "cpu"))
    n.start()
    n.export_root = root / "export"  # type: ignore[attr-defined]
    try:
        yield n
    finally:
        n.stop(timeout_s=20)


# ----------------------------------------------------------------------------- sending


@dataclass
class Sent:
    established: bool
    statuses: list[int | None]
    error: str | None = None


def _send(port: int, case: Case, items: list[Any]) -> Sent:
    ae = AE(ae_title=case.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(Verification)  # so that the association itself is accepted
    if case.contexts:
        for sop, ts in case.contexts:
            ae.add_requested_context(sop, [ts])
    else:
        ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
        ae.add_requested_context(MRImageStorage, [RLELossless])
    assoc = ae.associate("127.0.0.1", port, ae_title="RTCONTRAST")
    if not assoc.is_established:
        return Sent(False, [])
    statuses: list[int | None] = []
    err = None
    try:
        if case.contexts:
            wanted = {sop for sop, _ in case.contexts}
            if not any(str(cx.abstract_syntax) in wanted for cx in assoc.accepted_contexts):
                err = "no presentation context accepted for " + ", ".join(sorted(wanted))
        old = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True  # raw files go out byte for byte
        try:
            for item in items:
                st = assoc.send_c_store(item)
                statuses.append(int(st.Status) if st is not None and "Status" in st else None)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = old
    finally:
        if case.abort:
            assoc.abort()
        else:
            assoc.release()
    return Sent(True, statuses, err)


def _series_uids(items: list[Any]) -> set[str]:
    out = set()
    for it in items:
        ds = it if isinstance(it, Dataset) else pydicom.dcmread(it, stop_before_pixels=True, force=True)
        out.add(str(ds.get("SeriesInstanceUID", "")))
    return out


# ----------------------------------------------------------------------------- the table


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, node: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    items = case.build(tmp_path)
    quarantine = node.spool.quarantine_dir
    q_before = len(list(quarantine.glob("*.dcm")))
    with caplog.at_level(logging.INFO):
        sent = _send(node.port, case, items)
        exp = case.expect
        if isinstance(exp, Rejected):
            assert not sent.established
            wait_for(lambda: exp.why in caplog.text, 5, "the rejection log line", interval=0.05)
        elif isinstance(exp, NoContext):
            assert sent.established and sent.error and "presentation context" in sent.error
            assert "refused presentation contexts" in caplog.text and exp.why in caplog.text
        elif isinstance(exp, Status):
            assert sent.statuses == [exp.code] * len(items), [hex(s) if s is not None else s for s in sent.statuses]
            assert f"status 0x{exp.code:04X}: " in caplog.text and exp.log in caplog.text
            if exp.quarantined:
                assert len(list(quarantine.glob("*.dcm"))) == q_before + len(items)
        else:
            assert sent.statuses == [0] * len(items), [hex(s) if s is not None else s for s in sent.statuses]
            (series_uid,) = _series_uids(items)

            def final() -> Any:
                jobs = node.jobs.jobs_for_series(str(items[0].StudyInstanceUID) if isinstance(items[0], Dataset)
                                                 else str(pydicom.dcmread(items[0], stop_before_pixels=True,
                                                                          force=True).StudyInstanceUID), series_uid)
                return jobs and jobs[-1].state in FINAL and jobs[-1]

            job = wait_for(final, 120, f"the job of case {case.name}", interval=0.1)
            assert job.state == exp.state, (job.state, job.reason)
            assert exp.reason in (job.reason or ""), job.reason
            if exp.state in ("ineligible", "failed"):
                audited = node.jobs_conn.execute(
                    "SELECT event, detail_json FROM audit WHERE job_id = ? AND event = ?", (job.id, exp.state)
                ).fetchall()
                assert audited and exp.reason in json.loads(audited[-1][1])["reason"]
                assert f"series {series_uid} {exp.state}: " in caplog.text
            outputs = [p for p in node.export_root.rglob("*.dcm")  # type: ignore[attr-defined]
                       if str(pydicom.dcmread(p, stop_before_pixels=True).ReferencedSeriesSequence[0]
                              .SeriesInstanceUID) == series_uid]
            assert len(outputs) == exp.outputs * N_RECIPES
    assert echo(node.port) == 0, "the node stopped answering C-ECHO"
    for phi in ("PHANTOM^TEST", "RTC-PHANTOM-001", "19700101"):
        assert phi not in caplog.text
