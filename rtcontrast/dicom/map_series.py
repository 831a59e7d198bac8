"""Writers for the map series: PD/T1/T2 as classic MR images (uint16 with a rescale) or as
Parametric Map objects (float32, highdicom), with the same lineage as the contrast series.

Maps are masked to the body: outside it (air, where the signal is noise) the network's
T1/T2 are meaningless and showed as a bright, noisy halo of 2000-4000 ms in the TPS.  The
body is what QA (:mod:`rtcontrast.node.qa`) measures over: voxels of the source series
above :data:`BODY_FRACTION` of the series scale s (the model contract's scale); every
map voxel outside it is stored as 0 (documented in DerivationDescription).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from rtcontrast.core.render import window_from_histogram
from rtcontrast.dicom import uids
from rtcontrast.dicom.volume import MULTIFRAME_MR, Volume
from rtcontrast.dicom.derive import (
    MAP_QUANTITIES, PD_SCALE, PHYSICS_EQUATION, DeriveError, ModelIdentity, NodeIdentity, Window, _check_pixels, _instances,
    _laterality, _model_text, _now, _percentile_window, _series_template, _sources_text, provenance_comment,
)

#: Voxels of the source above this fraction of the series scale are body (same rule as QA's).
BODY_FRACTION = 0.05
_MASK_TEXT = f"voxels outside the body (source <= {BODY_FRACTION:g} x series scale) are 0"


def body_mask(pixels: np.ndarray, scale: float) -> np.ndarray:
    """Boolean body mask of a source volume: ``pixels > BODY_FRACTION * scale`` (QA's rule)."""
    return np.asarray(pixels) > BODY_FRACTION * float(scale)


def _masked(arr: np.ndarray, mask: np.ndarray | None, what: str) -> np.ndarray:
    if mask is None:
        return arr
    if mask.shape != arr.shape:
        raise DeriveError(f"body mask has shape {mask.shape}, the {what} {arr.shape}")
    return np.where(mask, arr, np.zeros((), arr.dtype))


def map_to_u16(values: np.ndarray, quantity: str) -> np.ndarray:
    """Float map -> stored integers: T1/T2 in whole ms, PD as round(PD_SCALE * PD); clipped to 0..65535."""
    if quantity not in MAP_QUANTITIES:
        raise DeriveError(f"quantity must be one of {MAP_QUANTITIES}, got {quantity!r}")
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=65535.0, neginf=0.0)
    if quantity == "PD":
        v = v * PD_SCALE
    return np.clip(np.rint(v), 0, 65535).astype(np.uint16)


def derive_map_images(
    volume: Volume,
    values: np.ndarray,
    quantity: str,
    series_number: int,
    node: NodeIdentity,
    model: ModelIdentity,
    window: Window | None = None,
    *,
    now: _dt.datetime | None = None,
    co_sources: Sequence[Volume] = (),
    mask: np.ndarray | None = None,
    qa_note: str | None = None,
) -> list[Dataset]:
    """A T1, T2 or PD map as classic MR images (for a TPS that reads no Parametric Maps).

    ``values``: float map (converted by :func:`map_to_u16`) or already-stored uint16.
    T1/T2 pixels are integer milliseconds; PD pixels are round(1000 * PD) with PD relative
    to the series scale of the model contract.  SeriesDescription "SYNTH T1 map [ms]".
    ``mask``: the body (:func:`body_mask`); voxels outside are stored as 0.
    """
    if quantity not in MAP_QUANTITIES:
        raise DeriveError(f"quantity must be one of {MAP_QUANTITIES}, got {quantity!r}")
    arr = _check_pixels(volume, np.asarray(values), f"{quantity} map")
    pixels = map_slab_u16(arr, quantity, mask)
    win = _percentile_window(pixels) if window is None else window
    template = map_template(volume, quantity, series_number, node, model, win, now=now, co_sources=co_sources,
                            masked=mask is not None, qa_note=qa_note)
    return _instances(volume, template, pixels, node=node, recipe_key=f"map-{quantity}", model=model,
                      co_sources=co_sources)


