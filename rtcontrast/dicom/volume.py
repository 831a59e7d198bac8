"""Assemble spooled MR files into one sorted, validated volume.

Why this stage is strict: the model sees the series as a stack of 2D slices with one
(TE, TR), and the derived series copies the source geometry slice by slice.  A series
with mixed orientation/spacing/matrix, duplicate positions, gaps, or mixed TE/TR would
give maps (and synthetic images) that look plausible but are wrong, so it is rejected
with a :class:`VolumeError` whose message names the problem and the instances involved.

Inputs: classic MR Image Storage files (one slice each) and Enhanced MR / Legacy
Converted Enhanced MR multi-frame files (split into one slice per frame, geometry and
TE/TR taken from the shared and per-frame functional groups).  Any transfer syntax that
pydicom can decode (pylibjpeg plugins for JPEG, JPEG-LS, JPEG 2000, RLE).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.uid
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut

log = logging.getLogger(__name__)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
LEGACY_ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.4"
MULTIFRAME_MR = (ENHANCED_MR_IMAGE_STORAGE, LEGACY_ENHANCED_MR_IMAGE_STORAGE)
SUPPORTED_SOP_CLASSES = (MR_IMAGE_STORAGE, *MULTIFRAME_MR)

#: Largest difference between direction cosines still counted as the same orientation.
ORIENTATION_TOL = 1e-4
#: Pixel spacing difference (mm) still counted as the same.
SPACING_TOL_MM = 1e-3
#: Slices closer than this along the normal (mm) are duplicates.
DUPLICATE_TOL_MM = 1e-3
#: Gaps may differ from the median by this much (mm) or this fraction of it, whichever is larger.
SLICE_GAP_TOL_MM = 0.01
SLICE_GAP_TOL_REL = 0.01
#: TE/TR differences (ms) still counted as the same.
TIMING_TOL_MS = 0.01

#: Elements not copied into SliceRef.header (bulk data, and per-frame groups of multi-frames).
_HEADER_DROP = ("PixelData", "FloatPixelData", "DoubleFloatPixelData", "PerFrameFunctionalGroupsSequence")


class VolumeError(ValueError):
    """The files do not form one consistent volume; the message says exactly why."""


@dataclass
class SliceRef:
    """Where one slice of the volume came from, and its header for copying attributes.

    For a frame of a multi-frame object, ``header`` is the object's header without pixel
    data and per-frame groups, with this frame's ImagePositionPatient, ImageOrientationPatient,
    PixelSpacing, SliceThickness, EchoTime and RepetitionTime put at the top level, so that
    derivation code can treat classic slices and frames alike.
    """

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None
    image_position: np.ndarray
    header: Dataset
    slice_thickness: float | None = None
    position_along_normal: float = 0.0


@dataclass
class Volume:
    """A validated series: pixels after the Modality LUT, sorted along the slice normal.

    ``te_ms``/``tr_ms`` are None when the source does not state them (the model can
    estimate them from the image).  ``slice_spacing`` is None for a single slice.
    """

    pixels: np.ndarray  # float32 [N, Rows, Cols]
    slices: list[SliceRef]
    orientation: np.ndarray  # (6,) row then column direction cosines
    pixel_spacing: np.ndarray  # (2,) PixelSpacing: row spacing, column spacing (mm)
    slice_spacing: float | None
    te_ms: float | None
    tr_ms: float | None
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    first_header: Dataset = field(repr=False)

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal (row x column direction)."""
        return _normal(self.orientation)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.pixels.shape)  # type: ignore[return-value]


@dataclass
class _Frame:
    ref: SliceRef
    orientation: np.ndarray
    spacing: np.ndarray
    rows: int
    cols: int
    te: float | None
    tr: float | None
    series_uid: str
    study_uid: str
    for_uid: str
    pixels: np.ndarray  # float32 [Rows, Cols]


#: What a frame's pixels become once :func:`assemble` copied them into the volume.
_RELEASED = np.empty((0, 0), np.float32)


def _normal(orientation: np.ndarray) -> np.ndarray:
    n = np.cross(orientation[:3], orientation[3:])
    norm = np.linalg.norm(n)
    return n / norm if norm > 0 else n


def _floats(value: Any, count: int, what: str, where: str) -> np.ndarray:
    try:
        items = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
        arr = np.asarray([float(v) for v in items], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"{where}: {what} is not numeric ({value!r})") from exc
    if arr.shape != (count,):
        raise VolumeError(f"{where}: {what} must have {count} values, has {arr.size}")
    if not np.isfinite(arr).all():
        raise VolumeError(f"{where}: {what} is not finite ({value!r})")
    return arr


