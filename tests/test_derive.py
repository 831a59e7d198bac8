"""Derived DICOM: deterministic UIDs, unchanged geometry, lineage, dciodvfy-clean objects."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from rtcontrast.dicom import uids
from rtcontrast.dicom.derive import PD_SCALE, DeriveError, ModelIdentity, NodeIdentity, RecipeInfo, Window, derive_contrast_series, save_all
from rtcontrast.dicom.map_series import derive_map_images, derive_parametric_maps, map_to_u16
from rtcontrast.dicom.volume import Volume, assemble
from tests.dicomgen import Geometry, make_enhanced, make_series, phantom, write_series
from tests.support import dciodvfy_errors

NODE = NodeIdentity(model_name="rtcontrast test node", software_versions="9.9", device_serial_number="N-1")
MODEL = ModelIdentity(name="qmap-unet", version="1.2.0", sha256="0123456789abcdef" * 4)
RECIPE = RecipeInfo(key="t2w-100-4500", te_ms=100.0, tr_ms=4500.0, series_number=901,
                    series_description="SYNTH T2w TE100 TR4500")
NOW = dt.datetime(2024, 5, 6, 7, 8, 9)


@pytest.fixture
def volume(tmp_path: Path) -> Volume:
    vol = phantom(5, 24, 40)
    return assemble(write_series(make_series(vol, geometry=Geometry.oblique()), tmp_path / "src", shuffle=True))


@pytest.fixture
def enhanced_volume(tmp_path: Path) -> Volume:
    ds = make_enhanced(phantom(4, 20, 24), geometry=Geometry.oblique(), frame_order=[2, 0, 3, 1])
    return assemble(write_series([ds], tmp_path / "enh"))


def _u16(v: Volume) -> np.ndarray:
    return np.clip(v.pixels, 0, 65535).astype(np.uint16)


def _derive(v: Volume, recipe: RecipeInfo = RECIPE, model: ModelIdentity = MODEL,
            node: NodeIdentity = NODE) -> list[pydicom.Dataset]:
    return derive_contrast_series(v, _u16(v), recipe, node, model, Window(600, 1200), now=NOW)


# ------------------------------------------------------------------ UIDs


def test_uids_deterministic_and_distinct() -> None:
    a = uids.series_uid(None, "1.2.3", "t2w", "1.0")
    assert a == uids.series_uid(None, "1.2.3", "t2w", "1.0")
    assert a.startswith("2.25.") and len(a) <= 64 and pydicom.uid.UID(a).is_valid
    assert a != uids.series_uid(None, "1.2.3", "t1w", "1.0")
    assert a != uids.series_uid(None, "1.2.3", "t2w", "1.1")
    assert uids.instance_uid(None, "1.2.3.4", None, "k", "1") != uids.instance_uid(None, "1.2.3.4", 1, "k", "1")
    assert uids.derived_uid(None, "a", "bc") != uids.derived_uid(None, "ab", "c")
    site = uids.derived_uid("1.2.999.77", "x")
    assert site.startswith("1.2.999.77.") and site == uids.derived_uid("1.2.999.77.", "x")
    assert pydicom.uid.UID(site).is_valid


@pytest.mark.parametrize("root", ["1.2.826.0.1.3680043.8.498", "1.2.826.0.1.3680043.10.511.3."])
def test_example_roots_refused(root: str) -> None:
    with pytest.raises(uids.UIDRootError, match="example root"):
        uids.derived_uid(root, "x")


def test_derived_uids_deterministic_per_recipe_and_model(volume: Volume) -> None:
    a, b = _derive(volume), _derive(volume)
    assert [d.SOPInstanceUID for d in a] == [d.SOPInstanceUID for d in b]
    assert a[0].SeriesInstanceUID == b[0].SeriesInstanceUID
    other_recipe = RecipeInfo("t1w", 10.0, 500.0, 902, "SYNTH T1w TE10 TR500")
    c = _derive(volume, recipe=other_recipe)
    d = _derive(volume, model=ModelIdentity("qmap-unet", "1.3.0", MODEL.sha256))
    for other in (c, d):
        assert other[0].SeriesInstanceUID != a[0].SeriesInstanceUID
        assert not {x.SOPInstanceUID for x in other} & {x.SOPInstanceUID for x in a}
    sources = {s.sop_instance_uid for s in volume.slices}
    assert len({x.SOPInstanceUID for x in a}) == len(a) and not sources & {x.SOPInstanceUID for x in a}
    assert a[0].SeriesInstanceUID != volume.series_uid
    rooted = _derive(volume, node=NodeIdentity(uid_root="1.2.999.77"))
    assert all(x.SOPInstanceUID.startswith("1.2.999.77.") for x in rooted)


# ------------------------------------------------------------------ contrast series


def test_geometry_study_and_patient_kept(volume: Volume) -> None:
    out = _derive(volume)
    assert len(out) == len(volume.slices)
    for ds, ref in zip(out, volume.slices):
        src = ref.header
        for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            np.testing.assert_allclose([float(x) for x in ds[kw].value], [float(x) for x in src[kw].value], atol=1e-6)
        for kw in ("SliceThickness", "SpacingBetweenSlices", "SliceLocation", "MagneticFieldStrength"):
            assert float(ds[kw].value) == pytest.approx(float(src[kw].value))
        for kw in ("FrameOfReferenceUID", "StudyInstanceUID", "PatientName", "PatientID", "PatientBirthDate",
                   "PatientSex", "PatientAge", "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                   "ReferringPhysicianName", "StudyDescription", "PatientPosition", "PositionReferenceIndicator",
                   "MRAcquisitionType", "SpecificCharacterSet", "InstitutionName", "BodyPartExamined"):
            assert ds[kw].value == src[kw].value, kw
    assert [d.InstanceNumber for d in out] == list(range(1, len(out) + 1))


def test_contrast_attributes(volume: Volume) -> None:
    ds = _derive(volume)[0]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" and ds.Modality == "MR"
    assert list(ds.ImageType)[:3] == ["DERIVED", "SECONDARY", "OTHER"]
    assert ds.SyntheticData == "YES"
    assert (ds.ScanningSequence, ds.SequenceVariant) == ("SE", "NONE")
    assert (float(ds.EchoTime), float(ds.RepetitionTime)) == (100.0, 4500.0)
    assert ds.SeriesDescription == "SYNTH T2w TE100 TR4500" and ds.SeriesNumber == 901
    assert (ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (
        "MONOCHROME2", 16, 16, 0)
    assert "RescaleSlope" not in ds and "RescaleIntercept" not in ds
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (600.0, 1200.0)
    assert ds.ContentDate == "20240506" and ds.ContentTime == "070809"
    assert ds.Manufacturer == "rtcontrast" and ds.ManufacturerModelName == "rtcontrast test node"
    assert ds.SoftwareVersions == "9.9" and ds.DeviceSerialNumber == "N-1"
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert "LossyImageCompression" not in ds


def test_lineage(volume: Volume) -> None:
    out = _derive(volume)
    for ds, ref in zip(out, volume.slices):
        (item,) = ds.SourceImageSequence
        assert item.ReferencedSOPInstanceUID == ref.sop_instance_uid
        assert item.ReferencedSOPClassUID == ref.sop_class_uid
        assert "ReferencedFrameNumber" not in item
        assert item.SpatialLocationsPreserved == "YES"
        assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    ds = out[0]
    (rs,) = ds.ReferencedSeriesSequence
    assert rs.SeriesInstanceUID == volume.series_uid
    assert {i.ReferencedSOPInstanceUID for i in rs.ReferencedInstanceSequence} == {
        s.sop_instance_uid for s in volume.slices}
    (rel,) = ds.RelatedSeriesSequence
    assert (rel.StudyInstanceUID, rel.SeriesInstanceUID) == (volume.study_uid, volume.series_uid)
    assert rel.PurposeOfReferenceCodeSequence[0].CodeValue == "121323"
    desc = ds.DerivationDescription
    for frag in ("exp(-TR/T1)", "TE=100 ms", "TR=4500 ms", "qmap-unet", "1.2.0", MODEL.sha256[:12]):
        assert frag in desc
    assert ds.DerivationCodeSequence[0].CodeValue == "112187"
    purposes = {e.PurposeOfReferenceCodeSequence[0].CodeValue: e for e in ds.ContributingEquipmentSequence}
    assert purposes["109101"].Manufacturer == "PhantomVendor"
    assert purposes["109101"].DeviceSerialNumber == "SN-0042"
    node = purposes["109100"]
    assert node.Manufacturer == "rtcontrast" and node.ContributionDateTime == "20240506070809"
    assert "qmap-unet" in node.ContributionDescription


def test_enhanced_source_frames_become_classic_slices(enhanced_volume: Volume, tmp_path: Path) -> None:
    out = _derive(enhanced_volume)
    assert len(out) == 4
    for ds, ref in zip(out, enhanced_volume.slices):
        (item,) = ds.SourceImageSequence
        assert item.ReferencedSOPInstanceUID == ref.sop_instance_uid
        assert item.ReferencedFrameNumber == ref.frame_number
        np.testing.assert_allclose([float(x) for x in ds.ImagePositionPatient], ref.image_position, atol=1e-6)
    assert len({d.SOPInstanceUID for d in out}) == 4
    assert len(out[0].ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 1
    paths = save_all(out, tmp_path / "out")
    assert dciodvfy_errors(paths[0]) == []


def test_sources_never_modified_and_outputs_independent(volume: Volume) -> None:
    before = [str(s.header) for s in volume.slices]
    out = _derive(volume)
    derive_map_images(volume, volume.pixels, "T1", 910, NODE, MODEL, now=NOW)
    derive_parametric_maps(volume, {"T2": volume.pixels}, NODE, MODEL, {"T2": 920}, now=NOW)
    assert [str(s.header) for s in volume.slices] == before
    out[0].SeriesDescription = "changed"
    out[0].PatientName = "OTHER^NAME"
    assert out[1].SeriesDescription == RECIPE.series_description
    assert out[1].PatientName == "PHANTOM^TEST" and volume.first_header.PatientName == "PHANTOM^TEST"


def test_lossy_flag_copied(tmp_path: Path) -> None:
    v = assemble(write_series(make_series(phantom(2), lossy=True), tmp_path))
    ds = _derive(v)[0]
    assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == "ISO_10918_1"


def test_written_files_readable_and_dciodvfy_clean(volume: Volume, tmp_path: Path) -> None:
    out = _derive(volume)
    paths = save_all(out, tmp_path / "out")
    for p, ds, px in zip(paths, out, _u16(volume)):
        back = pydicom.dcmread(p)
        assert back.SOPInstanceUID == ds.SOPInstanceUID
        np.testing.assert_array_equal(back.pixel_array, px)
    assert dciodvfy_errors(paths[0]) == []
    assert dciodvfy_errors(paths[-1]) == []


def test_bad_inputs_rejected(volume: Volume) -> None:
    with pytest.raises(DeriveError, match="shape"):
        derive_contrast_series(volume, _u16(volume)[:2], RECIPE, NODE, MODEL, Window(1, 2))
    with pytest.raises(DeriveError, match="uint16"):
        derive_contrast_series(volume, volume.pixels, RECIPE, NODE, MODEL, Window(1, 2))
    with pytest.raises(ValueError, match="SYNTH"):
        RecipeInfo("x", 10, 500, 900, "T1w")
    with pytest.raises(ValueError, match="64"):
        RecipeInfo("x", 10, 500, 900, "SYNTH " + "x" * 60)


def test_missing_body_part_gives_unknown_laterality(tmp_path: Path) -> None:
    dss = make_series(phantom(2))
    for d in dss:
        del d.BodyPartExamined
    v = assemble(write_series(dss, tmp_path / "in"))
    out = _derive(v)
    assert out[0].Laterality == ""
    assert dciodvfy_errors(save_all(out, tmp_path / "out")[0]) == []


# ------------------------------------------------------------------ maps


def test_map_images(volume: Volume, tmp_path: Path) -> None:
    t1 = volume.pixels * 1.7 + 0.4
    out = derive_map_images(volume, t1, "T1", 910, NODE, MODEL, now=NOW)
    ds = out[0]
    assert ds.SeriesDescription == "SYNTH T1 map [ms]"
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "OTHER", "T1 MAP"]
    assert ds.SyntheticData == "YES" and ds.SeriesNumber == 910
    np.testing.assert_array_equal(np.frombuffer(ds.PixelData, "<u2").reshape(t1.shape[1:]),
                                  np.rint(t1[0]).astype(np.uint16))
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == volume.slices[0].sop_instance_uid
    assert out[0].SeriesInstanceUID != _derive(volume)[0].SeriesInstanceUID
    pd_out = derive_map_images(volume, np.full(volume.pixels.shape, 0.5, np.float32), "PD", 911, NODE, MODEL)
    assert np.frombuffer(pd_out[0].PixelData, "<u2")[0] == int(0.5 * PD_SCALE)
    assert "1000" in pd_out[0].DerivationDescription
    paths = save_all(out, tmp_path / "t1")
    assert dciodvfy_errors(paths[0]) == []
    assert dciodvfy_errors(save_all(pd_out, tmp_path / "pd")[0]) == []
    with pytest.raises(DeriveError, match="quantity"):
        derive_map_images(volume, t1, "ADC", 912, NODE, MODEL)


def test_map_to_u16_clips_and_handles_nan() -> None:
    a = np.array([-5.0, 0.4, 1.6, np.nan, 1e9], dtype=np.float32)
    np.testing.assert_array_equal(map_to_u16(a, "T2"), [0, 0, 2, 0, 65535])


@pytest.mark.parametrize("source", ["classic", "enhanced"])
def test_parametric_maps(source: str, volume: Volume, enhanced_volume: Volume, tmp_path: Path) -> None:
    v = volume if source == "classic" else enhanced_volume
    maps = {"T1": v.pixels * 2.0, "T2": v.pixels / 10.0, "PD": v.pixels / 1000.0}
    pms = derive_parametric_maps(v, maps, NODE, MODEL, {"T1": 920, "T2": 921, "PD": 922}, now=NOW)
    assert len(pms) == 3 and len({p.SeriesInstanceUID for p in pms}) == 3
    paths = save_all(pms, tmp_path / "pm")
    expect = {"T1": ("113063", "ms"), "T2": ("113065", "ms"), "PD": ("113058", "1")}
    for (q, values), pm, path in zip(maps.items(), pms, paths):
        back = pydicom.dcmread(path)
        assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
        assert back.Modality == "MR" and back.ContentQualification == "RESEARCH"
        assert back.FrameOfReferenceUID == v.frame_of_reference_uid
        assert back.StudyInstanceUID == v.study_uid and back.PatientID == "RTC-PHANTOM-001"
        rwvm = back.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        assert rwvm.MeasurementUnitsCodeSequence[0].CodeValue == expect[q][1]
        assert rwvm.QuantityDefinitionSequence[0].ConceptCodeSequence[0].CodeValue == expect[q][0]
        frames = back.pixel_array
        positions = [np.array([float(x) for x in f.PlanePositionSequence[0].ImagePositionPatient])
                     for f in back.PerFrameFunctionalGroupsSequence]
        assert len(positions) == len(v.slices)
        for k, pos in enumerate(positions):  # highdicom may reorder frames: match them by position
            (i,) = [j for j, ref in enumerate(v.slices) if np.allclose(ref.image_position, pos, atol=1e-4)]
            ref = v.slices[i]
            np.testing.assert_allclose(frames[k], values[i], rtol=1e-6)
            src = back.PerFrameFunctionalGroupsSequence[k].DerivationImageSequence[0].SourceImageSequence[0]
            assert src.ReferencedSOPInstanceUID == ref.sop_instance_uid
            if ref.frame_number is not None:
                assert int(src.ReferencedFrameNumber) == ref.frame_number
        purposes = {e.PurposeOfReferenceCodeSequence[0].CodeValue for e in back.ContributingEquipmentSequence}
        assert {"109101", "109100"} <= purposes
        assert "qmap-unet" in back.DerivationDescription and back.SyntheticData == "YES"
        assert dciodvfy_errors(path) == [], q
        assert isinstance(hd.pm.ParametricMap.from_dataset(back), hd.pm.ParametricMap)
    again = derive_parametric_maps(v, {"T1": maps["T1"]}, NODE, MODEL, {"T1": 920}, now=NOW)
    assert again[0].SOPInstanceUID == pms[0].SOPInstanceUID


def test_uid_format_in_outputs(volume: Volume) -> None:
    for ds in _derive(volume):
        assert re.fullmatch(r"2\.25\.\d+", ds.SOPInstanceUID) and len(ds.SOPInstanceUID) <= 64


def test_dciodvfy_check_is_not_vacuous(volume: Volume, tmp_path: Path) -> None:
    ds = _derive(volume)[0]
    del ds.ScanningSequence  # Type 1 in the MR Image module
    (path,) = save_all([ds], tmp_path / "broken")
    errors = dciodvfy_errors(path)
    assert any("ScanningSequence" in e for e in errors), errors


# ------------------------------------------------------------------ #16: text a planner trusts, masked maps


REPO = Path(__file__).resolve().parent.parent


def test_image_comments_name_source_series_by_number_and_description(volume: Volume) -> None:
    ds = derive_contrast_series(volume, _u16(volume), RECIPE, NODE, MODEL, now=NOW, qa_note="QA passed")[0]
    assert ds.ImageComments == ("synthetic spin echo TE 100 TR 4500 from series 3 'T2 TSE AX', "
                                "model qmap-unet 1.2.0, QA passed")
    t1 = derive_map_images(volume, volume.pixels, "T1", 910, NODE, MODEL)[0]
    assert t1.ImageComments.startswith("synthetic T1 map [ms] from series 3 'T2 TSE AX', model qmap-unet 1.2.0")


def test_long_ds_in_source_is_shortened_not_moved(tmp_path: Path) -> None:
    dss = make_series(phantom(3, 16, 16), geometry=Geometry(pixel_spacing=(400 / 192, 400 / 192)))
    for ds in dss:
        ds.PixelSpacing = ["2.0833333333333335", "2.0833333333333335"]  # 18 characters: invalid DS
        ds.ImagePositionPatient = [f"{-198.95833333333334 :.14f}", "-198.958333", f"{ds.ImagePositionPatient[2]}"]
    v = assemble(write_series(dss, tmp_path / "src"))
    out = derive_contrast_series(v, _u16(v), RECIPE, NODE, MODEL, now=NOW)
    for ds in out:
        for elem in ds.iterall():
            if elem.VR == "DS" and elem.value not in (None, ""):
                vals = elem.value if elem.VM > 1 else [elem.value]
                assert all(len(str(x)) <= 16 for x in vals), (elem.keyword, elem.value)
    assert [float(x) for x in out[0].PixelSpacing] == pytest.approx([400 / 192] * 2, rel=1e-12)
    assert str(out[0].ImagePositionPatient[1]) == "-198.958333"  # values that fit stay as the source wrote them
    assert float(out[0].ImagePositionPatient[0]) == pytest.approx(-198.95833333333334, abs=1e-9)
    assert dciodvfy_errors(save_all(out[:1], tmp_path / "out")[0]) == []


def test_demo_series_is_valid_dicom() -> None:
    files = sorted((REPO / "examples" / "phantom-t2w").glob("*.dcm"))
    assert len(files) == 16
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for elem in ds.iterall():
            if elem.VR == "DS" and elem.value not in (None, ""):
                vals = elem.value if elem.VM > 1 else [elem.value]
                assert all(len(str(x)) <= 16 for x in vals), (f.name, elem.keyword)
    assert dciodvfy_errors(files[0]) == []


def test_maps_masked_to_body(volume: Volume, tmp_path: Path) -> None:
    from rtcontrast.dicom.map_series import BODY_FRACTION, body_mask

    scale = float(np.percentile(volume.pixels[volume.pixels > 0], 99))
    mask = body_mask(volume.pixels, scale)
    assert 0 < mask.sum() < mask.size
    np.testing.assert_array_equal(mask, volume.pixels > BODY_FRACTION * scale)
    t1 = np.full(volume.pixels.shape, 3000.0, np.float32)  # a "halo" everywhere
    out = derive_map_images(volume, t1, "T1", 910, NODE, MODEL, mask=mask)
    stored = np.stack([np.frombuffer(ds.PixelData, "<u2").reshape(t1.shape[1:]) for ds in out])
    assert (stored[~mask] == 0).all() and (stored[mask] == 3000).all()
    assert "outside the body" in out[0].DerivationDescription
    pms = derive_parametric_maps(volume, {"T2": t1}, NODE, MODEL, {"T2": 921}, mask=mask)
    back = pydicom.dcmread(save_all(pms, tmp_path / "pm")[0])
    frames = back.pixel_array
    positions = [np.array([float(x) for x in f.PlanePositionSequence[0].ImagePositionPatient])
                 for f in back.PerFrameFunctionalGroupsSequence]
    for k, pos in enumerate(positions):
        (i,) = [j for j, ref in enumerate(volume.slices) if np.allclose(ref.image_position, pos, atol=1e-4)]
        np.testing.assert_array_equal(frames[k] == 0, ~mask[i])
    with pytest.raises(DeriveError, match="mask"):
        derive_map_images(volume, t1, "T1", 910, NODE, MODEL, mask=mask[:1])


def test_parametric_maps_of_a_fused_job_reference_the_partner(volume: Volume, tmp_path: Path) -> None:
    partner = assemble(write_series(make_series(phantom(5, 24, 40), geometry=Geometry.oblique(), series_number=4,
                                                series_description="T1 SE AX", te=10, tr=500), tmp_path / "p"))
    assert partner.series_uid != volume.series_uid and partner.study_uid == volume.study_uid
    pms = derive_parametric_maps(volume, {"T1": volume.pixels}, NODE, MODEL, {"T1": 920}, co_sources=[partner])
    back = pydicom.dcmread(save_all(pms, tmp_path / "pm")[0])
    series = {it.SeriesInstanceUID: {r.ReferencedSOPInstanceUID for r in it.ReferencedInstanceSequence}
              for it in back.ReferencedSeriesSequence}
    assert series == {volume.series_uid: {s.sop_instance_uid for s in volume.slices},
                      partner.series_uid: {s.sop_instance_uid for s in partner.slices}}
    assert partner.series_uid in back.DerivationDescription
    assert "+ series 4 'T1 SE AX'" in back.ImageComments
    assert dciodvfy_errors(tmp_path / "pm" / f"{back.SOPInstanceUID}.dcm") == []
    # the classic writers did this already: same lineage for both kinds
    classic = derive_map_images(volume, volume.pixels, "T1", 910, NODE, MODEL, co_sources=[partner])[0]
    assert {it.SeriesInstanceUID for it in classic.ReferencedSeriesSequence} == set(series)
