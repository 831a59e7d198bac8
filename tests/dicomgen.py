"""Synthetic MR series as pydicom datasets, for tests of every stage.

Why: tests need realistic scanner output (classic MR Image Storage slices, or one Enhanced
MR multi-frame object) with exact, known geometry, TE/TR and pixel values, in any transfer
syntax, without shipping patient data.  The patient is always the fake "PHANTOM^TEST".

Typical use::

    vol = np.random.default_rng(0).uniform(0, 1000, (5, 32, 48)).astype(np.float32)
    dss = make_series(vol, te=80, tr=4000, geometry=Geometry.oblique())
    paths = write_series(dss, tmp_path / "in", shuffle=True)
    enh = make_enhanced(vol, te=80, tr=4000)

All UIDs are deterministic (2.25.<uuid> from ``uid_seed``), so two calls with the same
arguments give the same objects; pass a different ``uid_seed`` for a different series.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    PYDICOM_IMPLEMENTATION_UID,
    RLELossless,
)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"

#: Transfer syntaxes make_series can produce (pydicom has encoders for these).
NATIVE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
COMPRESSED_SYNTAXES = (RLELossless, JPEG2000Lossless, JPEGLSLossless)

#: The fake patient/study of every generated series.
PATIENT: dict[str, Any] = {
    "PatientName": "PHANTOM^TEST",
    "PatientID": "RTC-PHANTOM-001",
    "PatientBirthDate": "19700101",
    "PatientSex": "O",
    "PatientAge": "054Y",
    "PatientWeight": "70",
}
STUDY: dict[str, Any] = {
    "StudyDate": "20240102",
    "StudyTime": "101500",
    "AccessionNumber": "ACC0001",
    "ReferringPhysicianName": "REF^DOCTOR",
    "StudyID": "1",
    "StudyDescription": "PHANTOM MR FOR RT",
}

_NS = uuid.uuid5(uuid.NAMESPACE_URL, "urn:rtcontrast:tests:dicomgen")


def uid(*parts: Any) -> str:
    """Deterministic 2.25 UID of the parts (test inputs only)."""
    return f"2.25.{uuid.uuid5(_NS, '|'.join(str(p) for p in parts)).int}"


@dataclass(frozen=True)
class Geometry:
    """Slice stack geometry in patient coordinates (mm).

    ``orientation`` is ImageOrientationPatient (row direction, column direction);
    ``pixel_spacing`` is PixelSpacing (row spacing = between rows, column spacing);
    slice i sits at ``origin + i * slice_spacing * normal`` with normal = row x col.
    """

    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    pixel_spacing: tuple[float, float] = (0.9, 0.8)
    origin: tuple[float, float, float] = (-100.0, -120.0, 30.0)
    slice_spacing: float = 3.0
    slice_thickness: float = 3.0

    @staticmethod
    def oblique() -> "Geometry":
        """A double-oblique stack (rotated about two axes), spacing 2.5 mm."""
        a, b = np.deg2rad(20.0), np.deg2rad(-35.0)
        rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
        r = rx @ rz
        row, col = r[:, 0], r[:, 1]
        return Geometry(
            orientation=tuple(float(round(v, 8)) for v in (*row, *col)),
            pixel_spacing=(1.1, 0.7),
            origin=(12.5, -40.25, 7.0),
            slice_spacing=2.5,
            slice_thickness=2.0,
        )

    @property
    def normal(self) -> np.ndarray:
        o = np.asarray(self.orientation, dtype=np.float64)
        return np.cross(o[:3], o[3:])

    def position(self, i: int) -> list[float]:
        p = np.asarray(self.origin, dtype=np.float64) + i * self.slice_spacing * self.normal
        return [float(round(v, 6)) for v in p]


@dataclass
class Scanner:
    """Acquisition equipment written into the General Equipment module."""

    manufacturer: str = "PhantomVendor"
    model_name: str = "PhantomScanner 1.5T"
    device_serial_number: str = "SN-0042"
    software_versions: str = "VX1"
    station_name: str = "MRSIM1"
    institution_name: str = "Test Hospital"
    field_strength_t: float = 1.5


@dataclass
class SeriesSpec:
    """Everything about the series besides pixels; defaults give a valid axial T2w SE."""

    te: float = 80.0
    tr: float = 4000.0
    geometry: Geometry = field(default_factory=Geometry)
    scanning_sequence: str = "SE"
    sequence_variant: str = "NONE"
    series_number: int = 3
    series_description: str = "T2 TSE AX"
    uid_seed: str = "phantom"
    rescale: tuple[float, float] | None = None  # (slope, intercept) -> Modality LUT
    scanner: Scanner = field(default_factory=Scanner)
    patient: dict[str, Any] = field(default_factory=lambda: dict(PATIENT))
    study: dict[str, Any] = field(default_factory=lambda: dict(STUDY))
    lossy: bool = False

    @property
    def study_uid(self) -> str:
        return uid(self.uid_seed, "study")

    @property
    def series_uid(self) -> str:
        return uid(self.uid_seed, "series", self.series_number)

    @property
    def frame_of_reference_uid(self) -> str:
        return uid(self.uid_seed, "for")


def _stored(volume: np.ndarray, rescale: tuple[float, float] | None) -> np.ndarray:
    """Float volume -> stored integer values (inverse Modality LUT), uint16 or int16."""
    v = np.asarray(volume, dtype=np.float64)
    if rescale is not None:
        slope, intercept = rescale
        v = (v - intercept) / slope
    v = np.rint(v)
    if v.min() < 0:
        return np.clip(v, -32768, 32767).astype(np.int16)
    return np.clip(v, 0, 65535).astype(np.uint16)


def _file_meta(sop_class: str, sop_uid: str, ts: str) -> FileMetaDataset:
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = sop_class
    fm.MediaStorageSOPInstanceUID = sop_uid
    fm.TransferSyntaxUID = UID(ts)
    fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return fm


def _common(ds: Dataset, spec: SeriesSpec) -> None:
    """Patient, Study, Series, Frame of Reference, Equipment modules."""
    for k, v in {**spec.patient, **spec.study}.items():
        setattr(ds, k, v)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyInstanceUID = spec.study_uid
    ds.Modality = "MR"
    ds.SeriesInstanceUID = spec.series_uid
    ds.SeriesNumber = spec.series_number
    ds.SeriesDescription = spec.series_description
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = "102000"
    ds.ProtocolName = spec.series_description
    ds.PatientPosition = "HFS"
    ds.BodyPartExamined = "PELVIS"
    ds.FrameOfReferenceUID = spec.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    sc = spec.scanner
    ds.Manufacturer = sc.manufacturer
    ds.ManufacturerModelName = sc.model_name
    ds.DeviceSerialNumber = sc.device_serial_number
    ds.SoftwareVersions = sc.software_versions
    ds.StationName = sc.station_name
    ds.InstitutionName = sc.institution_name
    ds.MagneticFieldStrength = sc.field_strength_t
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = "102100"
    ds.AcquisitionNumber = 1
    if spec.lossy:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionRatio = "10"
        ds.LossyImageCompressionMethod = "ISO_10918_1"


def _pixel_module(ds: Dataset, stored: np.ndarray, frames: int | None) -> None:
    rows, cols = stored.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = int(rows)
    ds.Columns = int(cols)
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if stored.dtype == np.int16 else 0
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.PixelData = np.ascontiguousarray(stored).astype(stored.dtype.newbyteorder("<")).tobytes()


def _encode(ds: Dataset, ts: str) -> None:
    """Put ``ds`` in transfer syntax ``ts`` (compress with pydicom's encoders when needed)."""
    ts = UID(ts)
    if ts in COMPRESSED_SYNTAXES:
        ds.compress(ts, generate_instance_uid=False)
    elif ts not in NATIVE_SYNTAXES:
        raise ValueError(f"dicomgen cannot produce transfer syntax {ts} ({ts.name})")
    ds.file_meta.TransferSyntaxUID = ts


def make_series(
    volume: np.ndarray,
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    spec: SeriesSpec | None = None,
    **spec_kwargs: Any,
) -> list[Dataset]:
    """Classic MR Image Storage datasets, one per slice of ``volume`` [N,H,W] (float, after Modality LUT).

    Keyword arguments not named here set :class:`SeriesSpec` fields (te, tr, geometry, ...).
    """
    spec = spec or SeriesSpec(**spec_kwargs)
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"volume must be [N,H,W], got shape {vol.shape}")
    stored = _stored(vol, spec.rescale)
    g = spec.geometry
    out = []
    for i in range(vol.shape[0]):
        sop_uid = uid(spec.uid_seed, "sop", spec.series_number, i)
        ds = Dataset()
        ds.file_meta = _file_meta(MR_IMAGE_STORAGE, sop_uid, ExplicitVRLittleEndian)
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        _common(ds, spec)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.InstanceNumber = i + 1
        ds.ScanningSequence = spec.scanning_sequence
        ds.SequenceVariant = spec.sequence_variant
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.EchoTime = spec.te
        ds.RepetitionTime = spec.tr
        ds.EchoTrainLength = 1
        ds.ImagingFrequency = 63.87
        ds.ImagedNucleus = "1H"
        ds.SliceThickness = g.slice_thickness
        ds.SpacingBetweenSlices = g.slice_spacing
        ds.ImagePositionPatient = g.position(i)
        ds.ImageOrientationPatient = list(g.orientation)
        ds.SliceLocation = float(round(float(np.dot(g.position(i), g.normal)), 6))
        ds.PixelSpacing = list(g.pixel_spacing)
        if spec.rescale is not None:
            ds.RescaleSlope = spec.rescale[0]
            ds.RescaleIntercept = spec.rescale[1]
            ds.RescaleType = "US"
        _pixel_module(ds, stored[i], None)
        _encode(ds, transfer_syntax)
        out.append(ds)
    return out


