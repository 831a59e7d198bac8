"""The protocol (config/protocol.yaml): what is eligible, what to produce, where to send it.

Why a separate file from the node config: the protocol is clinical content (which
series are accepted, which synthetic contrasts with which TE/TR and series numbers, which
QA thresholds), versioned and hashed into every job's audit record; the node config is
plumbing.  The node runs with no protocol file: :func:`load_protocol` (None) gives the
embedded defaults, which equal the shipped config/protocol.yaml.

Eligibility (:func:`check_eligibility`) lives here too because it is driven by the
protocol's ``match`` rules; every refusal has a reason an MR physicist can act on, e.g.
"ScanningSequence 'GR' is gradient echo: not spin-echo".  TE/TR against the model's
trained range is checked by the node (it knows the model), not here.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from rtcontrast.settings.node import (
    Loc, StrictModel, check_ae_title, check_tls_files, format_loc, load_yaml_model,
)
from rtcontrast.settings.node import ConfigError

DEFAULT_PROTOCOL = Path("config/protocol.yaml")

#: Defined terms of (0018,0020) ScanningSequence and (0018,0021) SequenceVariant.
SCANNING_SEQUENCES = ("SE", "IR", "GR", "EP", "RM")
SEQUENCE_VARIANTS = ("SK", "MTC", "SS", "TRSS", "SP", "MP", "OSP", "NONE")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: A label that already names the echo / repetition time ("TE75", "TE 75", "TE=75").
_TE_RE = re.compile(r"\bTE\s*=?\s*\d", re.IGNORECASE)
_TR_RE = re.compile(r"\bTR\s*=?\s*\d", re.IGNORECASE)


# -- models -------------------------------------------------------------------------
class DestinationTls(StrictModel):
    """TLS towards one DICOM destination: verify its certificate, optionally present ours.

    ``ca_file`` null verifies against the system CA store; ``server_hostname`` is the name
    the peer's certificate must carry when it differs from ``host`` (e.g. ``host`` is an
    address and the certificate names the DNS name).
    """

    enabled: bool = False
    ca_file: str | None = None
    cert_file: str | None = Field(None, description="client certificate (PEM), when the peer asks for one")
    key_file: str | None = Field(None, description="its private key (PEM); null: inside cert_file")
    server_hostname: str | None = None

    @model_validator(mode="after")
    def _pair(self) -> DestinationTls:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")
        if self.enabled:
            missing = [f"{n} {v!r} is not a readable file" for n in ("ca_file", "cert_file", "key_file")
                       if (v := getattr(self, n)) is not None and not Path(v).is_file()]
            problems = missing or check_tls_files(self.cert_file, self.key_file, self.ca_file)
            if problems:
                raise ValueError("; ".join(problems))
        return self


class DicomDestinationConfig(StrictModel):
    """A C-STORE SCP; ``calling_ae`` defaults to the node's AE title."""

    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    ae_title: str
    calling_ae: str | None = None
    connect_timeout_s: float = Field(10.0, gt=0)
    acse_timeout_s: float = Field(30.0, gt=0)
    dimse_timeout_s: float = Field(60.0, gt=0)
    network_timeout_s: float = Field(60.0, gt=0)
    max_pdu: int = Field(16382, ge=0)
    tls: DestinationTls = Field(default_factory=DestinationTls)
    #: associations held open to this peer at once (1 for a peer that allows only one)
    max_associations: int = Field(3, ge=1, le=8)

    @field_validator("ae_title", "calling_ae")
    @classmethod
    def _ae(cls, v: str | None) -> str | None:
        return None if v is None else check_ae_title(v)


class FolderDestinationConfig(StrictModel):
    """A directory (relative paths: from the node's working directory)."""

    path: Path


class DestinationConfig(StrictModel):
    """Exactly one of ``dicom`` or ``folder``."""

    dicom: DicomDestinationConfig | None = None
    folder: FolderDestinationConfig | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> DestinationConfig:
        if (self.dicom is None) == (self.folder is None):
            raise ValueError("a destination has exactly one of 'dicom' or 'folder'")
        return self


def _check_regex(v: str | None) -> str | None:
    if v is not None:
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {v!r}: {exc}") from exc
    return v