def _check_geometry(where: str, for_uid: str, orientation: np.ndarray, spacing: np.ndarray,
                    thickness: float | None) -> None:
    """What planning needs of the geometry (#15 finding 9): a frame of reference, a real grid.

    A derived series with an empty frame of reference, or with a negative pixel spacing
    passed through, would be placed wrongly (or not at all) by the planning system.
    """
    if not for_uid:
        raise VolumeError(f"{where}: missing FrameOfReferenceUID (the derived series could not be registered "
                          "to the planning CT)")
    if (spacing <= 0).any():
        raise VolumeError(f"{where}: PixelSpacing must be positive, is {spacing[0]:g}\\{spacing[1]:g}")
    if np.linalg.norm(np.cross(orientation[:3], orientation[3:])) < 1e-3:
        raise VolumeError(f"{where}: ImageOrientationPatient does not span a plane")
    if thickness is None:
        raise VolumeError(f"{where}: missing SliceThickness")
    if not (np.isfinite(thickness) and thickness > 0):
        raise VolumeError(f"{where}: SliceThickness must be positive, is {thickness:g}")


def _rescaled(arr: np.ndarray, lut_source: Dataset, where: str) -> np.ndarray:
    """Stored values through the Modality LUT as float32; non-finite results are refused.

    Why: a RescaleSlope of NaN (or 1e308, which overflows float32) on one slice gave blank
    derived slices that went to the TPS as good (#15 finding 2).
    """
    for kw in ("RescaleSlope", "RescaleIntercept"):
        value = lut_source.get(kw)
        if value is not None and value != "" and not np.isfinite(_opt_float(value) or 0.0):
            raise VolumeError(f"{where}: {kw} is not finite ({value})")
    with np.errstate(over="ignore", invalid="ignore"):
        px = np.asarray(apply_modality_lut(arr, lut_source), dtype=np.float32)
    bad = px.size - int(np.count_nonzero(np.isfinite(px)))
    if bad:
        raise VolumeError(f"{where}: {bad} pixel(s) are not finite after the Modality LUT "
                          f"(RescaleSlope {lut_source.get('RescaleSlope')}, "
                          f"RescaleIntercept {lut_source.get('RescaleIntercept')})")
    return px


def _opt_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _group_attr(groups: Sequence[Dataset | None], seq: str, attr: str) -> Any:
    """First value of ``seq[0].attr`` found in the given functional groups (per-frame first)."""
    for g in groups:
        if g is None or seq not in g or not g[seq].value:
            continue
        item = g[seq].value[0]
        if attr in item and item[attr].value not in (None, ""):
            return item[attr].value
    return None


def _check_pixel_module(ds: Dataset, where: str, frames: int) -> tuple[int, int]:
    if "PixelData" not in ds:
        raise VolumeError(f"{where}: missing pixel data (no PixelData element)")
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if spp != 1 or pi not in ("MONOCHROME1", "MONOCHROME2"):
        raise VolumeError(
            f"{where}: colour image (SamplesPerPixel={spp}, PhotometricInterpretation={pi}); "
            "only single-sample grayscale MR is supported"
        )
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as exc:
        raise VolumeError(f"{where}: Rows/Columns/BitsAllocated missing or invalid") from exc
    if rows < 1 or cols < 1:
        raise VolumeError(f"{where}: empty matrix {rows}x{cols}")
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        need = rows * cols * frames * bits // 8
        have = len(ds.PixelData or b"")
        if have < need:
            raise VolumeError(
                f"{where}: pixel data shorter than Rows*Columns ({have} bytes, need {need} "
                f"for {frames} frame(s) of {rows}x{cols} at {bits} bits)"
            )
    return rows, cols


def _decode(ds: Dataset, where: str) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as exc:  # pydicom raises many types for undecodable data
        ts = ds.file_meta.get("TransferSyntaxUID", "?")
        raise VolumeError(f"{where}: cannot decode pixel data (transfer syntax {ts}): {exc}") from exc