def make_enhanced(
    volume: np.ndarray,
    *,
    transfer_syntax: str = ExplicitVRLittleEndian,
    timing_per_frame: bool = False,
    frame_order: Sequence[int] | None = None,
    spec: SeriesSpec | None = None,
    **spec_kwargs: Any,
) -> Dataset:
    """One Enhanced MR Image Storage multi-frame dataset holding ``volume`` [N,H,W].

    ``timing_per_frame`` puts MREchoSequence/MRTimingAndRelatedParametersSequence in the
    per-frame groups instead of the shared group; ``frame_order`` stores slice
    ``frame_order[k]`` as frame k+1 (to test that frames are sorted by position).
    """
    spec = spec or SeriesSpec(**spec_kwargs)
    vol = np.asarray(volume, dtype=np.float32)
    n = vol.shape[0]
    order = list(range(n)) if frame_order is None else list(frame_order)
    stored = _stored(vol, spec.rescale)[order]
    g = spec.geometry
    sop_uid = uid(spec.uid_seed, "enhanced", spec.series_number)
    ds = Dataset()
    ds.file_meta = _file_meta(ENHANCED_MR_IMAGE_STORAGE, sop_uid, ExplicitVRLittleEndian)
    ds.SOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    _common(ds, spec)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.InstanceNumber = 1
    ds.AcquisitionDateTime = ds.StudyDate + "102000"
    ds.ContentQualification = "PRODUCT"
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MAGNITUDE"
    ds.AcquisitionContrast = "T2" if spec.te > 40 else "T1"
    ds.BurnedInAnnotation = "NO"
    ds.MRAcquisitionType = "2D"
    ds.PulseSequenceName = spec.scanning_sequence
    ds.EchoPulseSequence = "SPIN"
    ds.ImagedNucleus = "1H"
    ds.ResonantNucleus = "1H"
    ds.ImagingFrequency = 63.87

    def timing() -> tuple[Dataset, Dataset]:
        echo = Dataset()
        echo.EffectiveEchoTime = spec.te
        tim = Dataset()
        tim.RepetitionTime = spec.tr
        tim.EchoTrainLength = 1
        tim.FlipAngle = 90
        return echo, tim

    shared = Dataset()
    pm = Dataset()
    pm.PixelSpacing = list(g.pixel_spacing)
    pm.SliceThickness = g.slice_thickness
    pm.SpacingBetweenSlices = g.slice_spacing
    shared.PixelMeasuresSequence = [pm]
    po = Dataset()
    po.ImageOrientationPatient = list(g.orientation)
    shared.PlaneOrientationSequence = [po]
    if spec.rescale is not None:
        pvt = Dataset()
        pvt.RescaleSlope = spec.rescale[0]
        pvt.RescaleIntercept = spec.rescale[1]
        pvt.RescaleType = "US"
        shared.PixelValueTransformationSequence = [pvt]
    if not timing_per_frame:
        echo, tim = timing()
        shared.MREchoSequence = [echo]
        shared.MRTimingAndRelatedParametersSequence = [tim]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k, i in enumerate(order):
        f = Dataset()
        pp = Dataset()
        pp.ImagePositionPatient = g.position(i)
        f.PlanePositionSequence = [pp]
        fc = Dataset()
        fc.StackID = "1"
        fc.InStackPositionNumber = i + 1
        fc.DimensionIndexValues = [1, i + 1]
        f.FrameContentSequence = [fc]
        if timing_per_frame:
            echo, tim = timing()
            f.MREchoSequence = [echo]
            f.MRTimingAndRelatedParametersSequence = [tim]
        per_frame.append(f)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.NumberOfFrames = n
    _pixel_module(ds, stored, n)
    _encode(ds, transfer_syntax)
    return ds


def write_series(datasets: Sequence[Dataset], directory: Path | str, *, shuffle: bool = False, seed: int = 0) -> list[Path]:
    """Write datasets as DICOM Part 10 files ``<n>.dcm`` in ``directory``; return the paths.

    ``shuffle`` returns (and names) them in a random order, as a scanner or spool might.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    items = list(datasets)
    if shuffle:
        random.Random(seed).shuffle(items)
    paths = []
    for k, ds in enumerate(items):
        p = d / f"{k:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def phantom(n: int = 4, rows: int = 24, cols: int = 32, seed: int = 0) -> np.ndarray:
    """A small float32 test volume [n, rows, cols]: a bright disc on noise, distinct per slice."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    disc = ((yy - rows / 2) ** 2 + (xx - cols / 2) ** 2) < (min(rows, cols) / 3) ** 2
    vol = rng.uniform(0, 50, (n, rows, cols))
    vol += disc[None] * (400 + 100 * np.arange(n)[:, None, None])
    return vol.astype(np.float32).round()
