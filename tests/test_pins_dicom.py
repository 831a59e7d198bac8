"""Pins on the DICOM side of a planner's image: one frame of reference and one study per
volume, each derived pixel slice at its source slice's position, the display window, and the
units of the classic and Parametric Map objects (PD's units round trip: the input re-rendered
from the maps read back from their DICOM files).  Each test names the mutation it guards
(issue #17).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from rtcontrast.core.inference import QMapModel
from rtcontrast.core.physics import signal
from rtcontrast.dicom import uids
from rtcontrast.dicom.derive import ModelIdentity, NodeIdentity, RecipeInfo, Window, derive_contrast_series, save_all
from rtcontrast.dicom.map_series import derive_map_images, derive_parametric_maps
from rtcontrast.dicom.volume import Volume, VolumeError, assemble
from rtcontrast.node.stream import classic_slab
from tests.dicomgen import Geometry, make_series, phantom, write_series
from tests.support import phantom_series

NODE = NodeIdentity(model_name="rtcontrast test node", software_versions="9.9", device_serial_number="N-1")
MODEL = ModelIdentity(name="qmap-unet", version="1.2.0", sha256="0123456789abcdef" * 4)
NOW = dt.datetime(2024, 5, 6, 7, 8, 9)


# ----------------------------------------------------------------------------- volume


@pytest.mark.parametrize("keyword", ["FrameOfReferenceUID", "StudyInstanceUID"])
def test_one_slice_in_another_frame_of_reference_or_study_is_refused(tmp_path: Path, keyword: str) -> None:
    """Guards: the mixed FrameOfReferenceUID (and StudyInstanceUID) check of volume assembly.
    A slice from another frame of reference is not in this volume's coordinates: maps built
    over it and sent with the series' frame of reference would be misplaced in the TPS."""
    dss = make_series(phantom(4))
    other = generate_uid()
    setattr(dss[2], keyword, other)
    with pytest.raises(VolumeError, match=f"mixed {keyword}") as info:
        assemble(write_series(dss, tmp_path))
    assert other in str(info.value) and dss[2].SOPInstanceUID in str(info.value)


def test_frame_of_reference_and_study_carried_to_the_volume(tmp_path: Path) -> None:
    """Guards: the volume's frame of reference/study (which derived series inherit) taken from
    the wrong place or left empty."""
    dss = make_series(phantom(3))
    v = assemble(write_series(dss, tmp_path, shuffle=True))
    assert v.frame_of_reference_uid == dss[0].FrameOfReferenceUID != ""
    assert v.study_uid == dss[0].StudyInstanceUID


# ----------------------------------------------------------------------------- contrast series


@pytest.fixture
def oblique(tmp_path: Path) -> Volume:
    return assemble(write_series(make_series(phantom(5, 24, 40), geometry=Geometry.oblique()), tmp_path / "src",
                                 shuffle=True))


def test_each_derived_slice_sits_at_its_source_position(oblique: Volume) -> None:
    """Guards: slice order in derivation (pixels of slice i written with slice j's position or
    source reference): the TPS would show the right contrast at the wrong place."""
    rng = np.random.default_rng(0)
    u16 = rng.integers(0, 4000, oblique.pixels.shape).astype(np.uint16)
    recipe = RecipeInfo(key="t1w", te_ms=15.0, tr_ms=500.0, series_number=902, series_description="SYNTH T1w")
    out = derive_contrast_series(oblique, u16, recipe, NODE, MODEL, Window(1234.5, 2222.0), now=NOW)
    assert len(out) == len(oblique.slices)
    for ds in out:
        (i,) = [k for k, s in enumerate(oblique.slices) if s.sop_instance_uid == ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_allclose([float(x) for x in ds.ImagePositionPatient], oblique.slices[i].image_position, atol=1e-4)
        np.testing.assert_array_equal(ds.pixel_array, u16[i])
        assert (float(ds.EchoTime), float(ds.RepetitionTime)) == (15.0, 500.0)
        assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (1234.5, 2222.0)


# ----------------------------------------------------------------------------- map units


@pytest.fixture(scope="module")
def predicted(tmp_path_factory: pytest.TempPathFactory, model: QMapModel) -> tuple[Volume, object]:
    src = phantom_series(n=4, size=64, uid_seed="pins-dicom")
    v = assemble(write_series(src, tmp_path_factory.mktemp("src")))
    return v, model.predict(v.pixels, 90.0, 4000.0)


def _back(dss: list[pydicom.Dataset], directory: Path, v: Volume) -> np.ndarray:
    """Read the files back and stack their pixels in the volume's slice order (by position)."""
    out = np.zeros(v.pixels.shape, np.float64)
    for p in save_all(dss, directory):
        ds = pydicom.dcmread(p)
        (i,) = [k for k, s in enumerate(v.slices) if np.allclose(s.image_position, [float(x) for x in ds.ImagePositionPatient])]
        out[i] = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    return out


def _nrmse(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b)[mask] ** 2)) / (b[mask].max() - b[mask].min()))


