"""What DICOM says about the series' intensity scales (rtcontrast.dicom.grid.intensity_factors) and field strength:
Philips' private scale slope and a real-world value mapping give the gains; anything less gives none (physics then)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from rtcontrast.dicom.grid import (
    PHILIPS_SCALE_SLOPE,
    field_strength_t,
    intensity_factors,
)
from rtcontrast.dicom.volume import assemble
from tests.dicomgen import write_series
from tests.support import phantom_series


def _volume(tmp: Path, name: str, number: int, edit) -> object:
    dss = phantom_series(n=2, size=32, uid_seed=name, series_number=number)
    for ds in dss:
        edit(ds)
    return assemble(write_series(dss, tmp / name))


def test_philips_scale_slope_in_every_series(tmp_path: Path) -> None:
    def philips(slope: float):
        def edit(ds: Dataset) -> None:
            ds.add_new((0x2005, 0x0010), "LO", "Philips MR Imaging DD 001")
            ds.add_new(PHILIPS_SCALE_SLOPE, "FL", slope)
        return edit

    a = _volume(tmp_path, "a", 1, philips(2.0))
    b = _volume(tmp_path, "b", 2, philips(0.5))
    f, src = intensity_factors([a, b])
    np.testing.assert_allclose(f, [2.0 * float(a.first_header.get("RescaleSlope", 1.0)),
                                   0.5 * float(b.first_header.get("RescaleSlope", 1.0))])
    assert "Philips" in src
    plain = _volume(tmp_path, "c", 3, lambda ds: None)
    assert intensity_factors([a, plain]) is None  # one series does not say: no DICOM gains
    assert field_strength_t(a) == 1.5


def test_real_world_value_mapping_with_one_unit(tmp_path: Path) -> None:
    def rwv(slope: float, unit: str = "1"):
        def edit(ds: Dataset) -> None:
            item = Dataset()
            item.RealWorldValueSlope = slope
            item.RealWorldValueIntercept = 0.0
            code = Dataset()
            code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = unit, "UCUM", unit
            item.MeasurementUnitsCodeSequence = [code]
            ds.RealWorldValueMappingSequence = [item]
        return edit

    a = _volume(tmp_path, "a", 1, rwv(0.25))
    b = _volume(tmp_path, "b", 2, rwv(1.0))
    f, src = intensity_factors([a, b])
    assert f[0] / f[1] == 4.0 and "real-world" in src
    c = _volume(tmp_path, "c", 3, rwv(1.0, unit="ms"))
    assert intensity_factors([a, c]) is None  # different units: not one physical scale
