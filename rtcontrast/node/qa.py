"""Per-job quality checks: figures from the maps and the input, protocol thresholds, and the flag
written into derived objects sent under a warning or released from a hold by a reviewer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset

from rtcontrast.core.maps import QMaps, slab_ranges
from rtcontrast.core.uncertainty_qa import node_body_mask, series_qa
from rtcontrast.core.render import (
    self_nrmse,
)
from rtcontrast.settings.protocol import DEFAULT_UNCERTAINTY_LIMIT, ProtocolConfig

if TYPE_CHECKING:
    from rtcontrast.node.store.jobs import JobStore

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- QA


#: Map percentiles reported in QA.
_PERCENTILES = (5, 50, 95)

#: Slices per slab when QA reads maps that the node keeps in files (SlabFile).
_SLAB_SLICES = 8


def _body_values(values: Any, mask: np.ndarray, count: int) -> np.ndarray:
    """``values[mask]`` (C order), read slab by slab: ``values`` may be a map kept in a file."""
    out = np.empty(count, np.dtype(values.dtype))
    i = 0
    for a, b in slab_ranges(mask.shape[0], _SLAB_SLICES):
        piece = np.asarray(values[a:b])[mask[a:b]]
        out[i:i + piece.size] = piece
        i += piece.size
    return out


def _percentiles(values: Any, mask: np.ndarray, divide_by: float = 1.0, count: int | None = None) -> dict[str, float]:
    """Percentiles of ``values / divide_by`` over ``mask`` (all voxels when the mask is empty).

    Memory: one copy of the body voxels (gathered slab by slab, so ``values`` may be a
    :class:`~rtcontrast.core.maps.SlabFile`), partitioned in place (no float64 copy, no
    divided volume); percentiles commute with a positive scale.
    """
    count = int(np.count_nonzero(mask)) if count is None else count
    if count:
        v = _body_values(values, mask, count)  # a copy: safe to partition in place
        ps = np.percentile(v, _PERCENTILES, overwrite_input=True)
    else:
        if values.size == 0:
            return {}
        ps = np.percentile(np.asarray(values), _PERCENTILES)  # never partition the maps themselves
    return {f"p{p}": round(float(x) / divide_by, 3) for p, x in zip(_PERCENTILES, ps)}


def compute_qa(maps: QMaps, pixels: np.ndarray, te_ms: float, tr_ms: float) -> dict[str, Any]:
    """Self-consistency numbers of one job (JSON-serialisable)."""
    te_pred = float(np.median(maps.te_tr_pred[:, 0]))
    tr_pred = float(np.median(maps.te_tr_pred[:, 1]))
    mask = node_body_mask(pixels, maps.scale)  # one rule with the calibration of a model's QA limits
    body = int(np.count_nonzero(mask))
    return {
        "self_nrmse": round(self_nrmse(maps, pixels, te_ms, tr_ms), 5),
        "te_header_ms": te_ms,
        "tr_header_ms": tr_ms,
        "te_pred_ms": round(te_pred, 3),
        "tr_pred_ms": round(tr_pred, 3),
        "te_error_frac": round(abs(te_pred - te_ms) / te_ms, 4),
        "tr_error_frac": round(abs(tr_pred - tr_ms) / tr_ms, 4),
        "series_scale": round(float(maps.scale), 4),
        "body_voxels": body,
        "t1_ms": _percentiles(maps.t1, mask, count=body),
        "t2_ms": _percentiles(maps.t2, mask, count=body),
        "pd": _percentiles(maps.pd, mask, float(maps.scale), count=body),
        **({"uncertainty": uncertainty_figures(maps, mask)} if maps.t1_log_sd is not None else {}),
    }


def uncertainty_figures(maps: QMaps, body: np.ndarray) -> dict[str, float]:
    """The model's own uncertainty over the body (qmap/3 models): median relative sd of T1, T2, PD.

    Computed by :func:`rtcontrast.core.uncertainty_qa.series_qa` on the voxels that carry
    signal; TE/TR identification is judged by the figures above, not twice.
    """
    res = series_qa(maps, body)
    return {k: round(v, 4) for k, v in res.values.items()}


def uncertainty_limit(qa: dict[str, Any], protocol: ProtocolConfig, key: str) -> tuple[float, str]:
    """(limit, whose) for one uncertainty figure (``t1_rel_sd``, ``t2_rel_sd``, ``pd_rel_sd``).

    The protocol's number when it sets one; else the model's calibrated limit, recorded in
    ``qa["uncertainty_limits"]`` from its metadata (a model's sd has its own scale: a fixed
    35 % held every in-domain series of qmap-se 1.0.0); else the protocol module's default.
    """
    own = getattr(protocol.qa, f"max_{key[:2]}_uncertainty")
    if own is not None:
        return float(own), "protocol"
    model = (qa.get("uncertainty_limits") or {}).get(key)
    if model is not None:
        return float(model), "model"
    return DEFAULT_UNCERTAINTY_LIMIT, "default"


def uncertainty_violations(qa: dict[str, Any], protocol: ProtocolConfig) -> list[str]:
    """Sentences for the uncertainty figures over their limits (none for a model without them)."""
    figures = qa.get("uncertainty") or {}
    out = []
    for key, what in (("t1_rel_sd", "T1"), ("t2_rel_sd", "T2"), ("pd_rel_sd", "PD")):
        v = figures.get(key)
        if v is None:
            continue
        limit, whose = uncertainty_limit(qa, protocol, key)
        if v > limit:
            source = {"model": "the model's calibrated limit", "protocol": "the protocol's limit"}.get(whose, "limit")
            out.append(f"model uncertain: median {what} ±{percent(v)} % in the body; {source} {percent(limit)} % "
                       "(the maps rest on the model's prior, not on this image: an anatomy or sequence it was not "
                       "trained on?)")
    return out


def qa_action(violations: list[str], uncertain: list[str], protocol: ProtocolConfig) -> str:
    """What QA does with a job: ``none``, or the protocol's ``action``, made ``hold`` by an uncertainty
    finding when ``uncertainty_action`` says so (the stricter of the two wins)."""
    if not violations:
        return "none"
    order = ("send", "warn", "hold")
    action = protocol.qa.action
    if uncertain and order.index(protocol.qa.uncertainty_action) > order.index(action):
        action = protocol.qa.uncertainty_action
    return action


def percent(frac: float) -> str:
    """A fraction as a percentage a reader takes in at a glance: 9.13 -> ``913``, 0.0052 -> ``0.52``, 0.6 -> ``60``."""
    v = abs(frac) * 100.0
    if v >= 10:
        return f"{v:.0f}"
    if v >= 1:
        return f"{v:.1f}"
    return f"{v:.2g}"


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
    """Which protocol QA thresholds the job exceeds, each as a sentence a physicist reads as is.

    Why percent and units: the raw fraction ("error 9.13 > 0.6") was read as 9 % when 913 %
    was meant; the numbers behind each sentence stay in ``job.qa``.
    """
    t = protocol.qa
    out = non_finite_figures(qa)  # NaN compares False with every threshold: never "no violation"
    if qa["self_nrmse"] > t.max_self_nrmse:
        out.append(f"self NRMSE {percent(qa['self_nrmse'])} % (the maps re-render the input this far off); "
                   f"limit {percent(t.max_self_nrmse)} %")
    for what in ("te", "tr"):
        limit = getattr(t, f"max_{what}_error_frac")
        if qa[f"{what}_error_frac"] > limit:
            out.append(
                f"{what.upper()} identified {percent(qa[f'{what}_error_frac'])} % off "
                f"(header {qa[f'{what}_header_ms']:g} ms, image says {ms(qa[f'{what}_pred_ms'])} ms); "
                f"limit {percent(limit)} %"
            )
    return out + uncertainty_violations(qa, protocol) + fusion_violations(qa.get("fusion"), protocol)


def fusion_violations(fusion: dict[str, Any] | None, protocol: ProtocolConfig) -> list[str]:
    """Which fusion QA thresholds a fused job exceeds (figures from :mod:`rtcontrast.core.fusion`).

    Each sentence names the input (by TE/TR, never patient data) and the number against its
    threshold.  With one input there are no figures and nothing to check.
    """
    if not fusion or "inputs" not in fusion:
        return []
    t = protocol.qa
    out = []
    for i, d in enumerate(fusion["inputs"]):
        name = f"input {i + 1} (TE {d.get('te_ms', 0):g}/TR {d.get('tr_ms', 0):g} ms)"
        sh = d.get("shift_voxels")
        if sh is not None and sh > t.fusion_max_shift_voxels:
            out.append(f"fusion: {name} is shifted {sh:.1f} voxels against the target's body outline "
                       f"> {t.fusion_max_shift_voxels:g} (moved between series?)")
        r = d.get("residual_over_noise")
        if r is not None and r > t.fusion_max_residual_over_noise:
            out.append(f"fusion: {name} not re-rendered by the maps: misfit {r:.2f} x its background noise "
                       f"> {t.fusion_max_residual_over_noise:g} (mis-registered or inconsistent series?)")
    if fusion["at_bounds_frac"] > t.fusion_max_at_bounds_frac:
        out.append(f"fusion: {100 * fusion['at_bounds_frac']:.1f} % of body voxels at a physical T1/T2 bound "
                   f"> {100 * t.fusion_max_at_bounds_frac:g} % (gains or registration of an input wrong?)")
    for p in ("t1", "t2"):
        dis = 100 * (float(np.exp(fusion["network_fit_log_disagreement"][p])) - 1)
        if dis > t.fusion_max_network_disagreement_pct:
            out.append(f"fusion: fitted {p.upper()} differs from the network's by {dis:.0f} % (median) "
                       f"> {t.fusion_max_network_disagreement_pct:g} %")
    src = str(fusion.get("gain_source", ""))
    if not src.startswith("physics") and not src.startswith("data"):
        worst = max(range(len(fusion["inputs"])), key=lambda j: abs(np.log(
            max(fusion["inputs"][j].get("gain", 1.0), 1e-9) / max(fusion["physics_gains"][j], 1e-9))))
        dev = 100 * (float(np.exp(fusion["gain_vs_physics_log"])) - 1)
        if dev > t.fusion_max_gain_vs_physics_pct and str(fusion.get("physics_source", "")).startswith(("physics", "data")):
            d = fusion["inputs"][worst]
            out.append(f"fusion: gain of input {worst + 1} (TE {d.get('te_ms', 0):g}/TR {d.get('tr_ms', 0):g} ms) from "
                       f"{src} is {d.get('gain', 0):.3g}, the reference tissues say {fusion['physics_gains'][worst]:.3g} "
                       f"({dev:.0f} % > {t.fusion_max_gain_vs_physics_pct:g} %)")
    if t.fusion_require_reference_tissue and src.startswith("network"):
        out.append(f"fusion: gains not verified by physics ({src})")
    return out


def ms(value: float) -> str:
    """A time identified from the image, to the precision it has: ``760``, ``61.8``."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}"


