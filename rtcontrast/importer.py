"""Import a researcher's own spin-echo data from a folder: what is usable, what is not, and why.

Why: a hospital physicist who wants to fine-tune or evaluate on their own patients has a
folder of exported DICOM (any file names, nested any way, often with junk: CT, localisers,
gradient-echo series, DICOMDIR, text files) and perhaps NIfTI converted with dcm2niix.
Usually one or two spin-echo contrasts per patient, no maps.  :func:`scan` reads headers
only (fast), recognises spin-echo series with the same rules the node uses
(:func:`rtcontrast.protocol.check_eligibility`, default ``match`` rules), and reports:

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

CLI: ``python -m rtcontrast.importer scan FOLDER [--json out.json]``.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from rtcontrast.protocol import MatchRules, check_eligibility, header_te_tr, load_protocol
from rtcontrast.volume import SUPPORTED_SOP_CLASSES, assemble

#: Header elements read by :func:`scan` (pixels are never read).
HEADER_TAGS: tuple[str, ...] = (
    "SOPClassUID", "SOPInstanceUID", "Modality", "PatientID", "PatientName",
    "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SeriesNumber",
    "SeriesDescription", "ProtocolName", "BodyPartExamined", "ImageType",
    "ScanningSequence", "SequenceVariant", "ScanOptions", "SequenceName", "EchoTrainLength",
    "RFEchoTrainLength", "EchoTime", "RepetitionTime", "Rows", "Columns", "NumberOfFrames",
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
    "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence", "EchoPulseSequence",
    "InversionRecovery", "EchoPlanarPulseSequence", "PulseSequenceName",
)
#: TE/TR closer than this (ms) are the same contrast.
TIMING_TOL_MS = 0.01
#: Characters of the SHA-256 hex digest that name a patient.
HASH_CHARS = 12

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
Source = Literal["dicom", "nifti"]


def patient_hash(patient_id: str) -> str:
    """Short SHA-256 of a PatientID: stable across runs, never the ID itself."""
    return hashlib.sha256(patient_id.encode("utf-8")).hexdigest()[:HASH_CHARS]


@dataclass
class SeriesInfo:
    """One usable spin-echo series (or one echo of a multi-echo series)."""

    patient_hash: str
    study_uid: str
    series_uid: str
    for_uid: str
    te_ms: float
    tr_ms: float
    n_slices: int
    rows: int
    cols: int
    paths: list[Path]
    source: Source
    description: str = ""
    series_number: int | None = None
    recognised: str = ""  # check_eligibility's reason, e.g. "eligible: spin-echo, TE 8 ms, TR 500 ms"
    notes: list[str] = field(default_factory=list)

    @property
    def contrast(self) -> tuple[float, float]:
        """(TE, TR) in ms."""
        return (self.te_ms, self.tr_ms)


@dataclass
class PairedGroup:
    """>= 2 eligible series of one patient in one frame of reference with different TE/TR."""

    patient_hash: str
    for_uid: str
    series: list[SeriesInfo]

    @property
    def contrasts(self) -> list[tuple[float, float]]:
        """Distinct (TE, TR) in ms, sorted."""
        return sorted({s.contrast for s in self.series})

    @property
    def same_matrix(self) -> bool:
        """All series have the same slices x rows x columns.

        Why: voxel-wise use (a fit, a paired loss) needs one grid; same matrix is necessary,
        not sufficient (positions/spacing are checked when the volumes are loaded).
        """
        return len({(s.n_slices, s.rows, s.cols) for s in self.series}) == 1


@dataclass
class ImportReport:
    """What :func:`scan` found under ``root``."""

    root: Path
    series: list[SeriesInfo] = field(default_factory=list)
    paired_groups: list[PairedGroup] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path or "series <uid>", reason)
    files_scanned: int = 0
    _redact: set[str] = field(default_factory=set, repr=False)

    @property
    def patients(self) -> dict[str, list[SeriesInfo]]:
        """Patient hash -> its eligible series (patients with none are not listed)."""
        out: dict[str, list[SeriesInfo]] = defaultdict(list)
        for s in self.series:
            out[s.patient_hash].append(s)
        return dict(out)

    @property
    def contrasts(self) -> dict[tuple[float, float], int]:
        """(TE, TR) -> number of series with it."""
        out: dict[tuple[float, float], int] = defaultdict(int)
        for s in self.series:
            out[s.contrast] += 1
        return dict(sorted(out.items()))

    def redact(self, text: str) -> str:
        """``text`` with every PatientID / PatientName component seen in the headers replaced."""
        for token in sorted(self._redact, key=len, reverse=True):
            text = re.sub(re.escape(token), "***", text, flags=re.IGNORECASE)
        return text

    def _rel(self, p: Path | str) -> str:
        try:
            s = str(Path(p).relative_to(self.root))
        except ValueError:
            s = str(p)
        return self.redact(s)

    def summary(self) -> str:
        """A human table: patients, series, contrasts, paired groups, skipped with reasons."""
        lines = [
            f"Scanned {self.files_scanned} files under {self.redact(str(self.root))}",
            f"  patients: {len(self.patients)}   spin-echo series: {len(self.series)}   "
            f"paired groups: {len(self.paired_groups)}   skipped: {len(self.skipped)}",
            "",
        ]
        if self.series:
            head = f"  {'patient':<12}  {'source':<6}  {'series':<12}  {'TE ms':>7}  {'TR ms':>7}  {'slices':>6}  {'matrix':>9}  {'FoR':<8}  description"
            lines += ["Series:", head]
            for s in sorted(self.series, key=lambda s: (s.patient_hash, s.study_uid, s.series_uid, s.contrast)):
                lines.append(
                    f"  {s.patient_hash:<12}  {s.source:<6}  {_short(s.series_uid):<12}  {s.te_ms:>7g}  {s.tr_ms:>7g}  "
                    f"{s.n_slices:>6}  {f'{s.rows}x{s.cols}':>9}  {_short(s.for_uid, 8):<8}  {self.redact(s.description)}"
                )
                for note in s.notes:
                    lines.append(f"  {'':<12}  note: {self.redact(note)}")
            lines += ["", "Contrasts (TE/TR ms): " + ", ".join(f"{te:g}/{tr:g} x{n}" for (te, tr), n in self.contrasts.items())]
        lines += ["", f"Paired groups ({len(self.paired_groups)}): >= 2 contrasts of one patient in one frame of reference"]
        for g in self.paired_groups:
            c = " + ".join(f"{te:g}/{tr:g}" for te, tr in g.contrasts)
            same = "same matrix" if g.same_matrix else "different matrices"
            lines.append(f"  patient {g.patient_hash}  FoR {_short(g.for_uid)}: {len(g.series)} series, TE/TR {c} ({same})")
        if not self.paired_groups:
            lines.append("  none")
        lines += ["", f"Skipped ({len(self.skipped)}):"]
        counts: dict[str, int] = defaultdict(int)
        for _, reason in self.skipped:
            counts[_reason_kind(reason)] += 1
        for kind, n in sorted(counts.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {n:>4} x {self.redact(kind)}")
        for what, reason in self.skipped:
            shown = what if what.startswith("series ") else self._rel(what)
            lines.append(f"    {self.redact(shown)}: {self.redact(reason)}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (paths relative to the root, redacted; no PatientID/PatientName)."""
        return {
            "root": self.redact(str(self.root)),
            "files_scanned": self.files_scanned,
            "patients": sorted(self.patients),
            "series": [
                {
                    "patient_hash": s.patient_hash,
                    "study_uid": s.study_uid,
                    "series_uid": s.series_uid,
                    "for_uid": s.for_uid,
                    "te_ms": s.te_ms,
                    "tr_ms": s.tr_ms,
                    "n_slices": s.n_slices,
                    "rows": s.rows,
                    "cols": s.cols,
                    "source": s.source,
                    "series_number": s.series_number,
                    "description": self.redact(s.description),
                    "recognised": s.recognised,
                    "notes": [self.redact(n) for n in s.notes],
                    "paths": [self._rel(p) for p in s.paths],
                }
                for s in self.series
            ],
            "paired_groups": [
                {
                    "patient_hash": g.patient_hash,
                    "for_uid": g.for_uid,
                    "series_uids": [s.series_uid for s in g.series],
                    "contrasts": g.contrasts,
                }
                for g in self.paired_groups
            ],
            "skipped": [
                {"what": w if w.startswith("series ") else self._rel(w), "reason": self.redact(r)} for w, r in self.skipped
            ],
        }