def map_slab_u16(values: np.ndarray, quantity: str, mask: np.ndarray | None) -> np.ndarray:
    """Stored pixels of (a slab of) a classic map image: :func:`map_to_u16`, 0 outside the body ``mask``."""
    arr = np.asarray(values)
    return _masked(arr if arr.dtype == np.uint16 else map_to_u16(arr, quantity), mask, f"{quantity} map")


def map_window(hist: np.ndarray) -> Window:
    """The window :func:`derive_map_images` gives the stored map pixels counted in ``hist``
    (:func:`rtcontrast.core.render.u16_histogram` of every slab): the same numbers, for a streamed series."""
    return window_from_histogram(hist, 1.0, 99.0)


def map_template(
    volume: Volume, quantity: str, series_number: int, node: NodeIdentity, model: ModelIdentity,
    window: Window, *, now: _dt.datetime | None = None, co_sources: Sequence[Volume] = (),
    masked: bool = True, qa_note: str | None = None,
) -> Dataset:
    """What every slice of one classic map series shares (slabs: :func:`rtcontrast.dicom.derive.derive_slab`
    with key ``map-<quantity>``); ``masked``: the pixels are 0 outside the body (said in the description)."""
    if quantity not in MAP_QUANTITIES:
        raise DeriveError(f"quantity must be one of {MAP_QUANTITIES}, got {quantity!r}")
    win = window
    unit = "ms" if quantity != "PD" else f"x{PD_SCALE:g} relative"
    key = f"map-{quantity}"
    scaling = "pixel value = T in ms" if quantity != "PD" else f"pixel value = round({PD_SCALE:g} * PD), PD relative to the series scale"
    description = (
        f"{quantity} map estimated by {_model_text(model)} from {_sources_text(volume, co_sources)} "
        f"assuming {PHYSICS_EQUATION}; {scaling}{'; ' + _MASK_TEXT if masked else ''}. "
        "Not an acquired image."
    )
    return _series_template(
        volume,
        node=node,
        series_uid=uids.series_uid(node.uid_root, volume.series_uid, key, model.version),
        series_number=series_number,
        series_description=f"SYNTH {quantity} map [{unit}]",
        image_type=["DERIVED", "SECONDARY", "OTHER", f"{quantity} MAP"],
        scanning_sequence="RM",
        sequence_variant="NONE",
        te_ms=None,
        tr_ms=None,
        derivation_description=description,
        window=win,
        when=_now(now),
        contribution=f"{quantity} map {model.name} {model.version}",
        co_sources=co_sources,
        image_comments=provenance_comment(f"synthetic {quantity} map [{unit}]", volume, co_sources, model, qa_note),
    )


_PM_CODES = {"T1": codes.DCM.T1, "T2": codes.DCM.T2, "PD": codes.DCM.ProtonDensity}
_PM_UNITS = {"T1": codes.UCUM.Millisecond, "T2": codes.UCUM.Millisecond, "PD": codes.UCUM.NoUnits}


def _pm_sources(volume: Volume) -> list[Dataset]:
    """Source headers for highdicom: one per classic slice, or the multi-frame object itself."""
    if all(s.sop_class_uid not in MULTIFRAME_MR for s in volume.slices):
        return [s.header for s in volume.slices]
    paths = {s.path for s in volume.slices}
    if len(paths) != 1 or len(volume.slices) != len({(s.sop_instance_uid, s.frame_number) for s in volume.slices}):
        raise DeriveError("Parametric Maps of a series made of several multi-frame objects are not supported")
    return [pydicom.dcmread(next(iter(paths)), stop_before_pixels=True)]


