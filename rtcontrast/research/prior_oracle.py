"""What a single series cannot tell: the tissue-prior oracle and the Spearman ceiling of a calibrated sd.

Why this exists: the issue's per-tissue targets (pelvis T1/T2 within 10 %) and its calibration target (Spearman of
the predicted sd against the absolute error >= 0.5) are judged per voxel.  Two figures say how much of a miss is the
model and how much is the question:

* **The tissue-prior oracle** knows every voxel's tissue and the field strength, but not the subject: it answers the
  median T1 and T2 of that tissue over reference subjects drawn from the *same generator* (disjoint seeds).  Its
  per-tissue error is the subject-to-subject spread of the generator's prior, i.e. what is left when the image
  carries no information about a parameter (T2 from a short-TE T1w image, T1 of a fluid from a long-TR image).  A
  network can beat it only by reading the parameter from the contrast; where the contrast does not encode it, the
  oracle's figure is a lower bound a single series cannot be expected to pass.
* **The Spearman ceiling**: if the errors were exactly Gaussian with the predicted sd (a perfectly calibrated
  model), ``|error| = sd * |z|`` with ``z ~ N(0, 1)`` and the rank correlation of sd with |error| is limited by the
  spread of sd itself (the half-normal factor ``|z|`` is very wide).  The figure is computed from the model's own sd
  on the same voxels, so it says which part of a low Spearman is the sd being wrong and which is the target asking
  for more spread than a calibrated model would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from scipy import ndimage
from scipy.stats import spearmanr

from rtcontrast.core.maps import QMaps
from rtcontrast.core.physics import MIN_WEIGHTING, weighting
from rtcontrast.research import phantom
from rtcontrast.research.eval_phantoms import brain

#: The constant-maps floor (as rtcontrast.research.evaluate_se), for voxels the prior has no figure for.
FLOOR_T1_MS, FLOOR_T2_MS = 1000.0, 80.0
#: Reference subjects for the oracle (disjoint from training 0..2400, validation, evaluation, calibration and the
#: unseen head seeds 5_000_000+).
ORACLE_SEED_BASE = 6_000_000
#: Reference subjects per field strength.
ORACLE_SUBJECTS_PER_FIELD = 24
FIELDS_T = (1.5, 3.0)


@dataclass
class Truth:
    """Ground truth of one reference volume (arrays [N,H,W])."""

    labels: np.ndarray
    t1: np.ndarray
    t2: np.ndarray


def pelvis_reference(seed: int, field_t: float) -> Truth:
    """One pelvis subject of the training generator, one slice through the prostate, at the split's resolution."""
    maps, _ = phantom.volume(seed, n_slices=1, shape=(256, 256), pixel_mm=1.6, slice_mm=12.0, field_t=field_t)
    return Truth(maps.labels, maps.t1, maps.t2)


def head_reference(seed: int, field_t: float) -> Truth:
    """One head subject of the evaluation-only head generator, one slice through the ventricles."""
    h = brain.head_volume(seed, n_slices=1, field_t=field_t)
    return Truth(h.labels, h.t1, h.t2)


#: Split name -> reference generator (the same generator as the split's cases).
REFERENCES: dict[str, Callable[[int, float], Truth]] = {"in_domain_pelvis": pelvis_reference,
                                                         "unseen_head": head_reference}


def interior(labels: np.ndarray, lab: int) -> np.ndarray:
    """Voxels of tissue ``lab`` away from its boundary (the evaluation's per-tissue mask: one 3x3 in-plane erosion)."""
    return ndimage.binary_erosion(labels == lab, structure=np.ones((1, 3, 3), bool))


