"""The text of derived objects that a person reads: numbers as DICOM DS, the model and the
source series in words, the provenance line in ImageComments.

Kept apart from the writers so that every object type (contrast series, classic maps,
Parametric Maps) says the same thing the same way: a planner reads ImageComments in the
TPS, and it must name the source series by number and description, not by UID.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TYPE_CHECKING

from pydicom.valuerep import format_number_as_ds

from rtcontrast.dicom.volume import Volume

if TYPE_CHECKING:  # derive imports this module; the type is only named here
    from rtcontrast.dicom.derive import ModelIdentity


def fit_ds(value: Any) -> Any:
    """A DS value (one number or several) with every number within DS's 16 characters.

    Numbers that already fit are kept exactly as the source wrote them (geometry is never
    moved); longer ones (e.g. ``2.0833333333333335``, 18 characters) are rewritten by
    pydicom's :func:`~pydicom.valuerep.format_number_as_ds`, as precise as 16 characters allow.
    """
    if value is None or value == "":
        return value
    multi = isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, (str, bytes)))
    values = list(value) if multi else [value]
    out = []
    for v in values:
        text = getattr(v, "original_string", None) or str(v)
        out.append(text.strip() if len(text.strip()) <= 16 else format_number_as_ds(float(v)))
    return out if multi else out[0]


def _ds_number(value: float) -> str:
    """A DS string of at most 16 characters, as precise as fits."""
    return format_number_as_ds(float(value))


def _model_text(model: ModelIdentity) -> str:
    return f"model {model.name} {model.version} (sha256 {model.sha256[:12]})"


def _series_name(volume: Volume) -> str:
    """``series 3 'T1 SE AX'`` (number and description as the planner sees them), UID as fallback."""
    hdr = volume.first_header
    number = hdr.get("SeriesNumber")
    desc = str(hdr.get("SeriesDescription", "") or "").strip()
    name = f"series {number}" if number not in (None, "") else f"series {volume.series_uid}"
    return f"{name} '{desc}'" if desc else name


def provenance_comment(what: str, volume: Volume, co_sources: Sequence[Volume], model: ModelIdentity,
                       qa_note: str | None = None) -> str:
    """ImageComments in words a planner reads in the TPS.

    E.g. ``synthetic spin echo TE 75 TR 4500 from series 3 'T1 SE AX', model qmap-pelvis
    1.1.0, QA passed``.  Source series by number and description (the TPS lists series that
    way, not by UID); ``qa_note`` is the QA outcome when the caller knows it.
    """
    sources = " + ".join(_series_name(v) for v in (volume, *co_sources))
    text = f"{what} from {sources}, model {model.name} {model.version}"
    if qa_note:
        text += f", {qa_note}"
    return text[:10240]


def _sources_text(volume: Volume, co_sources: Sequence[Volume]) -> str:
    text = f"series {volume.series_uid} (TE={volume.te_ms} ms, TR={volume.tr_ms} ms)"
    for v in co_sources:
        text += f" fused with series {v.series_uid} (TE={v.te_ms} ms, TR={v.tr_ms} ms)"
    return text
