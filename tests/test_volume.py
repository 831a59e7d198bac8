"""Volume assembly: sorting, decoding, Enhanced MR split, and every rejection with its message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rtcontrast.dicom.volume import VolumeError, assemble, crop_to, pad_to_multiple
from tests.dicomgen import (
    ENHANCED_MR_IMAGE_STORAGE,
    DeflatedExplicitVRLittleEndian,
    Geometry,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    SeriesSpec,
    make_enhanced,
    make_series,
    phantom,
    write_series,
)


def _normal(ori: tuple[float, ...]) -> np.ndarray:
    o = np.asarray(ori)
    return np.cross(o[:3], o[3:])


def test_shuffled_oblique_series_is_sorted_along_normal(tmp_path: Path) -> None:
    vol = phantom(6, 20, 28)
    g = Geometry.oblique()
    paths = write_series(make_series(vol, geometry=g, te=95.0, tr=3500.0), tmp_path, shuffle=True, seed=3)
    v = assemble(paths)
    assert v.pixels.dtype == np.float32 and v.pixels.shape == (6, 20, 28)
    np.testing.assert_array_equal(v.pixels, vol)  # slice i of the generator = position i along the normal
    d = [float(np.dot(s.image_position, _normal(g.orientation))) for s in v.slices]
    assert d == sorted(d)
    assert v.slice_spacing == pytest.approx(2.5, abs=1e-4)
    np.testing.assert_allclose(v.orientation, g.orientation)
    np.testing.assert_allclose(v.pixel_spacing, g.pixel_spacing)
    assert (v.te_ms, v.tr_ms) == (95.0, 3500.0)
    assert [s.header.InstanceNumber for s in v.slices] == [1, 2, 3, 4, 5, 6]
    assert all("PixelData" not in s.header for s in v.slices)
    assert all(s.frame_number is None for s in v.slices)
    assert v.first_header.PatientID == "RTC-PHANTOM-001"
    assert v.study_uid == v.first_header.StudyInstanceUID
    assert v.frame_of_reference_uid == v.first_header.FrameOfReferenceUID


def test_descending_stack_sorted_ascending(tmp_path: Path) -> None:
    g = Geometry(slice_spacing=-4.0)  # the scanner acquired "feet first"
    vol = phantom(4)
    v = assemble(write_series(make_series(vol, geometry=g), tmp_path))
    np.testing.assert_array_equal(v.pixels, vol[::-1])
    assert v.slice_spacing == pytest.approx(4.0)


def test_single_slice_and_non_square(tmp_path: Path) -> None:
    vol = phantom(1, 17, 40)
    v = assemble(write_series(make_series(vol), tmp_path))
    assert v.pixels.shape == (1, 17, 40)
    assert v.slice_spacing is None
    np.testing.assert_array_equal(v.pixels, vol)


def test_modality_lut_applied(tmp_path: Path) -> None:
    vol = np.round(phantom(3) * 2) - 100  # even offsets: exact with slope 2
    v = assemble(write_series(make_series(vol, rescale=(2.0, -100.0)), tmp_path))
    np.testing.assert_allclose(v.pixels, vol)


@pytest.mark.parametrize(
    "ts",
    [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless, JPEGLSLossless, JPEG2000Lossless],
)
def test_transfer_syntaxes_decode(tmp_path: Path, ts: str) -> None:
    vol = phantom(2, 64, 48)  # JPEG 2000 encoder needs >= 32 px per side
    v = assemble(write_series(make_series(vol, transfer_syntax=ts), tmp_path))
    np.testing.assert_array_equal(v.pixels, vol)


@pytest.mark.parametrize("timing_per_frame", [False, True])
def test_enhanced_mr_split_into_frames(tmp_path: Path, timing_per_frame: bool) -> None:
    vol = phantom(5, 16, 24)
    order = [3, 0, 4, 1, 2]
    ds = make_enhanced(vol, geometry=Geometry.oblique(), te=12.0, tr=600.0, frame_order=order,
                       timing_per_frame=timing_per_frame)
    v = assemble(write_series([ds], tmp_path))
    np.testing.assert_array_equal(v.pixels, vol)
    # slice i was stored as frame order.index(i) + 1
    assert [s.frame_number for s in v.slices] == [order.index(i) + 1 for i in range(5)]
    assert {s.sop_class_uid for s in v.slices} == {ENHANCED_MR_IMAGE_STORAGE}
    assert (v.te_ms, v.tr_ms) == (12.0, 600.0)
    for s in v.slices:  # each frame's header holds that frame's geometry
        h = s.header
        assert float(h.EchoTime) == 12.0 and float(h.SliceThickness) == 2.0
        np.testing.assert_allclose([float(x) for x in h.ImagePositionPatient], s.image_position)
        assert "PerFrameFunctionalGroupsSequence" not in h and "PixelData" not in h
    positions = [tuple(s.header.ImagePositionPatient) for s in v.slices]
    assert len(set(positions)) == 5
    assert v.slice_spacing == pytest.approx(2.5, abs=1e-4)


def test_enhanced_mr_rescale_from_functional_groups(tmp_path: Path) -> None:
    vol = np.round(phantom(3) * 4)  # multiples of 4: exact with slope 4
    ds = make_enhanced(vol, rescale=(4.0, 0.0))
    v = assemble(write_series([ds], tmp_path))
    np.testing.assert_allclose(v.pixels, vol)


def test_resent_instance_is_used_once(tmp_path: Path) -> None:
    dss = make_series(phantom(3))
    paths = write_series([*dss, dss[1]], tmp_path)
    assert assemble(paths).pixels.shape[0] == 3


# ------------------------------------------------------------------ rejections


def _expect(paths: list[Path], *fragments: str) -> str:
    with pytest.raises(VolumeError) as info:
        assemble(paths)
    msg = str(info.value)
    for f in fragments:
        assert f in msg, msg
    return msg


def test_reject_mixed_orientation(tmp_path: Path) -> None:
    dss = make_series(phantom(4))
    dss[2].ImageOrientationPatient = [1, 0, 0, 0, 0.9999, 0.01414]
    _expect(write_series(dss, tmp_path), "mixed orientation", dss[2].SOPInstanceUID)


def test_orientation_within_tolerance_accepted(tmp_path: Path) -> None:
    dss = make_series(phantom(4))
    dss[2].ImageOrientationPatient = [1, 0, 0, 0, 1, 0.00005]
    assert assemble(write_series(dss, tmp_path)).pixels.shape[0] == 4


def test_reject_mixed_pixel_spacing(tmp_path: Path) -> None:
    dss = make_series(phantom(4))
    dss[1].PixelSpacing = [0.9, 0.85]
    _expect(write_series(dss, tmp_path), "mixed pixel spacing", "0.85")


def test_reject_mixed_matrix(tmp_path: Path) -> None:
    a = make_series(phantom(3, 24, 32))
    b = make_series(phantom(3, 24, 30))
    _expect(write_series([a[0], a[1], b[2]], tmp_path), "mixed matrix size", "24x32", "24x30")


def test_reject_duplicate_positions(tmp_path: Path) -> None:
    dss = make_series(phantom(4))
    dss[3].ImagePositionPatient = dss[1].ImagePositionPatient
    _expect(write_series(dss, tmp_path), "duplicate positions", dss[1].SOPInstanceUID, dss[3].SOPInstanceUID)


def test_reject_gap_in_slices(tmp_path: Path) -> None:
    dss = make_series(phantom(5))
    del dss[2]
    _expect(write_series(dss, tmp_path), "inconsistent slice spacing", "6.000 mm", "3.000 mm")


def test_small_spacing_jitter_accepted(tmp_path: Path) -> None:
    dss = make_series(phantom(4))
    p = [float(x) for x in dss[2].ImagePositionPatient]
    dss[2].ImagePositionPatient = [p[0], p[1], p[2] + 0.005]
    assert assemble(write_series(dss, tmp_path)).slice_spacing == pytest.approx(3.0, abs=1e-3)


@pytest.mark.parametrize("kw,label", [("EchoTime", "TE"), ("RepetitionTime", "TR")])
def test_reject_mixed_te_tr(tmp_path: Path, kw: str, label: str) -> None:
    dss = make_series(phantom(3))
    setattr(dss[2], kw, 123.0)
    _expect(write_series(dss, tmp_path), f"mixed {label}", "123.0 ms")


def test_reject_missing_pixel_data(tmp_path: Path) -> None:
    dss = make_series(phantom(3))
    del dss[1].PixelData
    _expect(write_series(dss, tmp_path), "missing pixel data", dss[1].SOPInstanceUID)


def test_reject_short_pixel_data(tmp_path: Path) -> None:
    dss = make_series(phantom(3, 24, 32))
    dss[0].PixelData = dss[0].PixelData[:1000]
    _expect(write_series(dss, tmp_path), "pixel data shorter than Rows*Columns", "1000 bytes", "need 1536")


def test_reject_rgb(tmp_path: Path) -> None:
    dss = make_series(phantom(2, 8, 8))
    ds = dss[0]
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = bytes(8 * 8 * 3)
    _expect(write_series(dss, tmp_path), "colour image", "SamplesPerPixel=3")


def test_reject_unparseable(tmp_path: Path) -> None:
    paths = write_series(make_series(phantom(2)), tmp_path)
    bad = tmp_path / "junk.dcm"
    bad.write_bytes(b"this is not DICOM at all" * 10)
    _expect([*paths, bad], "unparseable file", "junk.dcm")


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.parametrize("keep", [400, -500])
def test_reject_truncated_file(tmp_path: Path, keep: int) -> None:
    paths = write_series(make_series(phantom(2)), tmp_path)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[:keep])
    msg = _expect(paths, str(paths[1]))
    assert ("unparseable file" in msg) if keep > 0 else ("pixel data shorter" in msg), msg


def test_reject_two_series(tmp_path: Path) -> None:
    a = make_series(phantom(2), spec=SeriesSpec(series_number=3))
    b = make_series(phantom(2), spec=SeriesSpec(series_number=4))
    _expect(write_series([a[0], b[1]], tmp_path), "more than one series")


def test_reject_non_mr(tmp_path: Path) -> None:
    dss = make_series(phantom(2))
    dss[0].SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
    _expect(write_series(dss, tmp_path), "unsupported SOP class", "1.2.840.10008.5.1.4.1.1.2")


def test_reject_empty() -> None:
    _expect([], "no files")


def test_reject_enhanced_mixed_echo(tmp_path: Path) -> None:
    ds = make_enhanced(phantom(3), timing_per_frame=True)
    ds.PerFrameFunctionalGroupsSequence[1].MREchoSequence[0].EffectiveEchoTime = 30.0
    _expect(write_series([ds], tmp_path), "mixed TE", "frame 2")


# ------------------------------------------------------------------ padding


@pytest.mark.parametrize("shape,multiple,expect", [((3, 17, 40), 16, (3, 32, 48)), ((2, 32, 32), 16, (2, 32, 32)),
                                                   ((1, 5, 7), 1, (1, 5, 7))])
def test_pad_and_crop(shape: tuple[int, ...], multiple: int, expect: tuple[int, ...]) -> None:
    a = np.random.default_rng(0).random(shape).astype(np.float32)
    p, hw = pad_to_multiple(a, multiple)
    assert p.shape == expect and hw == shape[-2:]
    np.testing.assert_array_equal(p[..., : shape[1], : shape[2]], a)
    assert not p[..., shape[1]:, :].any() and not p[..., shape[2]:].any()
    np.testing.assert_array_equal(crop_to(p, hw), a)
