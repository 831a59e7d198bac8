"""Test inputs for the receive side: MR_small in every accepted transfer syntax, storescu
association profiles that propose exactly one transfer syntax, and deliberately broken
instances.

pydicom's test data has most syntaxes; the JPEG Lossless (process 14 and SV1) and
Deflate variants are made with dcmtk (dcmcjpeg, dcmconv) so they come from a real codec.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from tests.conftest import dcmtk

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"

# transfer syntax -> pydicom test file, or a dcmtk command making it from MR_small.dcm
_PYDICOM_FILES = {
    str(ExplicitVRLittleEndian): "MR_small.dcm",
    str(ImplicitVRLittleEndian): "MR_small_implicit.dcm",
    str(ExplicitVRBigEndian): "MR_small_bigendian.dcm",
    str(RLELossless): "MR_small_RLE.dcm",
    str(JPEG2000Lossless): "MR_small_jp2klossless.dcm",
    str(JPEGLSLossless): "MR_small_jpeg_ls_lossless.dcm",
}
_DCMTK_MADE = {
    str(DeflatedExplicitVRLittleEndian): ("dcmconv", ["+td"]),
    str(JPEGLossless): ("dcmcjpeg", ["+el"]),  # process 14, selection value 6 by default
    str(JPEGLosslessSV1): ("dcmcjpeg", ["+e1"]),
}
TRANSFER_SYNTAXES: list[str] = [*_PYDICOM_FILES, *_DCMTK_MADE]


def reference() -> pydicom.Dataset:
    """The uncompressed original every variant must decode to."""
    return pydicom.dcmread(get_testdata_file("MR_small.dcm"))


def mr_in_syntax(ts: str, workdir: Path) -> Path:
    """MR_small.dcm encoded in transfer syntax ``ts`` (checked)."""
    if ts in _PYDICOM_FILES:
        path = Path(get_testdata_file(_PYDICOM_FILES[ts]))
    else:
        tool, opts = _DCMTK_MADE[ts]
        path = workdir / f"mr_{ts}.dcm"
        subprocess.run(
            [dcmtk(tool), *opts, get_testdata_file("MR_small.dcm"), str(path)],
            check=True, capture_output=True, timeout=60,
        )
    got = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert got == ts, f"{path} is {got}, wanted {ts}"
    return path


def storescu_profile(workdir: Path, sop_class: str, ts: str) -> list[str]:
    """storescu options proposing exactly one presentation context: ``sop_class`` in ``ts``.

    With storescu's built-in proposals it may fall back to an uncompressed context; a
    configuration profile makes the negotiated syntax the one under test.
    """
    cfg = workdir / f"storescu_{sop_class}_{ts}.cfg"
    cfg.write_text(
        "[[TransferSyntaxes]]\n[TS]\nTransferSyntax1 = " + ts + "\n"
        "[[PresentationContexts]]\n[PC]\nPresentationContext1 = " + sop_class + "\\TS\n"
        "[[Profiles]]\n[ONE]\nPresentationContexts = PC\n"
    )
    return ["-xf", str(cfg), "ONE"]


def relabelled(src: Path | str, dst: Path, **attrs: str) -> Path:
    """A copy of ``src`` with dataset attributes replaced (file meta kept consistent)."""
    ds = pydicom.dcmread(src)
    for key, value in attrs.items():
        setattr(ds, key, value)
    if "SOPClassUID" in attrs:
        ds.file_meta.MediaStorageSOPClassUID = attrs["SOPClassUID"]
    if "SOPInstanceUID" in attrs:
        ds.file_meta.MediaStorageSOPInstanceUID = attrs["SOPInstanceUID"]
    ds.save_as(dst, enforce_file_format=True)
    return dst


def mismatched_sop_class(dst: Path) -> Path:
    """File meta says MR Image Storage, the dataset says CT Image Storage."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.SOPClassUID = CT_IMAGE
    ds.save_as(dst, enforce_file_format=True)  # pydicom syncs the meta to CT here
    raw = dst.read_bytes()
    ct, mr = (CT_IMAGE + "\0").encode(), (MR_IMAGE + "\0").encode()  # both 26 bytes padded
    at = raw.index(ct)  # the first occurrence is the file meta's
    assert at < raw.index(b"\x08\x00\x16\x00"), "expected the file meta copy first"
    dst.write_bytes(raw[:at] + mr + raw[at + len(ct):])
    check = pydicom.dcmread(dst, stop_before_pixels=True)
    assert (check.file_meta.MediaStorageSOPClassUID, check.SOPClassUID) == (MR_IMAGE, CT_IMAGE)
    return dst