class MatchRules(StrictModel):
    """Which received series are eligible (see :func:`check_eligibility`)."""

    modality: str = "MR"
    scanning_sequence_include: list[Literal["SE", "IR", "GR", "EP", "RM"]] = Field(default_factory=lambda: ["SE"])
    scanning_sequence_exclude: list[Literal["SE", "IR", "GR", "EP", "RM"]] = Field(
        default_factory=lambda: ["IR", "GR", "EP"]
    )
    sequence_variant_exclude: list[Literal["SK", "MTC", "SS", "TRSS", "SP", "MP", "OSP", "NONE"]] = Field(
        default_factory=lambda: ["MP", "MTC", "SS", "TRSS"]
    )
    allow_fse: bool = True
    series_description_regex: str | None = None
    protocol_name_regex: str | None = None
    body_part_regex: str | None = None
    calling_aes: list[str] = Field(default_factory=list, description="empty: any calling AE")
    exclude_synthetic: bool = Field(
        True, description="inputs marked SyntheticData YES are ineligible (a derived series sent back: a loop)")
    exclude_own_output: bool = Field(
        True, description="inputs carrying this node's equipment identity (manufacturer, model name, serial) or "
                          "its uid_root are ineligible")

    @field_validator("series_description_regex", "protocol_name_regex", "body_part_regex")
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        return _check_regex(v)

    @field_validator("calling_aes")
    @classmethod
    def _aes(cls, v: list[str]) -> list[str]:
        return [check_ae_title(a) for a in v]


