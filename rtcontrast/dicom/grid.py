"""Fusion: put every spin-echo series of one frame of reference on the target's grid.

One SE image gives one equation per voxel for three unknowns; a T1-weighted and a
T2-weighted series of the same frame of reference (usual in pelvic RT protocols) make
the maps far better determined.  A ``qmap/2`` model takes them together; this module
decides which series belong together and brings them onto the grid of the series being
processed (the geometric target), so the derived images keep the target's geometry.

* Same grid (orientation, pixel spacing, matrix, slice positions within tolerance): the
  partner's pixels are used as they are.
* Otherwise, when the protocol allows resampling: trilinear interpolation of the
  partner at the target's voxel centres (patient coordinates from each series' DICOM
  geometry; outside the partner's field of view -> 0), and the lineage says so.
* Otherwise the partner is left out, with the reason logged.

:func:`intensity_factors` reads what the headers say about the series' intensity scales
(Philips' private scale slope, a real-world value mapping), so that the gains between
inputs come from DICOM where it speaks; :func:`field_strength_t` the field strength the
reference tissues of :mod:`rtcontrast.core.gains` need.

Which series of a group gets derived series of its own is the protocol's
``fusion.target`` rule (:func:`choose_target`): every series (``each``), or only the
T2w-like, T1w-like or finest-grid one; the others are then inputs only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from rtcontrast.dicom.volume import ORIENTATION_TOL, SPACING_TOL_MM, Volume

#: Tolerance for "the same grid" in position; orientation and spacing tolerances are the volume's (one owner).
POSITION_TOL_MM = 0.01


@dataclass
class Aligned:
    """A partner series brought onto the target grid."""

    volume: Volume
    pixels: np.ndarray  # [N,H,W] on the target grid
    resampled: bool
    #: resampled only: True where the target voxel lies inside the partner's field of view
    #: (outside, ``pixels`` is 0 for the network but is no measurement for the consistency fit)
    valid: np.ndarray | None = None


def _positions(v: Volume) -> np.ndarray:
    return np.stack([np.asarray(s.image_position, float) for s in v.slices])


def same_grid(a: Volume, b: Volume) -> tuple[bool, str]:
    """Whether ``b`` lies on ``a``'s voxel grid; the reason when not."""
    if a.frame_of_reference_uid != b.frame_of_reference_uid:
        return False, "different frame of reference"
    if a.pixels.shape != b.pixels.shape:
        return False, f"matrix {b.pixels.shape} differs from the target's {a.pixels.shape}"
    if np.max(np.abs(np.asarray(a.orientation, float) - np.asarray(b.orientation, float))) > ORIENTATION_TOL:
        return False, "orientation differs"
    if np.max(np.abs(np.asarray(a.pixel_spacing, float) - np.asarray(b.pixel_spacing, float))) > SPACING_TOL_MM:
        return False, "pixel spacing differs"
    if np.max(np.abs(_positions(a) - _positions(b))) > POSITION_TOL_MM:
        return False, "slice positions differ"
    return True, "same grid"


def _index_to_patient(v: Volume) -> tuple[np.ndarray, np.ndarray]:
    """Affine (3x3 matrix M, origin o) with patient = o + M @ (slice, row, col)."""
    o = np.asarray(v.orientation, float)
    row_dir, col_dir = o[:3], o[3:]  # direction of increasing column index, of increasing row index
    dr, dc = float(v.pixel_spacing[0]), float(v.pixel_spacing[1])
    pos = _positions(v)
    origin = pos[0]
    if len(pos) > 1:
        step = (pos[-1] - pos[0]) / (len(pos) - 1)
    else:
        step = np.cross(row_dir, col_dir) * float(v.slice_spacing or 1.0)
    m = np.stack([step, col_dir * dr, row_dir * dc], axis=1)  # columns: d/dslice, d/drow, d/dcol
    return m, origin


def _source_coords(target: Volume, partner: Volume) -> np.ndarray:
    """Partner (slice, row, col) index coordinates [3, N*H*W] of the target's voxel centres."""
    mt, ot = _index_to_patient(target)
    mp, op = _index_to_patient(partner)
    n, h, w = target.pixels.shape
    idx = np.stack(np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing="ij"), axis=0).reshape(3, -1)
    patient = ot[:, None] + mt @ idx
    return np.linalg.solve(mp, patient - op[:, None])


def resample_to(target: Volume, partner: Volume) -> np.ndarray:
    """The partner's pixels at the target's voxel centres (trilinear; 0 outside)."""
    src = _source_coords(target, partner)
    out = ndimage.map_coordinates(partner.pixels, src, order=1, mode="constant", cval=0.0, prefilter=False)
    return out.reshape(target.pixels.shape).astype(np.float32)


