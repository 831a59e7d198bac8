"""Per-series QA from the model's own uncertainty and its TE/TR identification (numpy only).

Why: one SE series is one equation per voxel for three unknowns; where the network's
answer rests on its prior rather than on the data (an anatomy it never saw, an odd
sequence), a ``qmap/3`` model says so through its predicted sd of ln T1 / ln T2 / PD, and
its identification head reads another TE/TR from the image than the header states.
This module turns both into one score and sentences a person can act on, so a series
whose maps are a guess can be held instead of sent to planning.

Contract of :func:`series_qa` (stable; the pipeline will call it after the merge):

* inputs: ``maps`` - any object with the attributes of :class:`rtcontrast.core.inference.QMaps`
  (``pd``, ``t1``, ``t2`` [N,H,W]; optional ``t1_log_sd``, ``t2_log_sd``, ``pd_sd``
  [N,H,W] or None; ``te_tr_pred`` [N,2] or None); ``body_mask`` bool [N,H,W] (voxels inside
  the patient); ``te_ms``/``tr_ms`` the header's TE/TR (None: identification not checked);
  ``thresholds`` a :class:`Thresholds`.
* judged voxels: ``body_mask`` and PD above ``signal_fraction`` of the body's 99th
  percentile of PD (air, cortical bone and background carry no T1/T2 information and
  would make every series look uncertain).
* checks: median relative uncertainty of T1, T2, PD (exp(sd of ln) - 1; PD: pd_sd / pd)
  over the judged voxels; median over slices of |identified / header - 1| of TE and TR.
  A check whose input is missing (a model without uncertainty outputs) is skipped and
  listed in ``QAResult.skipped``; it neither passes nor fails the series.
* output: :class:`QAResult`: ``score`` = min over checks of min(1, threshold / value)
  (1.0 when every check is within its threshold, 0.5 when the worst is twice its
  threshold; 1.0 with no checks), ``passed`` = every check within threshold,
  ``reasons`` one sentence per failed check (e.g. "median T1 uncertainty ±62 % in the
  body exceeds 35 %"), ``values`` every measured figure.  Pure: no I/O, no logging.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rtcontrast.core.maps import slab_ranges


@dataclass(frozen=True)
class Thresholds:
    """Limits of the checks (fractions: 0.35 = 35 %).

    Defaults: a relative sd of 35 % on T1 or T2 means a 90 % interval wider than a factor of
    about 1.8 - the contrast of a rendering then says more about the prior than about the
    patient.  Identification: the shipped pelvis models identify in-domain TE within about
    10-40 % and TR within 10-40 %; errors well beyond that mean the image does not look like
    anything the model was trained on.
    """

    t1_rel_sd: float = 0.35
    t2_rel_sd: float = 0.35
    pd_rel_sd: float = 0.35
    te_id_rel_err: float = 0.5
    tr_id_rel_err: float = 0.6
    #: voxels with PD below this fraction of the body's 99th percentile are not judged
    signal_fraction: float = 0.1


@dataclass
class QAResult:
    """Outcome of :func:`series_qa` (see the module docstring)."""

    score: float
    passed: bool
    reasons: list[str] = field(default_factory=list)
    values: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


#: Voxels above this fraction of the series scale are the body for the node's QA figures.
BODY_FRACTION = 0.05


def node_body_mask(pixels: np.ndarray, scale: float, fraction: float = BODY_FRACTION) -> np.ndarray:
    """The body as the node's QA sees it: input voxels above ``fraction`` of the series scale.

    One rule for the node (rtcontrast.node.qa) and for the calibration of a model's QA limits
    (rtcontrast.research.qa_calibration), so a limit means the same figure in both.
    """
    return np.asarray(pixels) > fraction * scale


#: Slices per read when gathering voxels (maps may be files: rtcontrast.core.maps.SlabFile).
_SLAB_SLICES = 8


def gather(values: Any, mask: np.ndarray) -> np.ndarray:
    """``values[mask]`` read a slab of slices at a time (``values``: an array or a map kept in a file)."""
    parts = [np.asarray(values[a:b])[mask[a:b]] for a, b in slab_ranges(mask.shape[0], _SLAB_SLICES)]
    return np.concatenate(parts) if parts else np.empty(0, np.float32)


def judged_voxels(pd: Any, body_mask: np.ndarray, signal_fraction: float) -> np.ndarray:
    """Body voxels with enough PD to carry T1/T2 information (``pd`` read by slabs)."""
    body = np.asarray(body_mask, bool)
    vals = gather(pd, body)
    if vals.size == 0:
        return body
    ref = float(np.percentile(vals, 99, overwrite_input=True))
    del vals
    out = np.empty_like(body)
    for a, b in slab_ranges(body.shape[0], _SLAB_SLICES):
        out[a:b] = body[a:b] & (np.asarray(pd[a:b]) > signal_fraction * ref)
    return out


def series_qa(maps: Any, body_mask: np.ndarray, te_ms: float | None = None, tr_ms: float | None = None,
              thresholds: Thresholds | None = None) -> QAResult:
    """Score one series' maps by their predicted uncertainty and TE/TR identification (contract above)."""
    th = thresholds or Thresholds()
    sel = judged_voxels(maps.pd, body_mask, th.signal_fraction)
    checks: list[tuple[str, float, float, str]] = []  # key, value, threshold, sentence template
    skipped: list[str] = []
    for key, attr, limit, label in (("t1_rel_sd", "t1_log_sd", th.t1_rel_sd, "T1"),
                                    ("t2_rel_sd", "t2_log_sd", th.t2_rel_sd, "T2")):
        sd = getattr(maps, attr, None)
        if sd is None or not sel.any():
            skipped.append(key)
            continue
        v = float(np.expm1(np.median(gather(sd, sel))))
        checks.append((key, v, limit, f"median {label} uncertainty ±{{v:.0f}} % in the body exceeds {{t:.0f}} %"))
    pd_sd = getattr(maps, "pd_sd", None)
    if pd_sd is None or not sel.any():
        skipped.append("pd_rel_sd")
    else:
        rel = gather(pd_sd, sel) / np.maximum(gather(maps.pd, sel), 1e-12)
        checks.append(("pd_rel_sd", float(np.median(rel)), th.pd_rel_sd,
                       "median PD uncertainty ±{v:.0f} % in the body exceeds {t:.0f} %"))
    idp = getattr(maps, "te_tr_pred", None)
    for key, col, header, limit, label in (("te_id_rel_err", 0, te_ms, th.te_id_rel_err, "TE"),
                                           ("tr_id_rel_err", 1, tr_ms, th.tr_id_rel_err, "TR")):
        if idp is None or header is None or header <= 0:
            skipped.append(key)
            continue
        ids = np.asarray(idp, np.float64)[:, col]
        med = float(np.median(ids))
        v = float(np.median(np.abs(ids / header - 1)))
        checks.append((key, v, limit, f"the image looks like {label} {med:.0f} ms, the header says {header:.0f} ms "
                                      f"(off by {{v:.0f}} %, more than {{t:.0f}} %)"))
    values = {k: v for k, v, _, _ in checks}
    reasons = [tpl.format(v=v * 100, t=t * 100) for _, v, t, tpl in checks if v > t]
    score = min((min(1.0, t / v) if v > 0 else 1.0 for _, v, t, _ in checks), default=1.0)
    return QAResult(score=float(score), passed=not reasons, reasons=reasons, values=values, skipped=skipped)