class Recipe(StrictModel):
    """One synthetic spin-echo contrast: TE/TR, series number, label, destinations."""

    key: str = Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")
    label: str = Field(min_length=1, max_length=40)
    te_ms: float = Field(gt=0)
    tr_ms: float = Field(gt=0)
    series_number: int = Field(ge=1, le=2**31 - 1)
    description: str | None = Field(None, max_length=64, description="SeriesDescription; starts with SYNTH")
    destinations: list[str] = Field(min_length=1)

    @field_validator("description")
    @classmethod
    def _synth(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("SYNTH"):
            raise ValueError("a synthetic series description must start with 'SYNTH' (never mistaken for acquired)")
        return v

    @property
    def series_description(self) -> str:
        """The SeriesDescription: ``description``, else ``SYNTH <label> TE<te> TR<tr>`` (<= 64 chars).

        TE/TR are appended only when the label does not already name them (every shipped
        label does, e.g. "T2w TE75 TR4500"): the planner must not read ``TE75 TR4500 TE75 TR4500``.
        """
        if self.description:
            return self.description
        if _TE_RE.search(self.label) and _TR_RE.search(self.label):
            return f"SYNTH {self.label}"[:64]
        return f"SYNTH {self.label} TE{self.te_ms:g} TR{self.tr_ms:g}"[:64]


class MapSeriesNumbers(StrictModel):
    """Series numbers of the PD, T1 and T2 map series."""

    PD: int = Field(ge=1)
    T1: int = Field(ge=1)
    T2: int = Field(ge=1)


class Maps(StrictModel):
    """Whether to send the PD/T1/T2 maps: as Parametric Maps, as classic MR images (TPS)."""

    parametric: bool = False
    classic: bool = False
    destinations: list[str] = Field(default_factory=list)
    classic_series_numbers: MapSeriesNumbers = Field(
        default_factory=lambda: MapSeriesNumbers(PD=980, T1=981, T2=982)
    )
    parametric_series_numbers: MapSeriesNumbers = Field(
        default_factory=lambda: MapSeriesNumbers(PD=990, T1=991, T2=992)
    )
    content_qualification: Literal["RESEARCH", "PRODUCT", "SERVICE"] = "RESEARCH"


class SeriesNumberRange(StrictModel):
    """Derived series numbers live here, away from the scanner's own numbers."""

    min: int = Field(900, ge=1)
    max: int = Field(999, ge=1)

    @model_validator(mode="after")
    def _order(self) -> SeriesNumberRange:
        if self.max < self.min:
            raise ValueError("series_number_range needs min <= max")
        return self


class QA(StrictModel):
    """Self-consistency thresholds of a job and what to do when one is exceeded."""

    max_self_nrmse: float = Field(0.15, gt=0)
    max_te_error_frac: float = Field(0.6, gt=0)
    max_tr_error_frac: float = Field(0.6, gt=0)
    # Fusion (several series): figures of rtcontrast.core.fusion; the self NRMSE above is small by construction
    # for a fitted input and is a sanity check only.
    fusion_max_residual_over_noise: float = Field(
        4.0, gt=0, description="RMS misfit of each input over the body / that input's background noise sd (ratio); "
                               "a mis-registered or inconsistent partner cannot be re-rendered")
    fusion_max_shift_voxels: float = Field(
        1.0, gt=0, description="in-plane shift of a partner's body outline against the target's, voxels "
                               "(patient motion between series)")
    fusion_max_at_bounds_frac: float = Field(
        0.05, gt=0, le=1, description="fraction of body voxels whose fitted T1 or T2 sits at a physical bound "
                                      "(T1 50-5000 ms, T2 5-3000 ms): gains or registration push them out of physics")
    fusion_max_network_disagreement_pct: float = Field(
        100.0, gt=0, description="median |fit / network - 1| of T1 or T2 over the body, per cent (off its training "
                                  "anatomy the network is 60-90 % off while three contrasts still fit well)")
    fusion_max_gain_vs_physics_pct: float = Field(
        15.0, gt=0, description="largest |gain used / gain from physics - 1| of an input, per cent (gains taken "
                                "from DICOM or shared_scale that the reference tissues contradict)")
    fusion_require_reference_tissue: bool = Field(
        True, description="with 2-3 contrasts and gains not known from DICOM, fat or free fluid must be recognised")
    # One series through a model with uncertainty outputs (qmap/3): the model's own sd, median over the body.
    # Unset (the default): the model's own calibrated limit (ONNX metadata rtcontrast.qa_limits, set on in-domain
    # series it was neither trained nor evaluated on), else DEFAULT_UNCERTAINTY_LIMIT.  A number overrides both.
    max_t1_uncertainty: float | None = Field(
        None, gt=0, description="median relative sd of T1 over the body (0.35 = ±35 %); above it the T1 map "
                                "rests on the model's prior rather than on this image; unset: the model's "
                                "calibrated limit")
    max_t2_uncertainty: float | None = Field(None, gt=0, description="likewise for T2")
    max_pd_uncertainty: float | None = Field(None, gt=0, description="likewise for PD")
    uncertainty_action: Literal["send", "warn", "hold"] = Field(
        "hold", description="what an uncertainty finding does, whatever ``action`` says: a series the model "
                            "cannot read (another anatomy, an unusual sequence) is held for a physicist by default")
    action: Literal["send", "warn", "hold"] = "warn"
    sample_slices: int = Field(
        16, ge=0, le=256, description="a series of more than twice this many slices is judged on this many evenly "
                                      "spaced slices before anything is sent, then inferred slab by slab while it "
                                      "streams to the TPS (its first image arrives seconds after the last slice); "
                                      "QA over the whole series follows, and a whole series that would have been "
                                      "held stops what is not yet delivered (rtcontrast.node.gate).  0: every "
                                      "series is inferred whole before the QA decision")


#: Uncertainty limit when neither the protocol nor the model sets one (fraction: 0.35 = ±35 %).
DEFAULT_UNCERTAINTY_LIMIT = 0.35

#: QA keys added after protocols were first hashed: at their defaults they leave the audit hash as it was.
_LATER_QA_KEYS = ("fusion_", "max_t1_uncertainty", "max_t2_uncertainty", "max_pd_uncertainty", "uncertainty_action",
                  "sample_slices")


def _default_recipes() -> list[Recipe]:
    rows = [
        ("T2w_75", "T2w TE75 TR4500", 75.0, 4500.0, 901),
        ("T2w_120", "T2w TE120 TR4500", 120.0, 4500.0, 902),
        ("T1w_400", "T1w TE8 TR400", 8.0, 400.0, 903),
        ("T1w_750", "T1w TE8 TR750", 8.0, 750.0, 904),
        ("PDw", "PDw TE8 TR4500", 8.0, 4500.0, 905),
        ("T2w_TSE", "T2w TSE-like TE100 TR3000", 100.0, 3000.0, 906),
        ("T1w_600", "T1w TE12 TR600", 12.0, 600.0, 907),
    ]
    return [
        Recipe(key=k, label=lab, te_ms=te, tr_ms=tr, series_number=sn, destinations=["export"])
        for k, lab, te, tr, sn in rows
    ]


def _default_destinations() -> dict[str, DestinationConfig]:
    return {"export": DestinationConfig(folder=FolderDestinationConfig(path=Path("./var/export")))}


class ModelPin(StrictModel):
    """The model this protocol was validated with: the node refuses to start with any other.

    Why: the protocol is clinical content; a physicist who validated it with one model
    (models/NAME.onnx, name from its metadata) pins that model by name and file SHA-256
    (``python node.py models`` shows both), so swapping the file is caught at start-up.
    """

    name: str = Field(min_length=1, max_length=64)
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$", description="full SHA-256 of the .onnx file")


class Fusion(StrictModel):
    """Use every spin-echo series of one study and frame of reference together (``qmap/2`` model).

    Why: one SE image gives one equation per voxel for three unknowns; a T1w and a T2w
    series of the same frame of reference (usual in pelvic RT) make the maps far better
    determined.  Each series is the geometric target of its own job (its derived series
    keep its grid); the other series of the group are extra inputs, referenced in the
    lineage; ``target`` can restrict output to one series of the group (e.g. ``t2w``: the
    planning T2w gets the fused contrasts, the T1w is an input only).  Needs a model whose
    contract is ``qmap/2``; with a ``qmap/1`` model the
    section is ignored (logged once per job).
    """

    enabled: bool = False
    window_s: float = Field(3600.0, gt=0, description="partners: series of the study received within this time")
    wait_for_partner_s: float = Field(0.0, ge=0, description="hold a complete series this long for a partner")
    allow_resample: bool = Field(False, description="resample partners on another grid onto the target's grid")
    consistency: bool = Field(True, description="refine the fused maps so that they re-render every input "
                                                "(rtcontrast.core.consistency); off = the network's maps as they are")
    shared_scale: bool = Field(False, description="the series of a study are stored in one intensity scale "
                                                  "(consistency uses the ratio of series scales as gains)")
    target: Literal["each", "t2w", "t1w", "finest"] = Field(
        "each", description="which series of a group gets derived series: each, or only the T2w-like (longest TE), "
                            "T1w-like (shortest TR) or finest-grid one; the others are inputs only")


class ProtocolConfig(StrictModel):
    """The whole protocol.  ``content_hash`` identifies its content in the audit."""

    version: str = Field("1", min_length=1, max_length=64)
    destinations: dict[str, DestinationConfig] = Field(default_factory=_default_destinations)
    match: MatchRules = Field(default_factory=MatchRules)
    recipes: list[Recipe] = Field(default_factory=_default_recipes, min_length=1)
    maps: Maps = Field(default_factory=Maps)
    series_number_range: SeriesNumberRange = Field(default_factory=SeriesNumberRange)
    qa: QA = Field(default_factory=QA)
    model: ModelPin | None = Field(None, description="optional: pin the model by name and sha256")
    fusion: Fusion = Field(default_factory=Fusion)

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> ProtocolConfig:
        # load_protocol runs the same checks on the raw file (with line numbers) itself.
        if info.context and info.context.get("cross_checked"):
            return self
        problems = protocol_cross_checks(self.model_dump(mode="json"))
        if problems:
            raise ValueError("; ".join(f"{format_loc(loc)}: {msg}" for loc, msg in problems))
        return self

    @property
    def content_hash(self) -> str:
        """SHA-256 of the protocol's content (canonical JSON), independent of comments/layout."""
        content = self.model_dump(mode="json")
        if content.get("model") is None:  # protocols without a pin keep the hash they had before pins existed
            content.pop("model", None)
        if content.get("fusion") == Fusion().model_dump(mode="json"):  # likewise for fusion at its defaults
            content.pop("fusion", None)
        qa_defaults = QA().model_dump(mode="json")
        for key in [k for k in content.get("qa", {}) if k.startswith(_LATER_QA_KEYS)]:  # later QA keys at defaults
            if content["qa"][key] == qa_defaults[key]:
                content["qa"].pop(key)
        text = json.dumps(content, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def audit_version(self) -> str:
        """``<version>+sha256:<first 12 hex>``: what a job's audit record names."""
        return f"{self.version}+sha256:{self.content_hash[:12]}"

    def recipe(self, key: str) -> Recipe:
        """The recipe with ``key`` (KeyError if none)."""
        for r in self.recipes:
            if r.key == key:
                return r
        raise KeyError(key)


# -- cross-field checks (on raw data, so they run even when other fields are wrong) ---
def _items(value: Any) -> Iterator[tuple[int, Any]]:
    return enumerate(value) if isinstance(value, list) else iter(())


def protocol_cross_checks(raw: Any) -> list[tuple[Loc, str]]:
    """Unknown destinations, duplicate keys/series numbers, numbers outside the range,
    TR <= TE in a recipe, a label whose TE/TR contradicts the recipe's."""
    if not isinstance(raw, dict):
        return []
    out: list[tuple[Loc, str]] = []
    dests = raw.get("destinations", {"export": None})
    known: set[str] | None = None
    if isinstance(dests, dict):
        known = {str(k) for k in dests}
        for name in dests:
            if not _NAME_RE.match(str(name)):
                out.append((("destinations", str(name)),
                            "a destination name is letters, digits, '_', '-', '.' (it names a directory)"))

    def check_dest_list(loc: Loc, value: Any) -> None:
        if known is None:
            return
        for k, d in _items(value):
            if isinstance(d, str) and d not in known:
                out.append((loc + (k,), f"unknown destination '{d}' (defined: {', '.join(sorted(known)) or 'none'})"))

    rng = raw.get("series_number_range") or {}
    lo = rng.get("min", 900) if isinstance(rng, dict) else 900
    hi = rng.get("max", 999) if isinstance(rng, dict) else 999
    in_range = isinstance(lo, int) and isinstance(hi, int)
    numbers: dict[int, Loc] = {}

    def check_number(loc: Loc, n: Any) -> None:
        if not isinstance(n, int) or isinstance(n, bool):
            return
        if in_range and not lo <= n <= hi:
            out.append((loc, f"series number {n} is outside series_number_range {lo}-{hi}"))
        if n in numbers:
            out.append((loc, f"duplicate series number {n} (also {format_loc(numbers[n])})"))
        else:
            numbers[n] = loc

    keys: dict[str, Loc] = {}
    for i, r in _items(raw.get("recipes")):
        if not isinstance(r, dict):
            continue
        key = r.get("key")
        if isinstance(key, str):
            if key in keys:
                out.append((("recipes", i, "key"), f"duplicate recipe key '{key}' (also {format_loc(keys[key])})"))
            else:
                keys[key] = ("recipes", i, "key")
        check_number(("recipes", i, "series_number"), r.get("series_number"))
        te, tr = r.get("te_ms"), r.get("tr_ms")
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (te, tr))
        if numeric and 0 < tr <= te:
            out.append((("recipes", i, "tr_ms"),
                        f"TR {tr:g} ms is not longer than TE {te:g} ms: a spin echo needs TR > TE"))
        label = r.get("label")
        if numeric and isinstance(label, str):
            for name, value, rx in (("TE", te, _TE_RE), ("TR", tr, _TR_RE)):
                m = re.search(rx.pattern + r"[\d.]*", label, re.IGNORECASE)
                said = re.sub(r"^\D+", "", m.group(0)) if m else ""
                if said and float(said) != float(value):
                    out.append((("recipes", i, "label"), f"label says {name} {said} but {name.lower()}_ms is "
                                                          f"{value:g}: the SeriesDescription would mislead"))
        check_dest_list(("recipes", i, "destinations"), r.get("destinations"))

    maps = raw.get("maps")
    if isinstance(maps, dict):
        check_dest_list(("maps", "destinations"), maps.get("destinations"))
        for kind in ("classic", "parametric"):
            nums = maps.get(f"{kind}_series_numbers")
            if maps.get(kind) is True and isinstance(nums, dict):
                for q in ("PD", "T1", "T2"):
                    check_number(("maps", f"{kind}_series_numbers", q), nums.get(q))
        if (maps.get("classic") is True or maps.get("parametric") is True) and not maps.get("destinations"):
            out.append((("maps", "destinations"), "maps are enabled but have no destinations"))
    return out


def load_protocol(path: Path | str | None = None) -> ProtocolConfig:
    """The protocol from ``path``, or the embedded defaults when ``path`` is None.

    Raises :class:`~rtcontrast.settings.node.ConfigError` listing every problem as
    ``file:line: field.path: message``.  An empty file is such a problem (#15 finding 3:
    a protocol truncated to 0 bytes was reloaded as the embedded default, and every
    following series went to ./var/export instead of the TPS).
    """
    if path is None:
        return ProtocolConfig()
    return load_yaml_model(path, ProtocolConfig, protocol_cross_checks, context={"cross_checked": True},
                           allow_empty=False)


__all__ = [
    "ConfigError",
    "DestinationConfig",
    "DestinationTls",
    "DicomDestinationConfig",
    "FolderDestinationConfig",
    "MatchRules",
    "Maps",
    "ProtocolConfig",
    "QA",
    "Recipe",
    "SeriesNumberRange",
    "load_protocol",
    "protocol_cross_checks",
]