def _short(uid: str, n: int = 12) -> str:
    """The last ``n`` characters of a UID (enough to tell series apart in a table)."""
    return uid if len(uid) <= n else "…" + uid[-(n - 1):]


def _reason_kind(reason: str) -> str:
    """Group reasons for the counts: drop the variable tail after the first ':' or '('."""
    return re.split(r"[:(]", reason, maxsplit=1)[0].strip() or reason


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
    instances: list[_Instance], rules: MatchRules, report: ImportReport
) -> SeriesInfo | None:
    """Decide one (study, series, TE, TR) group: a SeriesInfo, or a skip entry."""
    rep = instances[0].ds
    series_uid = _str(rep, "SeriesInstanceUID")
    te_label = "" if instances[0].te is None else f" TE {instances[0].te:g}"
    label = f"series {series_uid}{te_label} ({len(instances)} file{'s' * (len(instances) != 1)})"
    sop_class = _str(rep, "SOPClassUID")
    ok, why = check_eligibility(rep, rules)
    if ok and sop_class not in SUPPORTED_SOP_CLASSES:
        name = UID(sop_class).name if sop_class else "(none)"
        ok, why = False, f"SOP class {name} is not MR Image Storage or Enhanced MR"
    if ok:
        image_type = [str(v).upper() for v in (rep.get("ImageType") or [])]
        if image_type and image_type[0] == "DERIVED":
            shown = "\\".join(image_type)
            ok, why = False, f"ImageType '{shown}' is a derived image, not an acquired series"
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
    notes = []
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


