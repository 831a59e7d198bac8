"""Import a researcher's own spin-echo data from a folder: what is usable, what is not, and why.

Why: a hospital physicist who wants to fine-tune or evaluate on their own patients has a
folder of exported DICOM (any file names, nested any way, often with junk: CT, localisers,
gradient-echo series, DICOMDIR, text files) and perhaps NIfTI converted with dcm2niix.
Usually one or two spin-echo contrasts per patient, no maps.  :func:`scan` reads headers
only (fast), recognises spin-echo series with the same rules the node uses
(:func:`rtcontrast.settings.protocol.check_eligibility`, default ``match`` rules), and reports:

* eligible series (:class:`SeriesInfo`) with TE/TR, size and files; a multi-echo series
  (one SeriesInstanceUID, several TE) is split into one entry per (TE, TR);
* paired groups: >= 2 eligible series of one patient in one frame of reference with
  different TE/TR (what a fit or a self-supervised loss can use together);
* everything skipped, each with a reason a physicist can act on.

Privacy: PatientID and PatientName never appear in the report.  A patient is a short
SHA-256 hash of PatientID; paths in the human summary and the JSON are relative to the
scanned folder, with any PatientID / PatientName component found in the headers replaced
by ``***`` (exports often name folders after the patient).

NIfTI (``.nii``/``.nii.gz``) needs a JSON sidecar with the same stem giving TE and TR,
either BIDS keys ``EchoTime``/``RepetitionTime`` in SECONDS (as dcm2niix writes them) or
``te_ms``/``tr_ms`` in milliseconds.  Sidecar ``ScanningSequence``/``SequenceVariant``
(dcm2niix style, e.g. ``"SK_SP"``) are checked with the same rules; when the sidecar does
not state the sequence, spin-echo is assumed and the series notes say so.  NIfTI is read
with nibabel when it is importable; otherwise NIfTI files are skipped with the reason
"nibabel not installed" (nibabel is an optional dependency, not needed by the node).
The patient of a NIfTI file is its BIDS ``sub-<label>`` folder, else the sidecar's
PatientID, else its parent folder; files on the same voxel grid (affine and shape) in the
same session folder form one frame of reference.

CLI: ``python -m rtcontrast.research.importer scan FOLDER [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from rtcontrast.settings.protocol import MatchRules, load_protocol
from rtcontrast.dicom.eligibility import check_eligibility, header_te_tr
from rtcontrast.dicom.volume import SUPPORTED_SOP_CLASSES, assemble
from rtcontrast.research.import_report import TIMING_TOL_MS, ImportReport, PairedGroup, SeriesInfo, _reason_kind, _short, patient_hash  # noqa: F401
from rtcontrast.research.importer_nifti import _is_nifti_magic, _nifti_stem, _scan_nifti

#: Header elements read by :func:`scan` (pixels are never read).
HEADER_TAGS: tuple[str, ...] = (
    "SOPClassUID", "SOPInstanceUID", "Modality", "PatientID", "PatientName",
    "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SeriesNumber",
    "SeriesDescription", "ProtocolName", "BodyPartExamined", "ImageType", "SyntheticData",
    "ScanningSequence", "SequenceVariant", "ScanOptions", "SequenceName", "EchoTrainLength",
    "RFEchoTrainLength", "EchoTime", "RepetitionTime", "Rows", "Columns", "NumberOfFrames",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "EchoPulseSequence",
    "InversionRecovery", "EchoPlanarPulseSequence", "PulseSequenceName",
)
#: TE/TR closer than this (ms) are the same contrast.
# -- DICOM ----------------------------------------------------------------------------
@dataclass
class _Instance:
    path: Path
    ds: Dataset
    te: float | None
    tr: float | None


def _read_header(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))


def _str(ds: Dataset, kw: str) -> str:
    v = ds.get(kw)
    return "" if v is None else str(v).strip()


def _sensitive_tokens(ds: Dataset) -> set[str]:
    """PatientID and PatientName (whole, and name components of >= 3 characters)."""
    out = set()
    pid = _str(ds, "PatientID")
    if pid:
        out.add(pid)
    name = _str(ds, "PatientName")
    if name:
        out.add(name)
        out.update(p for p in re.split(r"[\^= ]+", name) if len(p) >= 3)
    return out


def _frames(ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def _dicom_series(
    instances: list[_Instance], rules: MatchRules, report: ImportReport, include_derived: bool = False
) -> SeriesInfo | None:
    """Decide one (study, series, TE, TR) group: a SeriesInfo, or a skip entry.

    ImageType DERIVED is skipped unless ``include_derived``: scanners mark distortion-
    corrected or filtered series DERIVED although their contrast is the acquired one.
    Synthetic images (SyntheticData YES, e.g. this node's own output) are never included:
    training on them would teach the model its own errors.
    """
    rep = instances[0].ds
    series_uid = _str(rep, "SeriesInstanceUID")
    te_label = "" if instances[0].te is None else f" TE {instances[0].te:g}"
    label = f"series {series_uid}{te_label} ({len(instances)} file{'s' * (len(instances) != 1)})"
    sop_class = _str(rep, "SOPClassUID")
    ok, why = check_eligibility(rep, rules)
    if ok and sop_class not in SUPPORTED_SOP_CLASSES:
        name = UID(sop_class).name if sop_class else "(none)"
        ok, why = False, f"SOP class {name} is not MR Image Storage or Enhanced MR"
    notes: list[str] = []
    if ok and _str(rep, "SyntheticData").upper() == "YES":
        ok, why = False, "SyntheticData YES: a synthetic image (e.g. rtcontrast output), never a training input"
    if ok:
        image_type = [str(v).upper() for v in (rep.get("ImageType") or [])]
        if image_type and image_type[0] == "DERIVED":
            shown = "\\".join(image_type)
            if include_derived:
                notes.append(f"ImageType '{shown}' (derived, e.g. distortion-corrected): included by --include-derived")
            else:
                ok, why = False, (f"ImageType '{shown}' is a derived image, not an acquired series "
                                  "(scanner-corrected series: scan with --include-derived)")
    if ok:
        sizes = {(int(i.ds.get("Rows", 0) or 0), int(i.ds.get("Columns", 0) or 0)) for i in instances}
        if len(sizes) > 1:
            ok, why = False, f"mixed matrix sizes in one series: {sorted(sizes)}"
    if not ok:
        report.skipped.append((label, why))
        return None
    te, tr = instances[0].te, instances[0].tr
    assert te is not None and tr is not None  # check_eligibility refused missing TE/TR
    rows, cols = next(iter(sizes))
    pid = _str(rep, "PatientID")
    if not pid:
        notes.append("no PatientID: patient taken as the study")
    try:
        number = int(rep.get("SeriesNumber")) if rep.get("SeriesNumber") not in (None, "") else None
    except (TypeError, ValueError):
        number = None
    return SeriesInfo(
        patient_hash=patient_hash(pid or "study:" + _str(rep, "StudyInstanceUID")),
        study_uid=_str(rep, "StudyInstanceUID"),
        series_uid=series_uid,
        for_uid=_str(rep, "FrameOfReferenceUID"),
        te_ms=float(te),
        tr_ms=float(tr),
        n_slices=sum(_frames(i.ds) for i in instances),
        rows=rows,
        cols=cols,
        paths=sorted(i.path for i in instances),
        source="dicom",
        description=_str(rep, "SeriesDescription"),
        series_number=number,
        recognised=why,
        notes=notes,
    )


def _scan_dicom(files: list[Path], rules: MatchRules, report: ImportReport, include_derived: bool = False) -> None:
    groups: dict[tuple[str, str, float | None, float | None], list[_Instance]] = defaultdict(list)
    seen_sop: dict[str, Path] = {}
    for path in files:
        try:
            ds = _read_header(path)
        except InvalidDicomError:
            report.skipped.append((str(path), "not DICOM (no DICM preamble / File Meta Information)"))
            continue
        except PermissionError:
            report.skipped.append((str(path), "unreadable: permission denied"))
            continue
        except Exception as exc:  # truncated or corrupt files raise many types
            report.skipped.append((str(path), f"unreadable DICOM: {type(exc).__name__}: {exc}"))
            continue
        report._redact |= _sensitive_tokens(ds)
        if _str(ds, "SOPClassUID") == "1.2.840.10008.1.3.10":
            report.skipped.append((str(path), "DICOMDIR (media directory): not an image"))
            continue
        missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if not _str(ds, k)]
        if missing:
            report.skipped.append(
                (str(path), f"incomplete DICOM header (truncated?): no {', '.join(missing)}, cannot be grouped into a series")
            )
            continue
        sop = _str(ds, "SOPInstanceUID")
        if sop in seen_sop:
            report.skipped.append((str(path), f"duplicate: same SOP instance as {report._rel(seen_sop[sop])} ({sop})"))
            continue
        seen_sop[sop] = path
        try:
            te, tr = header_te_tr(ds)
        except (TypeError, ValueError) as exc:
            report.skipped.append((str(path), f"TE/TR not a number: {exc}"))
            continue
        key_te = None if te is None else round(te / TIMING_TOL_MS) * TIMING_TOL_MS
        key_tr = None if tr is None else round(tr / TIMING_TOL_MS) * TIMING_TOL_MS
        groups[(_str(ds, "StudyInstanceUID"), _str(ds, "SeriesInstanceUID"), key_te, key_tr)].append(
            _Instance(path, ds, te, tr)
        )
    per_series: dict[tuple[str, str], int] = defaultdict(int)
    for study, series, _, _ in groups:
        per_series[(study, series)] += 1
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2] or -1.0, k[3] or -1.0)):
        info = _dicom_series(sorted(groups[key], key=lambda i: i.path), rules, report, include_derived)
        if info is None:
            continue
        n = per_series[(key[0], key[1])]
        if n > 1:
            info.notes.append(f"multi-echo series split by TE/TR: one of {n} echoes")
        report.series.append(info)


# -- pairing, scan, load -----------------------------------------------------------------
def _pair(series: Iterable[SeriesInfo]) -> list[PairedGroup]:
    by_for: dict[tuple[str, str], list[SeriesInfo]] = defaultdict(list)
    for s in series:
        if s.for_uid:
            by_for[(s.patient_hash, s.for_uid)].append(s)
    groups = []
    for (patient, for_uid), members in sorted(by_for.items()):
        if len(members) >= 2 and len({m.contrast for m in members}) >= 2:
            groups.append(PairedGroup(patient, for_uid, sorted(members, key=lambda m: m.contrast)))
    return groups


def _walk(root: Path, report: ImportReport) -> list[Path]:
    out = []

    def unreadable(exc: OSError) -> None:
        report.skipped.append((str(exc.filename), f"unreadable folder: {exc.strerror}"))

    for d, dirs, files in os.walk(root, onerror=unreadable):
        dirs.sort()
        for f in sorted(files):
            out.append(Path(d) / f)
    return out


def scan(root: Path | str, rules: MatchRules | None = None, include_derived: bool = False) -> ImportReport:
    """Walk ``root`` and report usable spin-echo series, paired groups and skipped files.

    Only headers are read.  ``rules`` defaults to the protocol's default ``match`` rules
    (the node's own notion of an eligible series).  ``include_derived`` also takes series
    whose ImageType is DERIVED (not synthetic ones).  Raises FileNotFoundError /
    NotADirectoryError when ``root`` is not a folder.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a folder")
    rules = rules or load_protocol(None).match
    report = ImportReport(root=root)
    files = _walk(root, report)
    report.files_scanned = len(files)
    named_nifti = {p for p in files if _nifti_stem(p) is not None}
    nifti = []
    for p in sorted(named_nifti):
        if _is_nifti_magic(p):
            nifti.append(p)
        else:
            report.skipped.append((str(p), "named like NIfTI but not a NIfTI-1/2 file (no magic)"))
    nifti_stems = {(p.parent, _nifti_stem(p)) for p in nifti}
    dicom_candidates = []
    for p in files:
        if p in named_nifti:
            continue
        if p.suffix.lower() == ".json":
            if (p.parent, p.stem) not in nifti_stems:
                report.skipped.append((str(p), "JSON file without a NIfTI image of the same name"))
            continue
        dicom_candidates.append(p)
    _scan_dicom(dicom_candidates, rules, report, include_derived)
    _scan_nifti(nifti, root, rules, report)
    report.series.sort(key=lambda s: (s.patient_hash, s.study_uid, s.series_uid, s.contrast))
    report.paired_groups = _pair(report.series)
    return report


def load_series(info: SeriesInfo) -> tuple[np.ndarray, float, float]:
    """Pixels float32 [N,H,W] (after the Modality LUT, sorted along the slice normal), TE, TR (ms).

    DICOM goes through :func:`rtcontrast.dicom.volume.assemble` (full validation: geometry,
    spacing, duplicates); raises :class:`rtcontrast.dicom.volume.VolumeError` naming the problem.
    NIfTI is reoriented from (x, y, z) to [z, y, x] with nibabel's scaling applied.
    """
    if info.source == "dicom":
        vol = assemble(info.paths)
        if vol.te_ms is not None and abs(vol.te_ms - info.te_ms) > TIMING_TOL_MS:
            raise ValueError(f"series {info.series_uid}: files now say TE {vol.te_ms} ms, scan said {info.te_ms} ms")
        return vol.pixels, info.te_ms, info.tr_ms
    if info.source == "nifti":
        import nibabel as nib

        data = np.asarray(nib.load(str(info.paths[0])).get_fdata(dtype=np.float32))
        if data.ndim == 4:
            data = data[..., 0]
        if data.ndim == 2:
            data = data[:, :, None]
        return np.ascontiguousarray(np.transpose(data, (2, 1, 0))), info.te_ms, info.tr_ms
    raise ValueError(f"unknown source {info.source!r}")


# -- CLI ------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``scan FOLDER [--json out.json]``: 0 when something usable was found, 2 otherwise."""
    ap = argparse.ArgumentParser(prog="python -m rtcontrast.research.importer", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("scan", help="report the usable spin-echo series under FOLDER")
    sp.add_argument("folder", type=Path)
    sp.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    sp.add_argument("--include-derived", action="store_true",
                    help="also use series whose ImageType is DERIVED (e.g. distortion-corrected by the scanner); "
                         "synthetic images (SyntheticData YES) are never used")
    args = ap.parse_args(argv)
    try:
        report = scan(args.folder, include_derived=args.include_derived)
    except (FileNotFoundError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    if not report.series:
        print(f"error: no usable spin-echo series found under {report.redact(str(args.folder))} "
              f"({len(report.skipped)} files/series skipped, reasons above)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
