"""Fusion geometry: same-grid detection and resampling onto the target grid (exact on linear fields)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rtcontrast.dicom.grid import Candidate, align, choose_target, resample_to, same_grid
from rtcontrast.dicom.volume import Volume, assemble
from tests.dicomgen import Geometry, make_series, write_series


def _linear_field(geom: Geometry, n: int, h: int, w: int) -> np.ndarray:
    """f(patient x, y, z) = 100 + 2x + 3y + 5z sampled at the voxel centres of ``geom``."""
    o = np.asarray(geom.orientation, float)
    row_dir, col_dir = o[:3], o[3:]
    out = np.empty((n, h, w), np.float32)
    for k in range(n):
        p0 = np.asarray(geom.position(k))
        rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        pts = p0 + rr[..., None] * col_dir * geom.pixel_spacing[0] + cc[..., None] * row_dir * geom.pixel_spacing[1]
        out[k] = 1000 + 2 * pts[..., 0] + 3 * pts[..., 1] + 5 * pts[..., 2]
    return out


def _volume(tmp: Path, name: str, geom: Geometry, n: int, h: int, w: int, te: float, tr: float, seed: str) -> Volume:
    vol = _linear_field(geom, n, h, w)
    dss = make_series(vol, te=te, tr=tr, geometry=geom, uid_seed=seed, series_number=1 if te < 50 else 2)
    for ds in dss:  # one frame of reference for both series
        ds.FrameOfReferenceUID = "2.25.1234567"
        ds.StudyInstanceUID = "2.25.7654321"
    return assemble(write_series(dss, tmp / name))


def test_same_grid_is_used_as_is(tmp_path: Path) -> None:
    g = Geometry(pixel_spacing=(2.0, 2.0), origin=(-30.0, -30.0, 0.0), slice_spacing=4.0)
    a = _volume(tmp_path, "a", g, 4, 24, 24, 10, 500, "s1")
    b = _volume(tmp_path, "b", g, 4, 24, 24, 90, 4000, "s2")
    ok, _ = same_grid(a, b)
    assert ok
    al, why = align(a, b, allow_resample=False)
    assert al is not None and not al.resampled and al.pixels is b.pixels and al.valid is None


def test_resampling_is_exact_on_linear_fields(tmp_path: Path) -> None:
    ga = Geometry(pixel_spacing=(2.0, 2.0), origin=(-30.0, -30.0, 0.0), slice_spacing=4.0)
    # partner: finer, shifted grid covering the target
    gb = Geometry(pixel_spacing=(1.5, 1.25), origin=(-36.0, -35.0, -2.0), slice_spacing=3.0)
    a = _volume(tmp_path, "a", ga, 4, 24, 24, 10, 500, "s1")
    b = _volume(tmp_path, "b", gb, 8, 60, 64, 90, 4000, "s2")
    ok, why = same_grid(a, b)
    assert not ok and "matrix" in why
    assert align(a, b, allow_resample=False)[0] is None
    al, why = align(a, b, allow_resample=True)
    assert al is not None and al.resampled and "resampled" in why
    np.testing.assert_allclose(al.pixels, a.pixels, rtol=0, atol=0.51)  # stored values are rounded to integers


def test_outside_partner_field_of_view_is_zero(tmp_path: Path) -> None:
    ga = Geometry(pixel_spacing=(2.0, 2.0), origin=(-30.0, -30.0, 0.0), slice_spacing=4.0)
    gb = Geometry(pixel_spacing=(2.0, 2.0), origin=(0.0, -30.0, 0.0), slice_spacing=4.0)  # covers x >= 0 only
    a = _volume(tmp_path, "a", ga, 3, 24, 24, 10, 500, "s1")
    b = _volume(tmp_path, "b", gb, 3, 24, 24, 90, 4000, "s2")
    out = resample_to(a, b)
    assert (out[:, :, :14] == 0).all()  # columns left of x=0 (with the interpolation margin)
    np.testing.assert_allclose(out[:, :, 16:], a.pixels[:, :, 16:], rtol=0, atol=0.51)  # stored values are rounded to integers
    # the aligned partner says which voxels are measurements: exactly the columns x >= 0 (index 15 on)
    al, _ = align(a, b, allow_resample=True)
    assert al is not None and al.valid is not None
    assert not al.valid[:, :, :15].any() and al.valid[:, :, 15:].all()
    np.testing.assert_allclose(al.pixels[al.valid], a.pixels[al.valid], rtol=0, atol=0.51)


def test_choose_target_rules_agree_whichever_job_asks() -> None:
    t1w = Candidate("1.2.3.1", 10.0, 500.0, 6.0)
    t2w = Candidate("1.2.3.2", 100.0, 4000.0, 8.0)
    pdw = Candidate("1.2.3.3", 15.0, 4000.0, 8.0)
    for group in ([t1w, t2w, pdw], [pdw, t2w, t1w], [t2w, t1w]):
        assert choose_target(group, "t2w") == "1.2.3.2"
        assert choose_target(group, "t1w") == "1.2.3.1"
        assert choose_target(group, "finest") == "1.2.3.1"
        assert choose_target(group, "each") is None
    # full tie: the smaller UID, whatever the order
    a, b = Candidate("1.9", 90.0, 4000.0, 8.0), Candidate("1.10", 90.0, 4000.0, 8.0)
    assert choose_target([a, b], "t2w") == choose_target([b, a], "t2w") == "1.10"
    with pytest.raises(ValueError, match="unknown fusion target rule 'largest'"):
        choose_target([a], "largest")