def inside_fov(target: Volume, partner: Volume) -> np.ndarray:
    """True where a target voxel centre lies within the partner's outermost voxel centres.

    Outside, trilinear interpolation mixes in the constant 0 of :func:`resample_to`.
    """
    src = _source_coords(target, partner)
    hi = np.asarray(partner.pixels.shape, float)[:, None] - 1.0
    return np.all((src >= -1e-3) & (src <= hi + 1e-3), axis=0).reshape(target.pixels.shape)


def align(target: Volume, partner: Volume, allow_resample: bool) -> tuple[Aligned | None, str]:
    """Bring ``partner`` onto ``target``'s grid, or say why it cannot be used."""
    ok, why = same_grid(target, partner)
    if ok:
        return Aligned(partner, partner.pixels, resampled=False), why
    if partner.frame_of_reference_uid != target.frame_of_reference_uid:
        return None, why
    if not allow_resample:
        return None, f"{why} and the protocol does not allow resampling"
    return (Aligned(partner, resample_to(target, partner), resampled=True, valid=inside_fov(target, partner)),
            f"resampled ({why})")


#: ``fusion.target`` rules: which series of a fused group is the geometric target.
TARGET_RULES = ("each", "t2w", "t1w", "finest")


@dataclass(frozen=True)
class Candidate:
    """One series of a fused group, as far as the target rule needs it."""

    series_uid: str
    te_ms: float
    tr_ms: float
    voxel_mm3: float


def voxel_volume_mm3(v: Volume) -> float:
    """Voxel volume from pixel spacing and slice spacing (a single slice counts its thickness)."""
    dz = v.slice_spacing or (v.slices[0].slice_thickness if v.slices and v.slices[0].slice_thickness else 1.0)
    return float(v.pixel_spacing[0] * v.pixel_spacing[1] * abs(dz))


def choose_target(group: list[Candidate], rule: str) -> str | None:
    """The series UID that is the geometric target of ``group`` under ``rule`` (None for ``each``).

    Why deterministic tie-breaks: every job of the group decides on its own, and all of
    them must pick the same series (ties -> the other weighting, then the smaller UID).
    ``t2w``: longest TE (then longest TR); ``t1w``: shortest TR (then shortest TE);
    ``finest``: smallest voxel (then longest TE).
    """
    if rule not in TARGET_RULES:
        raise ValueError(f"unknown fusion target rule {rule!r} (one of {', '.join(TARGET_RULES)})")
    if rule == "each" or not group:
        return None
    keys = {
        "t2w": lambda c: (-c.te_ms, -c.tr_ms, c.series_uid),
        "t1w": lambda c: (c.tr_ms, c.te_ms, c.series_uid),
        "finest": lambda c: (round(c.voxel_mm3, 3), -c.te_ms, c.series_uid),
    }
    return min(group, key=keys[rule]).series_uid


#: Philips' private floating-point scale slope (FP = (SV * RS + RI) / (RS * SS)).
PHILIPS_SCALE_SLOPE = (0x2005, 0x100E)


def _num(ds: Any, tag: Any) -> float | None:
    try:
        v = ds.get(tag)
        v = getattr(v, "value", v)
        if isinstance(v, (list, tuple)) or hasattr(v, "__len__") and not isinstance(v, (str, bytes)):
            v = v[0]
        x = float(v)
    except (TypeError, ValueError, IndexError, KeyError):
        return None
    return x if np.isfinite(x) and x > 0 else None


def intensity_factors(volumes: list[Volume]) -> tuple[list[float], str] | None:
    """Stored value (after the Modality LUT) per common physical unit, per series, when every header says.

    * Philips private scale slope (2005,100E) in every series: FP = DV / (RS * SS), so the
      factor is RS * SS;
    * a real-world value mapping (0040,9096) with one unit in every series: physical =
      SV * slope (+ intercept, taken as 0), DV = SV * RS + RI, so the factor is RS / slope.

    None when the headers do not all say it (the gains then come from physics).
    """
    if len(volumes) < 2:
        return None
    heads = [v.first_header for v in volumes]
    ss = [_num(h, PHILIPS_SCALE_SLOPE) for h in heads]
    rs = [_num(h, "RescaleSlope") or 1.0 for h in heads]
    if all(s is not None for s in ss):
        return [r * s for r, s in zip(rs, ss)], "DICOM: Philips private scale slope (2005,100E)"  # type: ignore[operator]
    slopes, units = [], set()
    for h in heads:
        seq = h.get("RealWorldValueMappingSequence")
        item = seq[0] if seq else None
        slope = _num(item, "RealWorldValueSlope") if item is not None else None
        if slope is None:
            return None
        code = item.get("MeasurementUnitsCodeSequence")
        units.add(str(code[0].get("CodeValue", "")) if code else "")
        slopes.append(slope)
    if len(units) != 1:
        return None
    return [r / s for r, s in zip(rs, slopes)], "DICOM: real-world value mapping (0040,9096)"


def field_strength_t(volume: Volume) -> float | None:
    """MagneticFieldStrength (T) of the series, None when absent or not positive."""
    return _num(volume.first_header, "MagneticFieldStrength")