#: SeriesDescription suffix of a series sent under an unreviewed QA warning (``qa.action: warn``).
WARN_SUFFIX = " QA!"
#: SeriesDescription suffix of a series a reviewer released from a QA hold.
REVIEWED_SUFFIX = " QA-REV"


@dataclass(frozen=True)
class ReviewDecision:
    """Who released a held job, when (ISO 8601, UTC) and why: written into the derived series."""

    user: str
    at: str
    note: str | None = None

    def comment(self) -> str:
        """``QA hold released by <user> <date>: <note>`` (ImageComments)."""
        when = self.at[:16].replace("T", " ") + " UTC"
        return f"QA hold released by {self.user} {when}" + (f": {self.note}" if self.note else "")


def review_decision(jobs: JobStore, job_id: int) -> ReviewDecision | None:
    """The latest ``released`` audit event of a job after its latest ``held``, as a decision (None: none)."""
    last = None
    for e in jobs.audit_events(job_id):
        if e.event == "held":
            last = None
        elif e.event == "released":
            last = e
    if last is None:
        return None
    d = last.detail or {}
    return ReviewDecision(user=str(d.get("user") or "an admin"), at=last.ts, note=d.get("note"))


def flag_datasets(datasets: list[Dataset], warning: str, review: ReviewDecision | None = None) -> None:
    """Mark derived objects sent despite a QA finding, in SeriesDescription and ImageComments.

    ``review`` None (``qa.action: warn``, nobody looked): ``QA WARNING: ...`` and a ``' QA!'``
    suffix.  With a reviewer's decision (a hold released): ``QA hold released by <user> <date>:
    <note>. QA: ...`` and the distinct suffix ``' QA-REV'``, so a planner sees that a
    physicist looked, and who.  The writer's provenance text (source series, model) stays
    in ImageComments after the flag.
    """
    suffix = WARN_SUFFIX if review is None else REVIEWED_SUFFIX
    comment = f"QA WARNING: {warning}" if review is None else f"{review.comment()}. QA: {warning}"
    for ds in datasets:
        desc = str(ds.get("SeriesDescription", "") or "")
        for old in (WARN_SUFFIX, REVIEWED_SUFFIX):
            if desc.endswith(old):
                desc = desc[: -len(old)]
        ds.SeriesDescription = desc[: 64 - len(suffix)] + suffix
        provenance = str(ds.get("ImageComments", "") or "")
        # The flag first (what a planner must see), then the provenance the writer put there.
        ds.ImageComments = (f"{comment} | {provenance}" if provenance else comment)[:10240]