def test_classic_maps_round_trip_the_input(predicted: tuple[Volume, object], tmp_path: Path) -> None:
    """Guards: PD/T1/T2 units of the classic map images (T in whole ms, PD = round(1000 * PD / s)
    with s the contract's series scale) and PD's un-scaling.  Read back from DICOM and
    re-rendered at the input's TE/TR with s computed here by hand, they give the input."""
    v, maps = predicted
    back = {q: _back(derive_map_images(v, classic_slab(maps, q, 0, v.pixels.shape[0], None), q, 980 + k, NODE, MODEL, now=NOW), tmp_path / q, v)
            for k, q in enumerate(("PD", "T1", "T2"))}
    s = float(np.percentile(v.pixels[v.pixels > 0], 99.0))
    body = v.pixels > 0.05 * s
    again = signal(back["PD"] / 1000.0 * s, 90.0, 4000.0, back["T1"], back["T2"])
    assert _nrmse(again, v.pixels.astype(np.float64), body) < 0.02
    np.testing.assert_allclose(back["T2"], np.clip(np.rint(maps.t2), 0, 65535), atol=0.5)  # whole ms
    assert 0.3 < float(np.median(back["PD"][body])) / 1000.0 < 5.0  # relative PD (S/s over E), not stored units


def test_parametric_maps_round_trip_the_input(predicted: tuple[Volume, object], tmp_path: Path) -> None:
    """Guards: Parametric Map values and units (float32, identity real-world mapping, UCUM ms
    for T1/T2 and "1" for PD, PD relative to s): read back, they re-render the input."""
    v, maps = predicted
    values = {"T1": maps.t1, "T2": maps.t2, "PD": maps.pd / np.float32(maps.scale)}
    pms = derive_parametric_maps(v, values, NODE, MODEL, {"T1": 991, "T2": 992, "PD": 990}, now=NOW)
    read: dict[str, np.ndarray] = {}
    for q, path in zip(values, save_all(pms, tmp_path)):
        ds = pydicom.dcmread(path)
        rw = ds.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        assert rw.MeasurementUnitsCodeSequence[0].CodeValue == ("1" if q == "PD" else "ms")
        assert (float(rw.RealWorldValueSlope), float(rw.RealWorldValueIntercept)) == (1.0, 0.0)
        frames = ds.pixel_array.astype(np.float64) * float(rw.RealWorldValueSlope) + float(rw.RealWorldValueIntercept)
        order = [next(k for k, s in enumerate(v.slices)
                      if np.allclose(s.image_position, [float(x) for x in f.PlanePositionSequence[0].ImagePositionPatient]))
                 for f in ds.PerFrameFunctionalGroupsSequence]
        vol = np.zeros(v.pixels.shape)
        vol[order] = frames
        read[q] = vol
    s = float(np.percentile(v.pixels[v.pixels > 0], 99.0))
    body = v.pixels > 0.05 * s
    again = signal(read["PD"] * s, 90.0, 4000.0, read["T1"], read["T2"])
    assert _nrmse(again, v.pixels.astype(np.float64), body) < 0.02


# ----------------------------------------------------------------------------- UIDs


def test_derived_uids_differ_per_recipe_model_and_source_and_are_stable() -> None:
    """Guards: a derived UID that does not depend on the recipe, the model version or the
    source (two different images under one UID: the TPS silently keeps one of them)."""
    root = "1.2.826.0.1.3680043.10.999"
    base = uids.series_uid(root, "1.2.3", "t2w", "1.0")
    assert base == uids.series_uid(root, "1.2.3", "t2w", "1.0")
    others = {uids.series_uid(root, "1.2.3", "t1w", "1.0"), uids.series_uid(root, "1.2.3", "t2w", "1.1"),
              uids.series_uid(root, "1.2.4", "t2w", "1.0")}
    assert base not in others and len(others) == 3
    i1 = uids.instance_uid(root, "1.2.3", None, "t2w", "1.0")
    assert i1 == uids.instance_uid(root, "1.2.3", None, "t2w", "1.0") and i1 != base
    frames = {uids.instance_uid(root, "1.2.3", k, "t2w", "1.0") for k in (1, 2)}
    assert len(frames) == 2 and i1 not in frames  # each frame of an Enhanced MR source its own image
    assert i1 != uids.instance_uid(root, "1.2.4", None, "t2w", "1.0")
    assert i1 != uids.instance_uid(root, "1.2.3", None, "t1w", "1.0")
    assert i1 != uids.instance_uid(root, "1.2.3", None, "t2w", "1.1")
    for u in {base, i1} | others:
        assert u.startswith(root + ".") and len(u) <= 64 and pydicom.uid.UID(u).is_valid


