"""Which received series a protocol's match rules accept, and why not (a reason a person reads).

Reads the header only: modality, SOP class, scanning sequence (classic or Enhanced MR
functional groups), TE/TR, echo train, series description and number rules.
"""

from __future__ import annotations

import re
from typing import Any

from pydicom.dataset import Dataset

from rtcontrast.dicom.derive import NodeIdentity
from rtcontrast.settings.protocol import MatchRules, ProtocolConfig


# -- eligibility --------------------------------------------------------------------
_SS_NAMES = {
    "SE": "spin echo",
    "IR": "inversion recovery",
    "GR": "gradient echo",
    "EP": "echo planar",
    "RM": "research mode",
}
_SV_NAMES = {
    "SK": "segmented k-space",
    "MTC": "magnetization transfer contrast",
    "SS": "steady state",
    "TRSS": "time reversed steady state",
    "SP": "spoiled",
    "MP": "magnetization prepared",
    "OSP": "oversampling phase",
    "NONE": "no variant",
}
_FSE_NAME_RE = re.compile(r"tse|fse|rare|haste|turbo|frfse", re.IGNORECASE)


def _text(value: Any) -> list[str]:
    """A (possibly multi-valued) string attribute as a list of stripped upper-case values."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        vals = [str(v) for v in value]
    else:
        vals = str(value).split("\\")
    return [v.strip().upper() for v in vals if v.strip()]


def _lookup(ds: Dataset, keyword: str) -> Any:
    """``keyword`` at the top level, else in the first item of any functional group macro.

    Enhanced MR keeps most acquisition attributes in the Shared (or first Per-Frame)
    Functional Groups, e.g. RepetitionTime in MRTimingAndRelatedParametersSequence.
    """
    if keyword in ds and ds[keyword].value not in (None, ""):
        return ds[keyword].value
    for group_kw in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = ds.get(group_kw)
        if not groups:
            continue
        for elem in groups[0]:
            if elem.VR == "SQ" and elem.value:
                item = elem.value[0]
                if keyword in item and item[keyword].value not in (None, ""):
                    return item[keyword].value
    return None


#: Enhanced MR Image Storage and Enhanced MR Color Image Storage: MR Pulse Sequence module
#: (EchoPulseSequence) instead of ScanningSequence, TE/TR in functional group macros.
ENHANCED_MR_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.3"})


def is_enhanced(ds: Dataset) -> bool:
    """True for an Enhanced MR header: its SOP class, or functional groups.

    By SOP class too: a real Enhanced MR object may carry EchoPulseSequence at the top
    level with no functional groups in the header read (pydicom-data ``emri_small.dcm``),
    and asking it for ScanningSequence (a classic MR attribute) is wrong (#15 finding 10).
    """
    return (str(ds.get("SOPClassUID", "")) in ENHANCED_MR_SOP_CLASSES
            or "SharedFunctionalGroupsSequence" in ds or "PerFrameFunctionalGroupsSequence" in ds)


def _number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    return None if value is None else float(value)


def header_te_tr(ds: Dataset) -> tuple[float | None, float | None]:
    """(TE, TR) in ms from a classic or Enhanced MR header; None where absent.

    Raises ValueError when a value is present but not a number.
    """
    te_raw = _lookup(ds, "EffectiveEchoTime") if is_enhanced(ds) else None
    if te_raw is None:
        te_raw = _lookup(ds, "EchoTime")
    return _number(te_raw), _number(_lookup(ds, "RepetitionTime"))


def _echo_train(ds: Dataset) -> int:
    for kw in ("EchoTrainLength", "RFEchoTrainLength"):
        v = _lookup(ds, kw)
        try:
            if v is not None:
                return int(v)
        except (TypeError, ValueError):
            continue
    return 1


def _fse(ds: Dataset) -> str | None:
    """Why the series is fast/turbo spin echo, or None."""
    etl = _echo_train(ds)
    if etl > 1:
        return f"EchoTrainLength {etl}"
    name = str(ds.get("SequenceName", "") or _lookup(ds, "PulseSequenceName") or "")
    if _FSE_NAME_RE.search(name):
        return f"SequenceName '{name}'"
    opts = _text(ds.get("ScanOptions"))
    hit = [o for o in opts if "FSE" in o or "FAST_GEMS" in o or "TSE" in o]
    if hit:
        return "ScanOptions '" + "\\".join(opts) + "'"
    return None


def _sequence_checks(ds: Dataset, rules: MatchRules) -> str | None:
    if is_enhanced(ds):
        eps = str(_lookup(ds, "EchoPulseSequence") or "").strip().upper()
        if not eps:
            return "EchoPulseSequence missing: cannot tell spin-echo from gradient echo"
        if eps == "GRADIENT":
            return "EchoPulseSequence 'GRADIENT' is gradient echo: not spin-echo"
        if eps == "BOTH":
            return "EchoPulseSequence 'BOTH' is mixed spin/gradient echo: not spin-echo"
        if eps != "SPIN":
            return f"EchoPulseSequence '{eps}' is not SPIN"
        if "IR" in rules.scanning_sequence_exclude and str(_lookup(ds, "InversionRecovery") or "").upper() == "YES":
            return "InversionRecovery 'YES' is inversion recovery: not plain spin-echo"
        if "EP" in rules.scanning_sequence_exclude and str(_lookup(ds, "EchoPlanarPulseSequence") or "").upper() == "YES":
            return "EchoPlanarPulseSequence 'YES' is echo planar: not spin-echo"
        return None
    ss = _text(ds.get("ScanningSequence"))
    if not ss:
        return "ScanningSequence missing"
    shown = "\\".join(ss)
    for code in rules.scanning_sequence_exclude:
        if code in ss:
            suffix = "not plain spin-echo" if "SE" in ss else "not spin-echo"
            return f"ScanningSequence '{shown}' is {_SS_NAMES[code]}: {suffix}"
    for code in rules.scanning_sequence_include:
        if code not in ss:
            return f"ScanningSequence '{shown}' does not include {code} ({_SS_NAMES[code]})"
    sv = _text(ds.get("SequenceVariant"))
    for code in rules.sequence_variant_exclude:
        if code in sv:
            shown_sv = "\\".join(sv)
            return f"SequenceVariant '{shown_sv}' includes {code} ({_SV_NAMES[code]}): not plain spin-echo"
    return None


def _loop(header: Dataset, rules: MatchRules, own: NodeIdentity | None) -> str | None:
    """Why this input is (probably) this node's own output coming back, or None.

    A PACS or TPS forwarding rule that sends everything back to the node made it process
    its own synthetic series as new input: the TPS ended with two of every series (#15
    finding 7).
    """
    if rules.exclude_synthetic and str(header.get("SyntheticData", "") or "").strip().upper() == "YES":
        return "SyntheticData YES: a synthetic (derived) series is not an acquisition (loop guard, match.exclude_synthetic)"
    if not (rules.exclude_own_output and own is not None):
        return None
    equipment = tuple(str(header.get(k, "") or "").strip()
                      for k in ("Manufacturer", "ManufacturerModelName", "DeviceSerialNumber"))
    if equipment == (own.manufacturer, own.model_name, own.device_serial_number):
        return (f"made by this node (Manufacturer '{equipment[0]}', ManufacturerModelName '{equipment[1]}', "
                f"DeviceSerialNumber '{equipment[2]}'): loop guard, match.exclude_own_output")
    if own.uid_root:
        for kw in ("SeriesInstanceUID", "SOPInstanceUID"):
            if str(header.get(kw, "") or "").startswith(own.uid_root):
                return f"{kw} has this node's uid_root {own.uid_root}: loop guard, match.exclude_own_output"
    return None


def check_eligibility(
    header: Dataset, rules: MatchRules | ProtocolConfig, calling_ae: str | None = None,
    own: NodeIdentity | None = None,
) -> tuple[bool, str]:
    """Is this series (one representative header) eligible?  ``(ok, reason)``.

    Checks, in order: Modality, loops (``SyntheticData YES``, or ``own`` - this node's
    equipment identity or UID root - when the match rules exclude them), calling AE, sequence type (classic ScanningSequence /
    SequenceVariant, or Enhanced MR EchoPulseSequence and modifiers), fast spin echo
    (allowed unless ``allow_fse`` is false), TE and TR present and positive, then the
    SeriesDescription / ProtocolName / BodyPartExamined regexes (``re.search``).  The
    reason of a refusal names the attribute, its value and why; on success it says what
    was recognised.
    """
    if isinstance(rules, ProtocolConfig):
        rules = rules.match
    modality = str(header.get("Modality", "") or "").strip()
    if not modality:
        return False, "Modality missing"
    if modality.upper() != rules.modality.upper():
        return False, f"Modality '{modality}' is not {rules.modality}"
    loop = _loop(header, rules, own)
    if loop:
        return False, loop
    if rules.calling_aes:
        ae = (calling_ae or "").strip()
        if ae not in rules.calling_aes:
            return False, f"calling AE '{ae}' is not one of the protocol's calling_aes ({', '.join(rules.calling_aes)})"
    why = _sequence_checks(header, rules)
    if why:
        return False, why
    fse = _fse(header)
    if fse and not rules.allow_fse:
        return False, f"fast/turbo spin-echo ({fse}) and the protocol has allow_fse false"
    try:
        te, tr = header_te_tr(header)
    except (TypeError, ValueError) as exc:
        return False, f"TE/TR not a number: {exc}"
    if te is None:
        return False, "TE missing"
    if tr is None:
        return False, "TR missing"
    if te <= 0:
        return False, f"TE {te:g} ms is not positive"
    if tr <= 0:
        return False, f"TR {tr:g} ms is not positive"
    for kw, pattern in (
        ("SeriesDescription", rules.series_description_regex),
        ("ProtocolName", rules.protocol_name_regex),
        ("BodyPartExamined", rules.body_part_regex),
    ):
        if pattern is None:
            continue
        value = str(header.get(kw, "") or "")
        if not re.search(pattern, value):
            return False, f"{kw} '{value}' does not match '{pattern}'"
    kind = f"fast spin-echo ({fse})" if fse else "spin-echo"
    return True, f"eligible: {kind}, TE {te:g} ms, TR {tr:g} ms"


__all__ = ["check_eligibility", "header_te_tr", "is_enhanced"]
