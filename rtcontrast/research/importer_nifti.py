"""NIfTI (+ BIDS JSON sidecar) series for the importer: timing from the sidecar, a header built for
the protocol's match rules, a pseudonymous patient from the folder name.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from rtcontrast.settings.protocol import MatchRules
from rtcontrast.dicom.eligibility import check_eligibility
from rtcontrast.research.import_report import _NIFTI_SUFFIXES, ImportReport, SeriesInfo, patient_hash


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