def derive_parametric_maps(
    volume: Volume,
    maps: dict[str, np.ndarray],
    node: NodeIdentity,
    model: ModelIdentity,
    series_numbers: dict[str, int],
    *,
    content_qualification: str = "RESEARCH",
    now: _dt.datetime | None = None,
    co_sources: Sequence[Volume] = (),
    mask: np.ndarray | None = None,
    qa_note: str | None = None,
) -> list[hd.pm.ParametricMap]:
    """One Parametric Map Storage object (own series) per quantity in ``maps`` ("T1", "T2", "PD").

    Float32 pixels with a RealWorldValueMapping (identity; UCUM ms for T1/T2, "1" for PD),
    quantity codes DCM 113063/113065/113058, Modality MR, referencing the source images and
    every image of each co-source (fusion partner; highdicom's ``further_source_images``:
    referenced, not used for geometry).  ``mask``: the body; voxels outside are 0.
    """
    sources = _pm_sources(volume)
    further = [h for v in co_sources for h in _pm_sources(v)]
    positions = [
        hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, [float(v) for v in s.image_position])
        for s in volume.slices
    ]
    orientation = hd.PlaneOrientationSequence(hd.CoordinateSystemNames.PATIENT, [float(v) for v in volume.orientation])
    thickness = volume.slices[0].slice_thickness or volume.slice_spacing or 1.0
    measures = hd.PixelMeasuresSequence(
        pixel_spacing=[float(v) for v in volume.pixel_spacing],
        slice_thickness=float(thickness),
        spacing_between_slices=volume.slice_spacing,
    )
    when = _now(now)
    out = []
    for quantity, values in maps.items():
        if quantity not in _PM_CODES:
            raise DeriveError(f"unknown map quantity {quantity!r}; expected one of {tuple(_PM_CODES)}")
        arr = np.nan_to_num(_check_pixels(volume, np.asarray(values, dtype=np.float32), f"{quantity} map"))
        arr = _masked(arr, mask, f"{quantity} map")
        lo, hi = float(arr.min()), float(arr.max())
        if hi <= lo:
            hi = lo + 1.0
        mapping = hd.pm.RealWorldValueMapping(
            lut_label=f"{quantity}MAP",
            lut_explanation=f"{quantity} ({_PM_UNITS[quantity].meaning})",
            unit=_PM_UNITS[quantity],
            value_range=(lo, hi),
            slope=1.0,
            intercept=0.0,
            quantity_definition=_PM_CODES[quantity],
        )
        win = _percentile_window(arr)
        key = f"pmap-{quantity}"
        synth = hd.ContributingEquipment(
            manufacturer=node.manufacturer,
            purpose_of_reference=codes.DCM.SynthesizingEquipment,
            manufacturer_model_name=node.model_name,
            software_versions=node.software_versions,
            device_serial_number=node.device_serial_number,
            station_name=node.station_name,
            contribution_datetime=when,
            contribution_description=f"{quantity} map {model.name} {model.version}"[:64],
        )
        pm = hd.pm.ParametricMap(
            source_images=sources,
            further_source_images=further or None,
            pixel_array=arr,
            series_instance_uid=uids.series_uid(node.uid_root, volume.series_uid, key, model.version),
            series_number=int(series_numbers[quantity]),
            sop_instance_uid=uids.instance_uid(node.uid_root, volume.series_uid, None, key, model.version),
            instance_number=1,
            manufacturer=node.manufacturer,
            manufacturer_model_name=node.model_name,
            software_versions=node.software_versions,
            device_serial_number=node.device_serial_number,
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[hd.VOILUTTransformation(window_center=win.center, window_width=win.width)],
            content_label=f"{quantity}MAP",
            content_description=f"{quantity} map, {model.name} {model.version}"[:64],
            pixel_measures=measures,
            plane_orientation=orientation,
            plane_positions=positions,
            content_qualification=content_qualification,
            contributing_equipment=[synth],
            derivation=codes.DCM.UnspecifiedMethodOfCalculation,
        )
        pm.Modality = "MR"
        _laterality(pm, volume.first_header)
        pm.SeriesDescription = f"SYNTH {quantity} parametric map"
        pm.SyntheticData = "YES"
        pm.DerivationDescription = (
            f"{quantity} map estimated by {_model_text(model)} from {_sources_text(volume, co_sources)} "
            f"assuming {PHYSICS_EQUATION}{'; ' + _MASK_TEXT if mask is not None else ''}"
        )[:1024]
        pm.ImageComments = provenance_comment(f"{quantity} parametric map", volume, co_sources, model, qa_note)
        pm.StationName = node.station_name
        pm.file_meta.SourceApplicationEntityTitle = node.ae_title[:16]
        out.append(pm)
    return out