def _header_without_bulk(ds: Dataset) -> Dataset:
    """The header without pixel data; elements not yet parsed stay raw (their bytes as received).

    Why raw: parsing decodes text with the SpecificCharacterSet, and invalid bytes (a
    PatientName in Latin-1 under ISO_IR 192) come back as U+FFFD: the derived series
    reached the TPS with a changed PatientName (#15 finding 10).  Raw elements are parsed
    on first access as usual; derive copies patient/study text from the raw bytes.
    """
    drop = {tag_for_keyword(k) for k in _HEADER_DROP}
    hdr = Dataset()
    for tag in list(ds.keys()):
        if tag not in drop:
            hdr[tag] = ds.get_item(tag)
    hdr.file_meta = ds.file_meta
    hdr.set_original_encoding(*ds.original_encoding, ds.original_character_set)
    return hdr


def _read(path: Path) -> Dataset:
    try:
        ds = pydicom.dcmread(path)
    except FileNotFoundError as exc:
        raise VolumeError(f"{path}: file not found") from exc
    except Exception as exc:  # InvalidDicomError, EOFError, struct/value errors of a corrupt file
        raise VolumeError(f"{path}: unparseable file, not readable as DICOM: {exc}") from exc
    if "TransferSyntaxUID" not in ds.file_meta:
        raise VolumeError(f"{path}: unparseable file, no File Meta Information (TransferSyntaxUID)")
    return ds


def _common_uids(ds: Dataset, where: str) -> tuple[str, str, str, str]:
    missing = [k for k in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID") if not ds.get(k)]
    if missing:
        raise VolumeError(f"{where}: missing {', '.join(missing)}")
    return str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), str(ds.get("FrameOfReferenceUID", ""))


def _classic_frames(path: Path, ds: Dataset) -> list[_Frame]:
    where = str(path)
    sop, series, study, for_uid = _common_uids(ds, where)
    where = f"{path} (SOP {sop})"
    rows, cols = _check_pixel_module(ds, where, 1)
    if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
        raise VolumeError(f"{where}: missing ImagePositionPatient/ImageOrientationPatient (no geometry)")
    if "PixelSpacing" not in ds:
        raise VolumeError(f"{where}: missing PixelSpacing")
    pos = _floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", where)
    ori = _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", where)
    spacing = _floats(ds.PixelSpacing, 2, "PixelSpacing", where)
    arr = _decode(ds, where)
    if arr.ndim != 2:
        raise VolumeError(f"{where}: expected one frame, decoded shape {arr.shape}")
    px = _rescaled(arr, ds, where)
    _check_geometry(where, for_uid, ori, spacing, _opt_float(ds.get("SliceThickness")))
    ref = SliceRef(
        path=path,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=sop,
        frame_number=None,
        image_position=pos,
        header=_header_without_bulk(ds),
        slice_thickness=_opt_float(ds.get("SliceThickness")),
    )
    return [
        _Frame(ref, ori, spacing, rows, cols, _opt_float(ds.get("EchoTime")), _opt_float(ds.get("RepetitionTime")),
               series, study, for_uid, px)
    ]