def _scan_dicom(files: list[Path], rules: MatchRules, report: ImportReport) -> None:
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
        info = _dicom_series(sorted(groups[key], key=lambda i: i.path), rules, report)
        if info is None:
            continue
        n = per_series[(key[0], key[1])]
        if n > 1:
            info.notes.append(f"multi-echo series split by TE/TR: one of {n} echoes")
        report.series.append(info)


# -- NIfTI ----------------------------------------------------------------------------
def _nifti_stem(path: Path) -> str | None:
    name = path.name
    for suffix in _NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _is_nifti_magic(path: Path) -> bool:
    """NIfTI-1/2 magic at byte 344 ('n+1'/'ni1') or 4 ('n+2'/'ni2'), gzip or not."""
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as f:
            head = f.read(352)
    except (OSError, EOFError):
        return False
    return head[344:347] in (b"n+1", b"ni1") or head[4:7] in (b"n+2", b"ni2")


def _sidecar_timing(meta: dict[str, Any]) -> tuple[float | None, float | None, str | None]:
    """(TE ms, TR ms, problem) from a sidecar: te_ms/tr_ms (ms) or BIDS EchoTime/RepetitionTime (s)."""

    def num(key: str) -> float | None:
        v = meta.get(key)
        if v is None:
            return None
        if isinstance(v, list):  # multi-echo BIDS lists: not one contrast
            raise ValueError(f"{key} is a list {v}: one contrast per file expected")
        return float(v)

    try:
        te = num("te_ms")
        tr = num("tr_ms")
        if te is None and meta.get("EchoTime") is not None:
            te_s = num("EchoTime")
            assert te_s is not None
            if te_s >= 1.0:
                return None, None, (f"sidecar EchoTime {te_s:g}: BIDS EchoTime is in seconds and {te_s:g} s is "
                                    "impossible for spin-echo; write te_ms for milliseconds")
            te = te_s * 1000.0
        if tr is None and meta.get("RepetitionTime") is not None:
            tr_s = num("RepetitionTime")
            assert tr_s is not None
            if tr_s >= 100.0:
                return None, None, (f"sidecar RepetitionTime {tr_s:g}: BIDS RepetitionTime is in seconds and "
                                    f"{tr_s:g} s is implausible; write tr_ms for milliseconds")
            tr = tr_s * 1000.0
    except (TypeError, ValueError) as exc:
        return None, None, f"sidecar TE/TR not a number: {exc}"
    return te, tr, None


def _sidecar_header(meta: dict[str, Any], te: float | None, tr: float | None) -> tuple[Dataset, list[str]]:
    """A pseudo-header so the same eligibility rules apply to NIfTI as to DICOM."""
    ds = Dataset()
    notes = []
    ds.Modality = str(meta.get("Modality", "MR"))
    ss = meta.get("ScanningSequence")
    if ss is None:
        ds.ScanningSequence = "SE"
        notes.append("sidecar does not state ScanningSequence: spin-echo assumed")
    else:
        ds.ScanningSequence = [p for p in re.split(r"[_\\ ]+", str(ss)) if p]
    sv = meta.get("SequenceVariant")
    if sv is not None:
        ds.SequenceVariant = [p for p in re.split(r"[_\\ ]+", str(sv)) if p]
    for key in ("EchoTrainLength", "SequenceName", "SeriesDescription", "ProtocolName", "BodyPartExamined"):
        if meta.get(key) is not None:
            setattr(ds, key, meta[key])
    if te is not None:
        ds.EchoTime = te
    if tr is not None:
        ds.RepetitionTime = tr
    return ds, notes


