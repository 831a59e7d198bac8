"""Per-job quality checks: figures from the maps and the input, protocol thresholds, and the flag
written into derived objects sent under a warning.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from rtcontrast.core.maps import QMaps
from rtcontrast.core.render import (
    self_nrmse,
)
from rtcontrast.settings.protocol import ProtocolConfig

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- QA


#: Map percentiles reported in QA.
_PERCENTILES = (5, 50, 95)
#: Voxels above this fraction of the series scale count as body for QA statistics.
_BODY_FRACTION = 0.05

def _percentiles(values: np.ndarray, mask: np.ndarray, divide_by: float = 1.0) -> dict[str, float]:
    """Percentiles of ``values / divide_by`` over ``mask`` (all voxels when the mask is empty).

    Memory: one copy of the body voxels, partitioned in place (no float64 copy, no
    divided volume); percentiles commute with a positive scale.
    """
    if mask.any():
        v = values[mask]  # a copy: safe to partition in place
        ps = np.percentile(v, _PERCENTILES, overwrite_input=True)
    else:
        if values.size == 0:
            return {}
        ps = np.percentile(values, _PERCENTILES)
    return {f"p{p}": round(float(x) / divide_by, 3) for p, x in zip(_PERCENTILES, ps)}


def compute_qa(maps: QMaps, pixels: np.ndarray, te_ms: float, tr_ms: float) -> dict[str, Any]:
    """Self-consistency numbers of one job (JSON-serialisable)."""
    te_pred = float(np.median(maps.te_tr_pred[:, 0]))
    tr_pred = float(np.median(maps.te_tr_pred[:, 1]))
    mask = pixels > _BODY_FRACTION * maps.scale
    return {
        "self_nrmse": round(self_nrmse(maps, pixels, te_ms, tr_ms), 5),
        "te_header_ms": te_ms,
        "tr_header_ms": tr_ms,
        "te_pred_ms": round(te_pred, 3),
        "tr_pred_ms": round(tr_pred, 3),
        "te_error_frac": round(abs(te_pred - te_ms) / te_ms, 4),
        "tr_error_frac": round(abs(tr_pred - tr_ms) / tr_ms, 4),
        "series_scale": round(float(maps.scale), 4),
        "body_voxels": int(mask.sum()),
        "t1_ms": _percentiles(maps.t1, mask),
        "t2_ms": _percentiles(maps.t2, mask),
        "pd": _percentiles(maps.pd, mask, float(maps.scale)),
    }


def non_finite_figures(qa: dict[str, Any]) -> list[str]:
    """One sentence per QA number that is NaN or infinite (blank or broken images, #15 finding 2)."""
    out = []
    for key, value in qa.items():
        values = list(value.values()) if isinstance(value, dict) else (
            value if isinstance(value, (list, tuple)) else [value])
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            out.append(f"QA figure {key} is not finite ({value})")
    return out


def qa_violations(qa: dict[str, Any], protocol: ProtocolConfig) -> list[str]:
    """Which protocol QA thresholds the job exceeds, each as a short sentence."""
    t = protocol.qa
    out = non_finite_figures(qa)  # NaN compares False with every threshold: never "no violation"
    if qa["self_nrmse"] > t.max_self_nrmse:
        out.append(f"self NRMSE {qa['self_nrmse']:.3f} > {t.max_self_nrmse:g}")
    if qa["te_error_frac"] > t.max_te_error_frac:
        out.append(
            f"TE from image {qa['te_pred_ms']:.1f} ms vs header {qa['te_header_ms']:g} ms "
            f"(error {qa['te_error_frac']:.2f} > {t.max_te_error_frac:g})"
        )
    if qa["tr_error_frac"] > t.max_tr_error_frac:
        out.append(
            f"TR from image {qa['tr_pred_ms']:.0f} ms vs header {qa['tr_header_ms']:g} ms "
            f"(error {qa['tr_error_frac']:.2f} > {t.max_tr_error_frac:g})"
        )
    return out


def flag_datasets(datasets: list[Dataset], warning: str) -> None:
    """QA action 'warn': a warning in ImageComments and a ' QA!' SeriesDescription suffix."""
    for ds in datasets:
        desc = str(ds.get("SeriesDescription", "") or "")
        suffix = " QA!"
        ds.SeriesDescription = (desc[: 64 - len(suffix)] + suffix) if not desc.endswith(suffix) else desc
        ds.ImageComments = f"QA WARNING: {warning}"[:10240]