def _multiframe_frames(path: Path, ds: Dataset) -> list[_Frame]:
    where = str(path)
    sop, series, study, for_uid = _common_uids(ds, where)
    where = f"{path} (SOP {sop})"
    n = int(ds.get("NumberOfFrames", 1) or 1)
    rows, cols = _check_pixel_module(ds, where, n)
    shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if len(per_frame) != n:
        raise VolumeError(f"{where}: {n} frames but {len(per_frame)} PerFrameFunctionalGroupsSequence items")
    arr = _decode(ds, where)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.shape[0] != n:
        raise VolumeError(f"{where}: NumberOfFrames={n} but decoded {arr.shape[0]} frames")
    base = _header_without_bulk(ds)
    base_top = base.copy()
    if "SharedFunctionalGroupsSequence" in base_top:
        del base_top.SharedFunctionalGroupsSequence
    frames = []
    for k in range(n):
        fw = f"{where} frame {k + 1}"
        groups = (per_frame[k], shared)
        pos = _group_attr(groups, "PlanePositionSequence", "ImagePositionPatient")
        ori = _group_attr(groups, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _group_attr(groups, "PixelMeasuresSequence", "PixelSpacing")
        if pos is None or ori is None:
            raise VolumeError(f"{fw}: missing PlanePositionSequence/PlaneOrientationSequence (no geometry)")
        if spacing is None:
            raise VolumeError(f"{fw}: missing PixelMeasuresSequence/PixelSpacing")
        pos_a = _floats(pos, 3, "ImagePositionPatient", fw)
        ori_a = _floats(ori, 6, "ImageOrientationPatient", fw)
        spc_a = _floats(spacing, 2, "PixelSpacing", fw)
        te = _opt_float(_group_attr(groups, "MREchoSequence", "EffectiveEchoTime"))
        tr = _opt_float(_group_attr(groups, "MRTimingAndRelatedParametersSequence", "RepetitionTime"))
        thick = _opt_float(_group_attr(groups, "PixelMeasuresSequence", "SliceThickness"))
        between = _opt_float(_group_attr(groups, "PixelMeasuresSequence", "SpacingBetweenSlices"))
        lut = Dataset()
        slope = _group_attr(groups, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _group_attr(groups, "PixelValueTransformationSequence", "RescaleIntercept")
        if slope is not None and intercept is not None:
            lut.RescaleSlope = slope
            lut.RescaleIntercept = intercept
        px = _rescaled(arr[k], lut, fw)
        _check_geometry(fw, for_uid, ori_a, spc_a, thick)
        # A new element dict per frame (a shallow Dataset.copy() would share it between frames).
        hdr = Dataset(dict(base_top.items()))
        hdr.file_meta = base.file_meta
        flat = {
            "ImagePositionPatient": list(pos),  # the DS values as sent (original strings kept)
            "ImageOrientationPatient": list(ori),
            "PixelSpacing": list(spacing),
            "SliceThickness": thick,
            "SpacingBetweenSlices": between,
            "EchoTime": te,
            "RepetitionTime": tr,
        }
        for kw, value in flat.items():
            if value is None:
                continue
            if kw in hdr:
                del hdr[kw]  # only from this frame's dict
            setattr(hdr, kw, value)
        ref = SliceRef(
            path=path,
            sop_class_uid=str(ds.SOPClassUID),
            sop_instance_uid=sop,
            frame_number=k + 1,
            image_position=pos_a,
            header=hdr,
            slice_thickness=thick,
        )
        frames.append(_Frame(ref, ori_a, spc_a, rows, cols, te, tr, series, study, for_uid, px))
    return frames


def _load(path: Path) -> list[_Frame]:
    ds = _read(path)
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class and not pydicom.uid.UID(sop_class).is_valid:
        raise VolumeError(f"{path}: unparseable file, SOPClassUID {sop_class!r} is not a valid UID (truncated file?)")
    if sop_class not in SUPPORTED_SOP_CLASSES:
        raise VolumeError(
            f"{path}: unsupported SOP class {sop_class or '(none)'}; expected MR Image Storage or Enhanced MR"
        )
    if sop_class in MULTIFRAME_MR:
        return _multiframe_frames(path, ds)
    return _classic_frames(path, ds)


def _name(f: _Frame) -> str:
    r = f.ref
    return r.sop_instance_uid if r.frame_number is None else f"{r.sop_instance_uid} frame {r.frame_number}"


def _check_same(frames: list[_Frame]) -> None:
    first = frames[0]
    for f in frames[1:]:
        if f.series_uid != first.series_uid:
            raise VolumeError(f"files from more than one series: {first.series_uid} and {f.series_uid} ({_name(f)})")
        if f.study_uid != first.study_uid:
            raise VolumeError(f"mixed StudyInstanceUID in series: {first.study_uid} and {f.study_uid} ({_name(f)})")
        if f.for_uid != first.for_uid:
            raise VolumeError(f"mixed FrameOfReferenceUID in series: {first.for_uid!r} and {f.for_uid!r} ({_name(f)})")
        if np.max(np.abs(f.orientation - first.orientation)) > ORIENTATION_TOL:
            raise VolumeError(
                f"mixed orientation: {_name(first)} has ImageOrientationPatient {first.orientation.tolist()}, "
                f"{_name(f)} has {f.orientation.tolist()} (tolerance {ORIENTATION_TOL})"
            )
        if np.max(np.abs(f.spacing - first.spacing)) > SPACING_TOL_MM:
            raise VolumeError(
                f"mixed pixel spacing: {_name(first)} has PixelSpacing {first.spacing.tolist()}, "
                f"{_name(f)} has {f.spacing.tolist()}"
            )
        if (f.rows, f.cols) != (first.rows, first.cols):
            raise VolumeError(
                f"mixed matrix size: {_name(first)} is {first.rows}x{first.cols} (Rows x Columns), "
                f"{_name(f)} is {f.rows}x{f.cols}"
            )
        for label, a, b in (("TE (EchoTime)", first.te, f.te), ("TR (RepetitionTime)", first.tr, f.tr)):
            if (a is None) != (b is None) or (a is not None and b is not None and abs(a - b) > TIMING_TOL_MS):
                raise VolumeError(f"mixed {label} within the series: {a} ms ({_name(first)}) and {b} ms ({_name(f)})")


def _dedupe(frames: list[_Frame]) -> list[_Frame]:
    """Drop repeated copies of the same instance/frame (a re-sent instance is the same image)."""
    seen: dict[tuple[str, int | None], _Frame] = {}
    for f in frames:
        key = (f.ref.sop_instance_uid, f.ref.frame_number)
        if key in seen:
            log.warning("instance %s received more than once (%s, %s); using one copy", _name(f), seen[key].ref.path, f.ref.path)
            continue
        seen[key] = f
    return list(seen.values())


def assemble(paths: Sequence[Path | str]) -> Volume:
    """Read, validate and sort the files of one series into a :class:`Volume`.

    Raises :class:`VolumeError` naming the problem (and the instances involved) when the
    files do not form one regular stack of same-size, same-orientation, same-TE/TR slices.
    """
    if not paths:
        raise VolumeError("no files to assemble")
    frames: list[_Frame] = []
    for p in paths:
        frames.extend(_load(Path(p)))
    frames = _dedupe(frames)
    _check_same(frames)
    first = frames[0]
    normal = _normal(first.orientation)
    for f in frames:
        f.ref.position_along_normal = float(np.dot(f.ref.image_position, normal))
    frames.sort(key=lambda f: f.ref.position_along_normal)
    d = np.array([f.ref.position_along_normal for f in frames])
    gaps = np.diff(d)
    dup = np.nonzero(gaps < DUPLICATE_TOL_MM)[0]
    if dup.size:
        a, b = frames[dup[0]], frames[dup[0] + 1]
        raise VolumeError(
            f"duplicate positions: {_name(a)} and {_name(b)} are both at {d[dup[0]]:.3f} mm along the slice normal"
        )
    slice_spacing: float | None = None
    if gaps.size:
        med = float(np.median(gaps))
        tol = max(SLICE_GAP_TOL_MM, SLICE_GAP_TOL_REL * med)
        bad = np.nonzero(np.abs(gaps - med) > tol)[0]
        if bad.size:
            i = int(bad[0])
            raise VolumeError(
                f"inconsistent slice spacing: gap of {gaps[i]:.3f} mm between {_name(frames[i])} and "
                f"{_name(frames[i + 1])}, median gap {med:.3f} mm (missing or extra slice?)"
            )
        slice_spacing = float(np.mean(gaps))
    # Filled slice by slice, each frame's own copy dropped once it is in the volume: the
    # peak is about one volume, not the frames plus their stack (#13 memory).
    pixels = np.empty((len(frames), *np.shape(first.pixels)), np.float32)
    for i, f in enumerate(frames):
        if np.shape(f.pixels) != pixels.shape[1:]:  # never broadcast one frame into a slice
            raise VolumeError(f"{_name(f)}: pixel array {np.shape(f.pixels)}, expected {pixels.shape[1:]}")
        pixels[i] = f.pixels
        f.pixels = _RELEASED
    return Volume(
        pixels=pixels,
        slices=[f.ref for f in frames],
        orientation=first.orientation,
        pixel_spacing=first.spacing,
        slice_spacing=slice_spacing,
        te_ms=first.te,
        tr_ms=first.tr,
        study_uid=first.study_uid,
        series_uid=first.series_uid,
        frame_of_reference_uid=first.for_uid,
        first_header=frames[0].ref.header,
    )


def pad_to_multiple(arr: np.ndarray, multiple: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Zero-pad the last two axes (bottom/right) up to a multiple; return (padded, original (h, w)).

    The model contract needs H and W divisible by ``spatial_multiple``; padding at the end
    keeps pixel (0, 0) in place, so geometry is unchanged after :func:`crop_to`.
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    h, w = arr.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return arr, (h, w)
    pad = [(0, 0)] * (arr.ndim - 2) + [(0, ph), (0, pw)]
    return np.pad(arr, pad, mode="constant"), (h, w)


def crop_to(arr: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Undo :func:`pad_to_multiple`: keep the first h rows and w columns of the last two axes."""
    h, w = hw
    return arr[..., :h, :w]
