"""The ONNX model contract ``qmap/1``: the interface between researchers and the node.

Inputs
    image   float32 [N,1,H,W]  stored values (after Modality LUT) / series scale s,
                               s = ``input_percentile`` percentile of all voxels > 0 of the series
    te_tr   float32 [N,2]      the input's TE and TR in ms (from the header)
Outputs
    pd          float32 [N,1,H,W]  in the units of ``image`` (re-rendering the input reproduces it)
    t1, t2      float32 [N,1,H,W]  ms
    te_tr_pred  float32 [N,2]      ms, identified from the image alone
H and W must be multiples of ``spatial_multiple`` (the caller pads); N is free.

``qmap/3`` (one series + field strength, with uncertainty) = ``qmap/1`` plus:
    input   field_t     float32 [N,1]      the series' MagneticFieldStrength in tesla (the node uses
                                           :data:`DEFAULT_FIELD_T` when the header lacks it, and records that)
    optional outputs (a model may export none, some or all; the node works with and without them):
            t1_log_sd   float32 [N,1,H,W]  predicted sd of ln T1 (~ relative sd of T1)
            t2_log_sd   float32 [N,1,H,W]  predicted sd of ln T2
            pd_sd       float32 [N,1,H,W]  predicted sd of PD, in the units of ``pd``
    Metadata as ``qmap/1``; ``field_strengths_t`` (trained fields, all > 0) is checked.  Optional
    ``rtcontrast.qa_limits`` (JSON, e.g. ``{"t1_rel_sd": 0.9, "t2_rel_sd": 1.1, "pd_rel_sd": 0.4}``):
    the model's own limits for the median relative sd over the body, calibrated on in-domain
    series; the node's QA uses them unless the protocol sets its own.

``qmap/2`` (fusion of K co-registered spin-echo series of one frame of reference):
    image    float32 [N,K,H,W]  each present input divided by its own series scale; absent slots zero
    te_tr    float32 [N,K,2]    ms (absent slots: any value, ignored)
    present  float32 [N,K]      1 = present, 0 = missing; at least one present
    outputs as ``qmap/1``; PD in the units of the first present input.  Metadata as
    ``qmap/1`` plus ``max_inputs``.

This module is numpy-only so that the node (onnxruntime) and the exporter (torch) share it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

CONTRACT = "qmap/1"
CONTRACT_FUSION = "qmap/2"
CONTRACT_SE = "qmap/3"
KNOWN_CONTRACTS: tuple[str, ...] = (CONTRACT, CONTRACT_FUSION, CONTRACT_SE)
INPUT_NAMES: tuple[str, ...] = ("image", "te_tr")
INPUT_NAMES_FUSION: tuple[str, ...] = ("image", "te_tr", "present")
INPUT_NAMES_SE: tuple[str, ...] = ("image", "te_tr", "field_t")
OUTPUT_NAMES: tuple[str, ...] = ("pd", "t1", "t2", "te_tr_pred")
#: qmap/3 optional outputs: per-voxel uncertainty (see the module docstring).
UNCERTAINTY_OUTPUT_NAMES: tuple[str, ...] = ("t1_log_sd", "t2_log_sd", "pd_sd")
#: Field strength (T) assumed for a qmap/3 model when the series header has none.
DEFAULT_FIELD_T = 1.5
REQUIRED_METADATA: tuple[str, ...] = (
    "rtcontrast.contract",
    "name",
    "version",
    "input_percentile",
    "spatial_multiple",
    "te_range_ms",
    "tr_range_ms",
    "field_strengths_t",
)


class ContractError(ValueError):
    """A model file does not honour the contract; the message says what is wrong."""


@dataclass(frozen=True)
class ModelInfo:
    """The contract metadata of one model, parsed."""

    name: str
    version: str
    input_percentile: float
    spatial_multiple: int
    te_range_ms: tuple[float, float]
    tr_range_ms: tuple[float, float]
    field_strengths_t: tuple[float, ...]
    contract: str = CONTRACT
    max_inputs: int = 1
    #: the model's calibrated uncertainty QA limits (metadata ``rtcontrast.qa_limits``, optional):
    #: ``t1_rel_sd``/``t2_rel_sd``/``pd_rel_sd`` as fractions, set on in-domain series the model was
    #: neither trained nor evaluated on (rtcontrast.research.qa_calibration); empty when absent
    qa_limits: dict[str, float] = field(default_factory=dict, hash=False)

    @property
    def fusion(self) -> bool:
        """True for a ``qmap/2`` model (several inputs)."""
        return self.contract == CONTRACT_FUSION

    @property
    def takes_field(self) -> bool:
        """True for a ``qmap/3`` model (needs the series' field strength as input ``field_t``)."""
        return self.contract == CONTRACT_SE

    def te_tr_in_range(self, te: float, tr: float) -> bool:
        """True when (TE, TR) lies inside the trained range."""
        return (self.te_range_ms[0] <= te <= self.te_range_ms[1]) and (
            self.tr_range_ms[0] <= tr <= self.tr_range_ms[1]
        )


def _pair(text: str, key: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError as exc:
        raise ContractError(f"metadata {key!r} must be 'low,high' in ms, got {text!r}") from exc
    if not lo < hi:
        raise ContractError(f"metadata {key!r} must have low < high, got {text!r}")
    return lo, hi


def parse_metadata(meta: dict[str, str]) -> ModelInfo:
    """Validate a model's metadata_props against its contract (``qmap/1``, ``/2`` or ``/3``) and return them parsed."""
    missing = [k for k in REQUIRED_METADATA if k not in meta]
    if missing:
        raise ContractError(f"model metadata lacks {', '.join(missing)} (required by {CONTRACT})")
    contract = meta["rtcontrast.contract"]
    if contract not in KNOWN_CONTRACTS:
        raise ContractError(
            f"model declares contract {contract!r}; this node knows {' and '.join(map(repr, KNOWN_CONTRACTS))}"
        )
    max_inputs = 1
    if contract == CONTRACT_FUSION:
        try:
            max_inputs = int(meta["max_inputs"])
        except (KeyError, ValueError) as exc:
            raise ContractError(f"{CONTRACT_FUSION} model metadata needs an integer 'max_inputs'") from exc
        if max_inputs < 1:
            raise ContractError(f"max_inputs must be >= 1, got {max_inputs}")
    try:
        pct = float(meta["input_percentile"])
        mult = int(meta["spatial_multiple"])
        fields = tuple(float(v) for v in meta["field_strengths_t"].split(","))
    except ValueError as exc:
        raise ContractError(f"model metadata has a malformed number: {exc}") from exc
    if contract == CONTRACT_SE and (not fields or any(not 0 < f <= 20 for f in fields)):
        raise ContractError(f"{CONTRACT_SE} model metadata 'field_strengths_t' must list field strengths in (0, 20] T, "
                            f"got {meta['field_strengths_t']!r}")
    if not 0 < pct <= 100:
        raise ContractError(f"input_percentile must be in (0, 100], got {pct}")
    if mult < 1:
        raise ContractError(f"spatial_multiple must be >= 1, got {mult}")
    return ModelInfo(
        qa_limits=_qa_limits(meta.get(QA_LIMITS_KEY)),
        name=meta["name"],
        version=meta["version"],
        input_percentile=pct,
        spatial_multiple=mult,
        te_range_ms=_pair(meta["te_range_ms"], "te_range_ms"),
        tr_range_ms=_pair(meta["tr_range_ms"], "tr_range_ms"),
        field_strengths_t=fields,
        contract=contract,
        max_inputs=max_inputs,
    )


#: Metadata key of a model's calibrated uncertainty QA limits (JSON object of fractions).
QA_LIMITS_KEY = "rtcontrast.qa_limits"
#: The limits a model may calibrate.
QA_LIMIT_NAMES = ("t1_rel_sd", "t2_rel_sd", "pd_rel_sd")


def _qa_limits(text: str | None) -> dict[str, float]:
    """Parse ``rtcontrast.qa_limits``: e.g. ``{"t1_rel_sd": 0.42, "t2_rel_sd": 0.5, "pd_rel_sd": 0.3}``."""
    if text is None:
        return {}
    try:
        raw = json.loads(text)
        out = {str(k): float(v) for k, v in raw.items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise ContractError(f"metadata {QA_LIMITS_KEY!r} must be a JSON object of numbers, got {text!r}") from exc
    bad = [k for k, v in out.items() if k not in QA_LIMIT_NAMES or not (0 < v < 100)]
    if bad:
        raise ContractError(f"metadata {QA_LIMITS_KEY!r}: unknown key or value outside (0, 100) for {', '.join(bad)} "
                            f"(keys: {', '.join(QA_LIMIT_NAMES)})")
    return out


def series_scale(values: np.ndarray, percentile: float) -> float:
    """The series scale s: the ``percentile`` of all voxels > 0 (1.0 for an empty series)."""
    pos = values[values > 0]  # a copy: partitioned in place below (no second copy of the volume)
    if pos.size == 0:
        return 1.0
    s = float(np.percentile(pos, percentile, overwrite_input=True))
    return s if s > 0 else 1.0


def pad_amounts(h: int, w: int, multiple: int) -> tuple[int, int]:
    """How many rows/columns to add (at the bottom/right) to reach the next multiple."""
    return (-h) % multiple, (-w) % multiple
