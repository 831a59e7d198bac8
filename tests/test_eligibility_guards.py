"""Eligibility guards of #15: loops (finding 7) and Enhanced MR recognised by its SOP class (finding 10)."""

from __future__ import annotations

import copy

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from rtcontrast.dicom.derive import NodeIdentity
from rtcontrast.dicom.eligibility import check_eligibility
from rtcontrast.settings.protocol import ProtocolConfig
from tests.support import phantom_series

OWN = NodeIdentity(manufacturer="rtcontrast", model_name="rtcontrast node", device_serial_number="RTC-0001",
                   uid_root="1.2.826.0.1.3680043.10.999.")


def _header() -> Dataset:
    return copy.deepcopy(phantom_series(n=1, size=16)[0])


def test_synthetic_input_is_ineligible_unless_allowed() -> None:
    ds = _header()
    assert check_eligibility(ds, ProtocolConfig(), own=OWN)[0]
    ds.SyntheticData = "YES"
    ok, why = check_eligibility(ds, ProtocolConfig(), own=OWN)
    assert not ok and "SyntheticData YES" in why and "loop" in why
    allowed = ProtocolConfig.model_validate({"match": {"exclude_synthetic": False}})
    assert check_eligibility(ds, allowed, own=OWN)[0]


@pytest.mark.parametrize("marks", [
    {"Manufacturer": "rtcontrast", "ManufacturerModelName": "rtcontrast node", "DeviceSerialNumber": "RTC-0001"},
    {"SeriesInstanceUID": "1.2.826.0.1.3680043.10.999.7.1"},
])
def test_own_output_without_synthetic_flag_is_ineligible(marks: dict[str, str]) -> None:
    """A PACS that drops SyntheticData still cannot loop the node's output back into it."""
    ds = _header()
    for k, v in marks.items():
        setattr(ds, k, v)
    ok, why = check_eligibility(ds, ProtocolConfig(), own=OWN)
    assert not ok and "exclude_own_output" in why, why
    off = ProtocolConfig.model_validate({"match": {"exclude_own_output": False}})
    assert check_eligibility(ds, off, own=OWN)[0]


def test_real_enhanced_mr_is_judged_by_echo_pulse_sequence() -> None:
    """pydicom-data emri_small.dcm (Enhanced MR, EchoPulseSequence GRADIENT) was refused for 'ScanningSequence missing'."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file("emri_small.dcm", download=False)
    if path is None:
        pytest.skip("pydicom-data (the test extra) is not installed")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ok, why = check_eligibility(ds, ProtocolConfig())
    assert not ok and "EchoPulseSequence 'GRADIENT'" in why, why
    # the same object as a spin-echo acquisition with its timing in the functional groups: eligible
    ds.EchoPulseSequence = "SPIN"
    echo, timing = Dataset(), Dataset()
    echo.EffectiveEchoTime = 95.0
    timing.RepetitionTime = 4000.0
    shared = Dataset()
    shared.MREchoSequence = Sequence([echo])
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ok, why = check_eligibility(ds, ProtocolConfig())
    assert ok and "TE 95 ms, TR 4000 ms" in why, why