def tissue_priors(split: str, tissues: dict[str, int], n_per_field: int = ORACLE_SUBJECTS_PER_FIELD,
                  seed_base: int = ORACLE_SEED_BASE) -> dict[float, dict[int, tuple[float, float]]]:
    """Median (T1, T2) per field and tissue label over the pooled interior voxels of reference subjects of
    ``split``'s generator."""
    make = REFERENCES[split]
    out: dict[float, dict[int, tuple[float, float]]] = {}
    for fi, field in enumerate(FIELDS_T):
        t1s: dict[int, list[np.ndarray]] = {lab: [] for lab in tissues.values()}
        t2s: dict[int, list[np.ndarray]] = {lab: [] for lab in tissues.values()}
        for k in range(n_per_field):
            ref = make(seed_base + 2 * k + fi, field)
            for lab in tissues.values():
                m = interior(ref.labels, lab)
                if m.any():
                    t1s[lab].append(ref.t1[m])
                    t2s[lab].append(ref.t2[m])
        out[field] = {lab: (float(np.median(np.concatenate(t1s[lab]))), float(np.median(np.concatenate(t2s[lab]))))
                      for lab in tissues.values() if t1s[lab]}
    return out


@dataclass
class OracleMaps:
    """T1/T2 maps answered by the oracle (NaN outside the reported tissues)."""

    t1: np.ndarray
    t2: np.ndarray


def oracle_maps(labels: np.ndarray, field_t: float, priors: dict[float, dict[int, tuple[float, float]]]) -> OracleMaps:
    """The oracle's answer for one case: each reported tissue's prior median at the case's field strength."""
    field = min(priors, key=lambda f: abs(f - field_t))
    t1 = np.full(labels.shape, np.nan, np.float32)
    t2 = np.full(labels.shape, np.nan, np.float32)
    for lab, (v1, v2) in priors[field].items():
        t1[labels == lab] = v1
        t2[labels == lab] = v2
    return OracleMaps(t1, t2)


def rendering_maps(image: np.ndarray, labels: np.ndarray, field_t: float, te: float, tr: float,
                   priors: dict[float, dict[int, tuple[float, float]]]) -> QMaps:
    """The oracle's maps for rendering one case: every labelled voxel's tissue T1/T2 from the prior (the constant
    floor's 1000/80 ms where the prior has no figure), PD solved from the input at the case's TE/TR with the exact
    signal equation (as the floor and the network solve it).

    Rendered at the input's own TE/TR these maps give the input back; at any other contrast the error is the
    prior's: what tissue knowledge plus exact physics renders without reading the subject.
    """
    ans = oracle_maps(labels, field_t, priors)
    t1 = np.where(np.isnan(ans.t1), FLOOR_T1_MS, ans.t1).astype(np.float32)
    t2 = np.where(np.isnan(ans.t2), FLOOR_T2_MS, ans.t2).astype(np.float32)
    e = np.maximum(weighting(te, tr, t1, t2), MIN_WEIGHTING)
    n = image.shape[0]
    return QMaps(pd=(image / e).astype(np.float32), t1=t1, t2=t2, te_tr_pred=np.full((n, 2), np.nan, np.float32),
                 scale=1.0)


def spearman_ceiling(sd: np.ndarray, rng: np.random.Generator, draws: int = 5) -> float:
    """Spearman of ``sd`` against ``sd * |z|`` (z standard normal): what a perfectly calibrated sd would score.

    The mean over ``draws`` independent z; 0 where the sd does not vary at all.
    """
    sd = np.asarray(sd, np.float64).ravel()
    if sd.size < 3 or np.ptp(sd) == 0:
        return 0.0
    vals = [spearmanr(sd, sd * np.abs(rng.standard_normal(sd.size))).statistic for _ in range(draws)]
    return float(np.mean(vals))


def describe(split: str, n_per_field: int = ORACLE_SUBJECTS_PER_FIELD) -> dict[str, Any]:
    """How the oracle of ``split`` was built (for the card)."""
    return {"knows": "every voxel's tissue and the field strength, not the subject",
            "answers": "the tissue's median T1/T2 over reference subjects of the same generator",
            "reference_subjects": n_per_field * len(FIELDS_T), "fields_t": list(FIELDS_T),
            "seeds": [ORACLE_SEED_BASE, ORACLE_SEED_BASE + n_per_field * len(FIELDS_T)],
            "generator": REFERENCES[split].__doc__.splitlines()[0] if REFERENCES[split].__doc__ else split}