def _nifti_patient(path: Path, root: Path, meta: dict[str, Any]) -> tuple[str, str]:
    """(patient key, session folder) of a NIfTI file: BIDS sub-/ses- folders, sidecar, parent folder."""
    parts = path.relative_to(root).parts[:-1]
    folder = str(Path(*parts)) if parts else "."
    sub = next((p for p in parts if p.startswith("sub-")), None)
    if sub:
        ses = next((p for p in parts if p.startswith("ses-")), None)
        return sub, sub + ("/" + ses if ses else "")
    if meta.get("PatientID"):
        return str(meta["PatientID"]), folder
    return folder, folder


def _scan_nifti(files: list[Path], root: Path, rules: MatchRules, report: ImportReport) -> None:
    try:
        import nibabel as nib  # optional dependency (the node itself never needs NIfTI)
    except ImportError:
        for p in files:
            report.skipped.append((str(p), "NIfTI file: nibabel not installed (pip install nibabel) so it cannot be read"))
        return

    for path in files:
        stem = _nifti_stem(path)
        sidecar = path.with_name(f"{stem}.json")
        if not sidecar.is_file():
            report.skipped.append((str(path), f"NIfTI without JSON sidecar {sidecar.name} (TE/TR unknown)"))
            continue
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            report.skipped.append((str(path), f"sidecar {sidecar.name} unreadable: {exc}"))
            continue
        for k in ("PatientID", "PatientName"):
            if meta.get(k):
                report._redact.add(str(meta[k]))
        te, tr, problem = _sidecar_timing(meta)
        if problem:
            report.skipped.append((str(path), problem))
            continue
        hdr, notes = _sidecar_header(meta, te, tr)
        ok, why = check_eligibility(hdr, rules)
        if not ok:
            report.skipped.append((str(path), why))
            continue
        try:
            img = nib.load(str(path))
            shape = tuple(int(n) for n in img.shape)
            affine = np.asarray(img.affine, dtype=np.float64)
        except Exception as exc:  # nibabel raises many types for corrupt files
            report.skipped.append((str(path), f"unreadable NIfTI: {type(exc).__name__}: {exc}"))
            continue
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) == 2:
            shape = (*shape, 1)
        if len(shape) != 3:
            report.skipped.append((str(path), f"NIfTI of shape {shape}: one 3D contrast per file expected"))
            continue
        patient, session = _nifti_patient(path, root, meta)
        grid = hashlib.sha256(f"{session}|{shape}|{np.round(affine, 3).tolist()}".encode()).hexdigest()[:24]
        rel = str(path.relative_to(root))
        assert te is not None and tr is not None
        report.series.append(
            SeriesInfo(
                patient_hash=patient_hash(patient),
                study_uid=str(meta.get("StudyInstanceUID") or f"nifti:{session}"),
                series_uid=str(meta.get("SeriesInstanceUID") or f"nifti:{rel}"),
                for_uid=str(meta.get("FrameOfReferenceUID") or f"nifti-grid:{grid}"),
                te_ms=float(te),
                tr_ms=float(tr),
                n_slices=shape[2],
                rows=shape[1],
                cols=shape[0],
                paths=[path],
                source="nifti",
                description=str(meta.get("SeriesDescription") or stem),
                recognised=why,
                notes=notes,
            )
        )


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


def scan(root: Path | str, rules: MatchRules | None = None) -> ImportReport:
    """Walk ``root`` and report usable spin-echo series, paired groups and skipped files.

    Only headers are read.  ``rules`` defaults to the protocol's default ``match`` rules
    (the node's own notion of an eligible series).  Raises FileNotFoundError /
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
    _scan_dicom(dicom_candidates, rules, report)
    _scan_nifti(nifti, root, rules, report)
    report.series.sort(key=lambda s: (s.patient_hash, s.study_uid, s.series_uid, s.contrast))
    report.paired_groups = _pair(report.series)
    return report


def load_series(info: SeriesInfo) -> tuple[np.ndarray, float, float]:
    """Pixels float32 [N,H,W] (after the Modality LUT, sorted along the slice normal), TE, TR (ms).

    DICOM goes through :func:`rtcontrast.volume.assemble` (full validation: geometry,
    spacing, duplicates); raises :class:`rtcontrast.volume.VolumeError` naming the problem.
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
    ap = argparse.ArgumentParser(prog="python -m rtcontrast.importer", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("scan", help="report the usable spin-echo series under FOLDER")
    sp.add_argument("folder", type=Path)
    sp.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    args = ap.parse_args(argv)
    try:
        report = scan(args.folder)
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
