"""PatientName bytes that are invalid in the declared character set reach the TPS unchanged (#15 finding 10).

Before: a Latin-1 PatientName under ``SpecificCharacterSet ISO_IR 192`` was decoded with
replacement characters and re-encoded, so the derived series carried a different name
than the acquisition.  A real node, dcmtk storescu, a folder destination; the bytes are
compared as stored.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataelem import DataElement

from tests.dicomgen import write_series
from tests.support import LENIENT_QA, phantom_series, storescu, wait_for

pytestmark = pytest.mark.network
RAW_NAME = b"M\xfcller^J\xf6rg"  # Latin-1, not valid UTF-8


def test_invalid_utf8_patient_name_is_kept_byte_for_byte(make_node: Any, tmp_path: Path) -> None:
    export = tmp_path / "export"
    node = make_node({"destinations": {"out": {"folder": {"path": str(export)}}},
                      "recipes": [{"key": "T2w", "label": "T2w", "te_ms": 100, "tr_ms": 4000, "series_number": 901,
                                   "destinations": ["out"]}], "qa": LENIENT_QA})
    paths = write_series(phantom_series(n=2, size=16, uid_seed="charset"), tmp_path / "in")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in paths:
            ds = pydicom.dcmread(p)
            ds.SpecificCharacterSet = "ISO_IR 192"
            ds["PatientName"] = DataElement(0x00100010, "PN", RAW_NAME)
            ds.save_as(p)
    assert storescu(node.port, paths).returncode == 0
    out = wait_for(lambda: sorted(export.rglob("*.dcm")) if len(list(export.rglob("*.dcm"))) == 2 else None, 120,
                   "the derived series")
    for p in out:
        ds = pydicom.dcmread(p)
        assert ds.get_item(0x00100010).value.rstrip(b" ") == RAW_NAME
        assert ds.SpecificCharacterSet == "ISO_IR 192"
