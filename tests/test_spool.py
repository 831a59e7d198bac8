"""Spool: atomic Part 10 writes, raw bytes kept, UID checks, free-space guard, quarantine."""

from __future__ import annotations

import copy
import errno
import os
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from rtcontrast.node.receive.spool import InvalidUID, Spool, SpoolFull, UnreadableInstance, validate_uid


def mr(name: str = "MR_small.dcm") -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def test_store_dataset_layout_and_part10(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    ds = mr()
    path = spool.store(ds)
    assert path == tmp_path / "spool" / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert (back.pixel_array == ds.pixel_array).all()
    assert spool.iter_series_files(ds.StudyInstanceUID, ds.SeriesInstanceUID) == [path]
    assert spool.iter_all_files() == [path]
    assert not list(path.parent.glob(".*"))  # no temp files left


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm"])
def test_raw_bytes_and_paths_are_kept_bit_identical(tmp_path: Path, name: str) -> None:
    spool = Spool(tmp_path)
    raw = Path(get_testdata_file(name)).read_bytes()
    p1 = spool.store(raw)
    assert p1.read_bytes() == raw
    p2 = spool.store(Path(get_testdata_file(name)))  # streamed copy, a re-send: same path
    assert p2 == p1 and p2.read_bytes() == raw


@pytest.mark.parametrize(
    "bad",
    ["../../etc", "1.2/../../3", "/abs", "1.02.3", "", "1." + "2" * 70, "1.2.3\x00.4", "1.2.x"],
)
def test_invalid_uids_are_refused_and_nothing_written(tmp_path: Path, bad: str) -> None:
    spool = Spool(tmp_path / "spool")
    ds = mr()
    ds.SOPInstanceUID = bad
    with pytest.raises(InvalidUID):
        spool.store(ds)
    ds = mr()
    ds.SeriesInstanceUID = bad
    with pytest.raises(InvalidUID):
        spool.store(ds)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_validate_uid_messages() -> None:
    assert validate_uid("1.2.840.10008.1.2", "X") == "1.2.840.10008.1.2"
    with pytest.raises(InvalidUID, match="at most 64"):
        validate_uid("1." * 40 + "1", "SOPInstanceUID")
    with pytest.raises(InvalidUID, match="missing"):
        validate_uid(None, "StudyInstanceUID")


def test_free_space_guard(tmp_path: Path) -> None:
    spool = Spool(tmp_path, min_free_bytes=1 << 62)
    with pytest.raises(SpoolFull, match="below the guard"):
        spool.store(mr())
    assert spool.iter_all_files() == []


def test_not_part10_is_unreadable(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(UnreadableInstance):
        spool.store(b"garbage" * 50)


def test_quarantine_and_partial_cleanup(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    q = spool.quarantine(b"\x00not dicom", "cannot parse")
    assert q is not None and q.read_bytes() == b"\x00not dicom"
    assert q.with_suffix(".reason").read_text().strip() == "cannot parse"
    ds = mr()
    path = spool.store(copy.deepcopy(ds))
    leftover = path.parent / ".half-written.tmp"
    leftover.write_bytes(b"x")
    assert spool.remove_partial() == 1 and not leftover.exists() and path.exists()


def test_disk_full_during_write_is_spoolfull_and_leaves_no_temp(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path)
    ds = mr()
    spool.series_dir(ds.StudyInstanceUID, ds.SeriesInstanceUID).mkdir(parents=True)

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(SpoolFull, match="No space"):
        spool.store(ds)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
