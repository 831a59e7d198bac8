"""Evaluate fusion (``qmap/2``): ``python -m rtcontrast.research.evaluate_fusion --model M [--family head]``.

Why a module of its own: the fusion questions are not the single-series ones.  Several
series of one session, each stored in its own intensity scale as scanners do, go through
the node's own path (:meth:`QMapModel.predict_multi` with the node's consistency settings
and the series' field strength), and the table puts side by side:

* ``network``: the fused network alone;
* ``node``: what the node sends (gains from physics, :mod:`rtcontrast.core.gains`), run once
  with *each* input as the geometric target; the row reports the worst target and the largest
  T1/T2 difference between targets (the answer must not depend on the target);
* ``known gains``: the same fit with the true gains (what DICOM would give when it says);
* ``least_squares``: the voxel-wise textbook fit with the true gains (three or more contrasts).

Families: ``pelvis`` (the training phantom's held-out seeds) and ``head``
(:mod:`rtcontrast.research.phantom_head`, written independently and never used in training:
the split that says whether the maps come from the data or from learned anatomy).
Metrics: per tissue the median |error| % of T1 and T2 (eroded masks), and the masked SSIM
of the five seed contrasts rendered from the maps against the noise-free truth.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from rtcontrast.core.consistency import Settings
from rtcontrast.core.inference import QMapModel
from rtcontrast.core.lsq import fit as lsq_fit
from rtcontrast.core.physics import SEED_CONTRAST_NAMES, SEED_CONTRASTS, signal
from rtcontrast.research import phantom, phantom_head
from rtcontrast.research.evaluate import EVAL_SEED_BASE, _metrics

#: Input sets compared for fusion models (names from SEED_CONTRAST_NAMES).
FUSION_SETS: dict[str, tuple[str, ...]] = {
    "1: T2w_75": ("T2w_75",),
    "1: T1w_400": ("T1w_400",),
    "2: T1w_400+T2w_75": ("T1w_400", "T2w_75"),
    "3: T1w_400+PDw+T2w_75": ("T1w_400", "PDw", "T2w_75"),
    "5: all": tuple(SEED_CONTRAST_NAMES),
}
#: Seeds of the head family (evaluation only; research.train never draws from phantom_head).
HEAD_SEED_BASE = 7_300_000
TARGETS = {"tissue_t1_t2_median_pct_max": 5.0, "ssim_within_known_gains": 0.02, "two_series_pelvis_pct_max": 12.0}


def subjects(family: str, n_subjects: int, n_slices: int, seed_base: int | None = None,
             size: int = 256) -> list[dict[str, Any]]:
    """Subjects of one family acquired at the five seed contrasts, each series in its own random gain.

    Same coil within a subject (one bias field), Rician noise per series.
    """
    out = []
    contrasts = dict(zip(SEED_CONTRAST_NAMES, SEED_CONTRASTS))
    for k in range(n_subjects):
        field_t = (1.5, 3.0)[k % 2]
        if family == "pelvis":
            seed = (EVAL_SEED_BASE if seed_base is None else seed_base) + k
            maps, _ = phantom.volume(seed, n_slices=n_slices, shape=(size, size), pixel_mm=1.6 * 256 / size,
                                     slice_mm=12.0, field_t=field_t)
            masks = {t: ndimage.binary_erosion(maps.labels == phantom.LABELS[t], structure=np.ones((1, 3, 3), bool))
                     for t in phantom.MAJOR_TISSUES}
        elif family == "head":
            seed = (HEAD_SEED_BASE if seed_base is None else seed_base) + k
            maps, _ = phantom_head.volume(seed, n_slices=n_slices, shape=(size, size), pixel_mm=240.0 / size,
                                          field_t=field_t)
            masks = phantom_head.major_masks(maps)
        else:
            raise ValueError(f"unknown phantom family {family!r} (pelvis|head)")
        rng = np.random.default_rng(seed * 17)
        snr = float(rng.uniform(40, 100))
        bias = phantom.bias_field(rng, maps.pd.shape, float(rng.uniform(0, 0.25)))
        imgs, gains = {}, {}
        for name, (te, tr) in contrasts.items():
            gains[name] = float(np.exp(rng.uniform(np.log(200), np.log(5000))))
            imgs[name] = phantom.acquire(maps, te, tr, rng, snr=snr, bias_strength=0.0, gain=gains[name]).image * bias
        out.append({"maps": maps, "imgs": imgs, "gains": gains, "bias": bias, "masks": masks, "field_t": field_t})
    return out


def _tissue_errors(subs: list[dict], preds: list[tuple[np.ndarray, ...]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for t in subs[0]["masks"]:
        e1, e2 = [], []
        for s, (_, t1, t2) in zip(subs, preds):
            m = s["masks"][t]
            if m.any():
                e1.append(np.abs(t1[m] / s["maps"].t1[m] - 1))
                e2.append(np.abs(t2[m] / s["maps"].t2[m] - 1))
        if e1:
            out[t] = {"t1": float(np.median(np.concatenate(e1)) * 100), "t2": float(np.median(np.concatenate(e2)) * 100)}
    return out


def _render(subs: list[dict], preds: list[tuple[np.ndarray, ...]], units: list[float]) -> dict[str, dict[str, float]]:
    """Masked SSIM etc. of the seed contrasts; ``units`` per subject: the stored-value gain PD is in."""
    res = {}
    mask = np.concatenate([s["maps"].labels > 0 for s in subs])
    for tn, (te, tr) in zip(SEED_CONTRAST_NAMES, SEED_CONTRASTS):
        truth = np.concatenate([signal(s["maps"].pd * u * s["bias"], te, tr, s["maps"].t1, s["maps"].t2)
                                for s, u in zip(subs, units)])
        rend = np.concatenate([signal(pd, te, tr, t1, t2) for pd, t1, t2 in preds])
        res[tn] = _metrics(rend.astype(np.float32), truth.astype(np.float32), mask)
    return res


def _row(subs: list[dict], preds: list[tuple[np.ndarray, ...]], units: list[float]) -> dict[str, Any]:
    tissue = _tissue_errors(subs, preds)
    render = _render(subs, preds, units)
    return {"tissues": tissue, "render": render,
            "max_t1_t2_mae_pct": max(max(v.values()) for v in tissue.values()),
            "median_t1_mae_pct": float(np.median([v["t1"] for v in tissue.values()])),
            "median_t2_mae_pct": float(np.median([v["t2"] for v in tissue.values()])),
            "min_ssim": min(v["ssim"] for v in render.values())}


def evaluate_fusion(model_path: str | Path, n_subjects: int = 4, n_slices: int = 4, provider: str = "cpu",
                    seed_base: int | None = None, consistency: Settings | None = None,
                    sets: dict[str, tuple[str, ...]] | None = None, family: str = "pelvis",
                    size: int = 256) -> dict:
    """The fusion table of one phantom family (see the module docstring)."""
    model = QMapModel(model_path, provider=provider)
    contrasts = dict(zip(SEED_CONTRAST_NAMES, SEED_CONTRASTS))
    subs = subjects(family, n_subjects, n_slices, seed_base, size)
    cfg = consistency or Settings()
    report: dict = {"model": model.info.name, "version": model.info.version, "contract": model.info.contract,
                    "family": family, "subjects": n_subjects, "slices": n_slices, "matrix": [size, size],
                    "series_scales": "each series its own random gain (200-5000)", "sets": {}, "targets": TARGETS}
    for set_name, names in (sets or FUSION_SETS).items():
        row: dict = {}
        fits_network = len(names) <= model.info.max_inputs
        if fits_network:
            preds = [model.predict_multi([(s["imgs"][n], *contrasts[n]) for n in names]) for s in subs]
            row["network"] = _row(subs, [(q.pd, q.t1, q.t2) for q in preds], [s["gains"][names[0]] for s in subs])
        if fits_network and len(names) > 1:
            per_target, t1s, t2s, sources = [], [], [], []
            for first in range(len(names)):
                order = [names[first]] + [n for n in names if n != names[first]]
                qs = [model.predict_multi([(s["imgs"][n], *contrasts[n]) for n in order], consistency=cfg,
                                          field_t=s["field_t"]) for s in subs]
                sources.append(sorted({q.fusion["gain_source"] for q in qs}))
                t1s.append([q.t1 for q in qs])
                t2s.append([q.t2 for q in qs])
                r = _row(subs, [(q.pd, q.t1, q.t2) for q in qs], [s["gains"][order[0]] for s in subs])
                r["target"] = order[0]
                per_target.append(r)
            worst = max(per_target, key=lambda r: r["max_t1_t2_mae_pct"])
            spread = 0.0
            for j in range(1, len(names)):
                for si, s in enumerate(subs):
                    m = s["maps"].labels > 0
                    spread = max(spread, float(np.median(np.abs(t1s[j][si][m] / np.maximum(t1s[0][si][m], 1e-3) - 1))),
                                 float(np.median(np.abs(t2s[j][si][m] / np.maximum(t2s[0][si][m], 1e-3) - 1))))
            row["node"] = {**worst, "targets": {r["target"]: {k: r[k] for k in ("max_t1_t2_mae_pct", "median_t1_mae_pct",
                                                                                  "median_t2_mae_pct", "min_ssim")}
                                                for r in per_target},
                           "target_spread_pct": spread * 100, "gain_sources": sources}
            qs = [model.predict_multi([(s["imgs"][n], *contrasts[n]) for n in names], consistency=cfg,
                                      field_t=s["field_t"], known_gains=([s["gains"][n] for n in names], "truth"))
                  for s in subs]
            row["known gains"] = _row(subs, [(q.pd, q.t1, q.t2) for q in qs], [s["gains"][names[0]] for s in subs])
        try:
            preds = [lsq_fit(np.stack([s["imgs"][n] / s["gains"][n] for n in names]),
                             np.array([contrasts[n] for n in names], np.float32)) for s in subs]
            row["least_squares"] = _row(subs, preds, [1.0] * len(subs))
        except ValueError as exc:
            row["least_squares"] = {"not_determined": str(exc)}
        report["sets"][set_name] = row
    return report


def format_fusion_table(report: dict) -> str:
    """Side-by-side table of the fusion report."""
    tissues = next(list(r["tissues"]) for row in report["sets"].values() for r in row.values() if "tissues" in r)
    lines = [(f"Fusion ({report.get('family', 'pelvis')} phantom, series in different scales): median |error| % "
              "of T1 / T2 per tissue, and min SSIM of the five rendered contrasts"),
             f"{'inputs':24s} {'method':14s}" + "".join(f"{t:>14s}" for t in tissues) + f"{'minSSIM':>9s}"]
    for set_name, row in report["sets"].items():
        for method, r in row.items():
            if "not_determined" in r:
                lines.append(f"{set_name:24s} {method:14s} not determined: {r['not_determined']}")
                continue
            cells = "".join(f"{r['tissues'][t]['t1']:>7.1f}/{r['tissues'][t]['t2']:<6.1f}" if t in r["tissues"]
                            else f"{'-':>14s}" for t in tissues)
            extra = (f"  worst target {r['target']}, T1/T2 spread between targets {r['target_spread_pct']:.2f} %"
                     if "target_spread_pct" in r else "")
            lines.append(f"{set_name:24s} {method:14s}{cells}{r['min_ssim']:>9.4f}{extra}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rtcontrast.research.evaluate_fusion", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--family", default="pelvis", choices=["pelvis", "head"])
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--size", type=int, default=256, help="matrix (the field of view is kept)")
    ap.add_argument("--sets", default=None, help="comma-separated set names (default: all)")
    ap.add_argument("--json", default=None, help="write the report as JSON here")
    ap.add_argument("--provider", default="cpu", choices=["auto", "cpu", "cuda"])
    a = ap.parse_args(argv)
    sets = {k: v for k, v in FUSION_SETS.items() if k in a.sets.split(",")} if a.sets else None
    report = evaluate_fusion(a.model, a.subjects, a.slices, a.provider, sets=sets, family=a.family, size=a.size)
    print(format_fusion_table(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
