"""A small "real-like" researcher export: several patients' spin-echo DICOM plus the usual junk.

Why: the importer (and training from a folder) must be tested on what a hospital
physicist actually hands over: nested folders named after patients, files with and
without ``.dcm``, shuffled names, one or two contrasts per patient, an Enhanced MR
object, and things that must be skipped (gradient echo, CT, a series without TE, a
truncated file, a text file, a duplicate copy).  Pixels come from the pelvis phantom
(rtcontrast.research.phantom) so the ground-truth maps are known.

``build_real_like_dataset(root)`` writes it and returns what was written (see its
docstring); the PatientIDs/PatientNames are returned so tests can check they never leak.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import RLELossless

from rtcontrast.research import phantom
from tests.dicomgen import PATIENT, Geometry, SeriesSpec, make_enhanced, make_series, write_series

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

#: The fake patients: key -> (PatientID, PatientName, folder the export put them in).
PATIENTS: dict[str, tuple[str, str, str]] = {
    "A": ("RTC-A-1001", "DOE^JANE", "DOE_JANE_RTC-A-1001"),
    "B": ("RTC-B-2002", "ROE^RICHARD", "export/patient2"),
    "C": ("RTC-C-3003", "POE^EDGAR", "POE EDGAR"),
}


def _spec(key: str, te: float | None, tr: float, series_number: int, description: str, *, pixel_mm: float,
          slice_mm: float, scanning_sequence: str = "SE", sequence_variant: str = "NONE") -> SeriesSpec:
    pid, name, _ = PATIENTS[key]
    geometry = Geometry(pixel_spacing=(pixel_mm, pixel_mm), origin=(-40.0, -40.0, -10.0),
                        slice_spacing=slice_mm, slice_thickness=slice_mm)
    spec = SeriesSpec(
        te=te if te is not None else 0.0,
        tr=tr,
        geometry=geometry,
        scanning_sequence=scanning_sequence,
        sequence_variant=sequence_variant,
        series_number=series_number,
        series_description=description,
        uid_seed=f"realdata-{key}",  # one study and one frame of reference per patient
        patient={**PATIENT, "PatientID": pid, "PatientName": name},
    )
    return spec


def _images(maps: phantom.Maps, te: float, tr: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return phantom.acquire(maps, te, tr, rng, snr=60.0, bias_strength=0.05, gain=1500.0).image


def build_real_like_dataset(
    root: Path,
    *,
    n_slices: int = 4,
    shape: tuple[int, int] = (32, 32),
    pixel_mm: float = 8.0,
    slice_mm: float = 5.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the export under ``root``; return what is in it.

    Contents (TE/TR in ms):

    * patient A: T1w SE 8/500 and T2w SE 90/4000, same study and frame of reference
      (a paired group), ``.dcm`` files; plus a copy of one T1w file (duplicate);
    * patient B: T2w SE 90/4000, RLE Lossless, shuffled, files without extension, nested;
      plus a CT series (Modality CT) that must be skipped;
    * patient C: T1w SE 12/600 as one Enhanced MR object (frames stored in reverse); plus a gradient-echo series
      (ScanningSequence GR) and an SE series without EchoTime, both skipped;
    * junk: a text file, a truncated DICOM file.

    ``pixels`` are the eligible series' images as stored, in slice (z) order; ``maps`` the
    ground-truth phantom maps [N,H,W] of each patient.

    Returns ``{"patients": {key: {"patient_id", "patient_name", "folder", "maps"}},
    "series": {name: {"patient", "series_uid", "for_uid", "te", "tr", "n_slices", "shape", "pixels"}},
    "eligible": [names], "paired": [[names]], "skipped": {what: series_uid or path},
    "sensitive": [strings that must never be printed]}``.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    h, w = shape
    out: dict[str, Any] = {"patients": {}, "series": {}, "eligible": [], "paired": [], "skipped": {}, "sensitive": []}
    maps = {}
    for i, key in enumerate(PATIENTS):
        m, _ = phantom.volume(seed * 10 + i, n_slices=n_slices, shape=shape, pixel_mm=pixel_mm, slice_mm=slice_mm)
        maps[key] = m
        pid, name, folder = PATIENTS[key]
        out["patients"][key] = {"patient_id": pid, "patient_name": name, "folder": folder, "maps": m}
        out["sensitive"] += [pid, name, *name.split("^")]

    def record(name: str, key: str, spec: SeriesSpec, eligible: bool, images: np.ndarray) -> None:
        out["series"][name] = {
            "patient": key, "series_uid": spec.series_uid, "for_uid": spec.frame_of_reference_uid,
            "te": spec.te, "tr": spec.tr, "n_slices": n_slices, "shape": (n_slices, h, w),
            "pixels": np.rint(images).astype(np.float32),  # as stored (integers), slice order = z order
        }
        if eligible:
            out["eligible"].append(name)

    kw = {"pixel_mm": pixel_mm, "slice_mm": slice_mm}
    # -- patient A: the paired T1w + T2w
    a_dir = root / PATIENTS["A"][2]
    t1 = _spec("A", 8.0, 500.0, 3, "T1 SE AX", **kw)
    t2 = _spec("A", 90.0, 4000.0, 4, "T2 SE AX", **kw)
    img_t1, img_t2 = _images(maps["A"], 8.0, 500.0, seed + 1), _images(maps["A"], 90.0, 4000.0, seed + 2)
    p_t1 = write_series(make_series(img_t1, spec=t1), a_dir / "S3_T1")
    write_series(make_series(img_t2, spec=t2), a_dir / "S4_T2")
    record("A_T1w", "A", t1, True, img_t1)
    record("A_T2w", "A", t2, True, img_t2)
    out["paired"].append(["A_T1w", "A_T2w"])
    dup = a_dir / "copy_of_first_slice.dcm"
    shutil.copyfile(p_t1[0], dup)
    out["skipped"]["duplicate"] = str(dup)

    # -- patient B: one T2w, compressed, shuffled, no extension; plus CT
    b_dir = root / PATIENTS["B"][2]
    t2b = _spec("B", 90.0, 4000.0, 5, "t2_se_tra", **kw)
    img_b = _images(maps["B"], 90.0, 4000.0, seed + 3)
    paths = write_series(make_series(img_b, spec=t2b, transfer_syntax=RLELossless),
                         b_dir / "MR" / "0005", shuffle=True, seed=seed)
    for k, p in enumerate(paths):
        p.rename(p.with_name(f"IM{k:05d}"))
    record("B_T2w", "B", t2b, True, img_b)
    ct = _spec("B", 0.0, 0.0, 2, "CT PELVIS", **kw)
    ct_dss = make_series(np.full((2, h, w), 40.0, np.float32), spec=ct)
    for ds in ct_dss:
        ds.Modality = "CT"
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.file_meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        for kw_ in ("EchoTime", "RepetitionTime", "ScanningSequence", "SequenceVariant"):
            delattr(ds, kw_)
    write_series(ct_dss, b_dir / "CT")
    out["skipped"]["ct"] = ct.series_uid

    # -- patient C: Enhanced MR T1w, gradient echo, SE without TE
    c_dir = root / PATIENTS["C"][2]
    t1c = _spec("C", 12.0, 600.0, 7, "T1 SE ENH", **kw)
    img_c = _images(maps["C"], 12.0, 600.0, seed + 4)
    enh = make_enhanced(img_c, spec=t1c, frame_order=list(range(n_slices))[::-1])
    (c_dir / "enh").mkdir(parents=True, exist_ok=True)
    enh.save_as(c_dir / "enh" / "MR_ENHANCED", enforce_file_format=True)
    record("C_T1w", "C", t1c, True, img_c)
    gre = _spec("C", 4.0, 300.0, 8, "GRE T1 AX", scanning_sequence="GR", sequence_variant="SP", **kw)
    write_series(make_series(_images(maps["C"], 4.0, 300.0, seed + 5), spec=gre), c_dir / "gre")
    out["skipped"]["gradient_echo"] = gre.series_uid
    note = _spec("C", 80.0, 3000.0, 9, "SE no TE", **kw)
    no_te = make_series(_images(maps["C"], 80.0, 3000.0, seed + 6)[:2], spec=note)
    for ds in no_te:
        del ds.EchoTime
    write_series(no_te, c_dir / "se_no_te")
    out["skipped"]["te_missing"] = note.series_uid

    # -- junk
    txt = root / "README.txt"
    txt.write_text("Export from PACS, see ticket 4711\n")
    out["skipped"]["text"] = str(txt)
    trunc = root / "export" / "broken.dcm"
    trunc.parent.mkdir(parents=True, exist_ok=True)
    trunc.write_bytes(p_t1[1].read_bytes()[:200])
    out["skipped"]["truncated"] = str(trunc)
    return out
