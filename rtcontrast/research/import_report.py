"""What the importer found: series, paired groups and the report (counts, skips, redaction), with
patients named by a short hash only.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal




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