def test_uid_root_length_limit_is_54_with_the_dot() -> None:
    """Guards: the root length check (a root leaving no room for the suffix gives UIDs over 64
    characters, which a TPS refuses)."""
    ok = "1.2.826.0.1.3680043.10." + "1" * 30  # 53 characters, 54 with the dot added
    assert len(ok) == 53
    u = uids.series_uid(ok, "1.2.3", "t2w", "1.0")
    assert u.startswith(ok + ".") and len(u) <= 64
    with pytest.raises(uids.UIDRootError, match="longer than 54"):
        uids.series_uid(ok + "1", "1.2.3", "t2w", "1.0")
    assert uids.series_uid(ok + ".", "1.2.3", "t2w", "1.0") == u  # a trailing dot is the same root


def _value_range(rw: pydicom.Dataset) -> tuple[float, float]:
    """First/last value mapped (the float form for float pixel data, else the integer form)."""
    if "DoubleFloatRealWorldValueFirstValueMapped" in rw:
        return float(rw.DoubleFloatRealWorldValueFirstValueMapped), float(rw.DoubleFloatRealWorldValueLastValueMapped)
    return float(rw.RealWorldValueFirstValueMapped), float(rw.RealWorldValueLastValueMapped)


def test_parametric_map_header_pins(oblique: Volume) -> None:
    """Guards the Parametric Map header a TPS or PACS files it by: deterministic UIDs per
    (source series, quantity, model), slice spacing and thickness, real-world value range and
    units, labels, window, and the synthesizing equipment (no patient data beyond the source's)."""
    root = "1.2.826.0.1.3680043.10.999"
    node = NodeIdentity(model_name="rtcontrast test node", software_versions="9.9", device_serial_number="N-1",
                        station_name="RTC-ST", uid_root=root)
    t1 = np.linspace(100.0, 3000.0, oblique.pixels.size, dtype=np.float32).reshape(oblique.pixels.shape)
    flat = np.full(oblique.pixels.shape, 0.8, np.float32)
    [pm, pd] = derive_parametric_maps(oblique, {"T1": t1, "PD": flat}, node, MODEL, {"T1": 991, "PD": 990}, now=NOW)
    assert pm.SOPInstanceUID == uids.instance_uid(root, oblique.series_uid, None, "pmap-T1", MODEL.version)
    assert pm.SeriesInstanceUID == uids.series_uid(root, oblique.series_uid, "pmap-T1", MODEL.version)
    assert (pm.SeriesNumber, pm.InstanceNumber, pm.SeriesDescription) == (991, 1, "SYNTH T1 parametric map")
    assert (pm.ContentLabel, pm.ContentDescription) == ("T1MAP", "T1 map, qmap-unet 1.2.0")
    assert (pm.StationName, pm.DeviceSerialNumber, pm.ManufacturerModelName) == ("RTC-ST", "N-1", "rtcontrast test node")
    measures = pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SpacingBetweenSlices) == pytest.approx(oblique.slice_spacing)
    assert float(measures.SliceThickness) == pytest.approx(float(oblique.slices[0].slice_thickness))
    rw = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert _value_range(rw) == pytest.approx((100.0, 3000.0))
    assert rw.LUTLabel == "T1MAP" and rw.LUTExplanation == "T1 (millisecond)"
    assert (float(rw.RealWorldValueSlope), float(rw.RealWorldValueIntercept)) == (1.0, 0.0)
    voi = pm.SharedFunctionalGroupsSequence[0].FrameVOILUTSequence[0]
    lo, hi = np.percentile(t1[t1 > 0], [1.0, 99.0])  # maps: 1st..99th percentile
    assert float(voi.WindowWidth) == pytest.approx(hi - lo, rel=1e-4) and float(voi.WindowCenter) == pytest.approx((lo + hi) / 2, rel=1e-4)
    from pydicom.sr.codedict import codes

    synth = [e for e in pm.ContributingEquipmentSequence
             if e.PurposeOfReferenceCodeSequence[0].CodeValue == codes.DCM.SynthesizingEquipment.value]
    assert len(synth) == 1 and synth[0].StationName == "RTC-ST" and synth[0].DeviceSerialNumber == "N-1"
    assert synth[0].ContributionDescription == "T1 map qmap-unet 1.2.0"
    # a constant map still gets a valid (non-empty) value range
    rw_pd = pd.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert _value_range(rw_pd) == pytest.approx((0.8, 1.8))
    assert rw_pd.MeasurementUnitsCodeSequence[0].CodeValue == "1"
