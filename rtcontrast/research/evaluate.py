"""Evaluate a ``qmap/1`` ONNX model on the held-out phantom split: ``python -m rtcontrast.research.evaluate --model M``.

The split is subjects whose seeds were never used in training (``dataset.HELDOUT_SEED_BASE``
+ 500 onwards, 256x256, 1.5 T and 3 T alternating), acquired like a scanner would (bias,
gain, Rician noise).  The model runs through the node's own inference path
(:class:`rtcontrast.core.inference.QMapModel`), so what is measured is what the node does.

Reported per input contrast (the seed's five):
* every target contrast rendered from the maps vs the noise-free truth: masked SSIM,
  PSNR (peak = truth maximum in the body) and NRMSE (RMS error / truth range in the body);
* the input's own contrast re-rendered: NRMSE against the truth and against the input;
* per major tissue (eroded masks): median absolute % error of PD (input units, bias
  included: bias is indistinguishable from PD), T1 and T2;
* TE/TR identified from the image alone: median absolute % error.

``qmap/3`` models get each subject's field strength.  After this table, ``main`` prints the
generalisation tables of :mod:`rtcontrast.research.evaluate_se` (in-domain pelvis vs the unseen head
anatomy, beside the constant-maps floor, with uncertainty calibration) unless
``--generalisation no``.
"""

from __future__ import annotations

import argparse
import sys
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.metrics import structural_similarity

from rtcontrast.core.inference import QMapModel
from rtcontrast.core.maps import QMaps
from rtcontrast.core.physics import SEED_CONTRAST_NAMES, SEED_CONTRASTS, signal
from rtcontrast.research import phantom
from rtcontrast.research.dataset import HELDOUT_SEED_BASE

EVAL_SEED_BASE = HELDOUT_SEED_BASE + 500

TARGETS = {
    "ssim_min": 0.97,
    "psnr_min_db": 35.0,
    "self_nrmse_max": 0.02,
    "tissue_mae_max_pct": 5.0,
    "te_id_max_pct": 15.0,
    "tr_id_max_pct": 20.0,
}


@dataclass
class Case:
    """One held-out subject volume acquired at one contrast."""

    maps: phantom.Maps
    image: np.ndarray
    truth_pd: np.ndarray  # PD in image units (gain * bias * PD)
    te: float
    tr: float


def held_out_cases(n_subjects: int, n_slices: int, te: float, tr: float) -> list[Case]:
    """The held-out volumes acquired at (te, tr); deterministic."""
    cases = []
    for k in range(n_subjects):
        seed = EVAL_SEED_BASE + k
        maps, _ = phantom.volume(seed, n_slices=n_slices, shape=(256, 256), pixel_mm=1.6, slice_mm=12.0,
                                 field_t=(1.5, 3.0)[k % 2])
        rng = np.random.default_rng(seed * 31 + int(te) * 7 + int(tr))
        acq = phantom.acquire(maps, te, tr, rng, snr=float(rng.uniform(30, 100)))
        cases.append(Case(maps, acq.image, (maps.pd * acq.gain * acq.bias).astype(np.float32), te, tr))
    return cases


def nrmse(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """RMS error over ``mask`` divided by the truth's range there (the cards' NRMSE; nan for an empty mask)."""
    if not mask.any():
        return float("nan")
    rng_ = float(truth[mask].max() - truth[mask].min()) or 1.0
    return float(np.sqrt(np.mean((pred[mask].astype(np.float64) - truth[mask]) ** 2)) / rng_)


def _metrics(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    peak = float(truth[mask].max())
    err = (pred - truth)[mask].astype(np.float64)
    mse = float(np.mean(err**2))
    ssims = []
    for i in range(truth.shape[0]):
        _, smap = structural_similarity(truth[i], pred[i], data_range=peak, full=True, gaussian_weights=True,
                                        sigma=1.5, use_sample_covariance=False)
        ssims.append(smap[mask[i]])
    return {
        "ssim": float(np.mean(np.concatenate(ssims))),
        "psnr": float(10 * np.log10(peak**2 / max(mse, 1e-20))),
        "nrmse": nrmse(pred, truth, mask),
    }


def _tissue_errors(pred: QMaps, cases_truth: list[tuple[Case, QMaps]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for tissue in phantom.MAJOR_TISSUES:
        errs: dict[str, list[np.ndarray]] = {"pd": [], "t1": [], "t2": []}
        for case, qm in cases_truth:
            lab = case.maps.labels == phantom.LABELS[tissue]
            lab = ndimage.binary_erosion(lab, structure=np.ones((1, 3, 3), bool))
            if not lab.any():
                continue
            errs["pd"].append(np.abs(qm.pd[lab] / case.truth_pd[lab] - 1))
            errs["t1"].append(np.abs(qm.t1[lab] / case.maps.t1[lab] - 1))
            errs["t2"].append(np.abs(qm.t2[lab] / case.maps.t2[lab] - 1))
        if errs["pd"]:
            out[tissue] = {k: float(np.median(np.concatenate(v)) * 100) for k, v in errs.items()}
    return out


def evaluate(model_path: str | Path, n_subjects: int = 6, n_slices: int = 4, figure: str | Path | None = None,
             provider: str = "cpu") -> dict:
    """Run the evaluation; returns a JSON-able report (also used for the model card)."""
    model = QMapModel(model_path, provider=provider)
    report: dict = {"model": model.info.name, "version": model.info.version, "sha256": model.sha256,
                    "contract": model.info.contract,
                    "split": {"seeds": [EVAL_SEED_BASE, EVAL_SEED_BASE + n_subjects - 1], "slices_per_subject": n_slices,
                              "matrix": [256, 256], "fields_t": [1.5, 3.0]},
                    "targets": TARGETS, "inputs": {}}
    fig_data = None
    for name, (te, tr) in zip(SEED_CONTRAST_NAMES, SEED_CONTRASTS):
        cases = held_out_cases(n_subjects, n_slices, te, tr)
        preds = [model.predict(c.image, te, tr, field_t=c.maps.field_t) for c in cases]  # field: qmap/3 only
        entry: dict = {"te_tr": [te, tr], "render": {}}
        for tname, (tte, ttr) in zip(SEED_CONTRAST_NAMES, SEED_CONTRASTS):
            truth = np.concatenate([signal(c.truth_pd, tte, ttr, c.maps.t1, c.maps.t2) for c in cases])
            pred = np.concatenate([signal(p.pd, tte, ttr, p.t1, p.t2) for p in preds])
            mask = np.concatenate([c.maps.labels > 0 for c in cases])
            entry["render"][tname] = _metrics(pred.astype(np.float32), truth.astype(np.float32), mask)
        own = np.concatenate([signal(p.pd, te, tr, p.t1, p.t2) for p in preds])
        img = np.concatenate([c.image for c in cases])
        mask = np.concatenate([c.maps.labels > 0 for c in cases])
        rng_ = float(img[mask].max() - img[mask].min())
        entry["self_nrmse_vs_input"] = float(np.sqrt(np.mean((own - img)[mask] ** 2)) / rng_)
        entry["self_nrmse_vs_truth"] = entry["render"][name]["nrmse"]
        entry["tissues"] = _tissue_errors(preds[0], list(zip(cases, preds)))
        idp = np.concatenate([p.te_tr_pred for p in preds])
        entry["te_id_err_pct"] = float(np.median(np.abs(idp[:, 0] / te - 1)) * 100)
        entry["tr_id_err_pct"] = float(np.median(np.abs(idp[:, 1] / tr - 1)) * 100)
        report["inputs"][name] = entry
        if fig_data is None or name == "T2w_75":
            fig_data = (name, cases[0], preds[0])
    report["summary"] = summarise(report)
    if figure and fig_data:
        save_figure(figure, *fig_data)
    return report


def summarise(report: dict) -> dict:
    """Worst cases against the targets, and whether each target is met."""
    ins = report["inputs"].values()
    cross = [(m["ssim"], m["psnr"]) for e in ins for t, m in e["render"].items()
             if tuple(e["te_tr"]) != tuple(SEED_CONTRASTS[SEED_CONTRAST_NAMES.index(t)])]
    tissue = [v for e in ins for t in e["tissues"].values() for v in t.values()]
    s = {
        "min_cross_ssim": min(c[0] for c in cross),
        "min_cross_psnr_db": min(c[1] for c in cross),
        "max_self_nrmse_vs_truth": max(e["self_nrmse_vs_truth"] for e in ins),
        "max_tissue_mae_pct": max(tissue),
        "max_te_id_err_pct": max(e["te_id_err_pct"] for e in ins),
        "max_tr_id_err_pct": max(e["tr_id_err_pct"] for e in ins),
    }
    t = TARGETS
    s["met"] = {
        "ssim": s["min_cross_ssim"] >= t["ssim_min"],
        "psnr": s["min_cross_psnr_db"] >= t["psnr_min_db"],
        "self_nrmse": s["max_self_nrmse_vs_truth"] <= t["self_nrmse_max"],
        "tissue_mae": s["max_tissue_mae_pct"] <= t["tissue_mae_max_pct"],
        "te_id": s["max_te_id_err_pct"] <= t["te_id_max_pct"],
        "tr_id": s["max_tr_id_err_pct"] <= t["tr_id_max_pct"],
    }
    return s


def format_table(report: dict) -> str:
    """A plain-text table of the report (printed, and kept in the model card)."""
    lines = []
    names = list(SEED_CONTRAST_NAMES)
    lines.append("Rendered contrasts vs truth (SSIM / PSNR dB), rows = input, columns = rendered")
    lines.append(f"{'input':10s}" + "".join(f"{n:>16s}" for n in names))
    for n, e in report["inputs"].items():
        lines.append(f"{n:10s}" + "".join(f"{e['render'][t]['ssim']:>9.4f}/{e['render'][t]['psnr']:5.1f}" for t in names))
    lines.append("")
    lines.append("Self re-render NRMSE (vs truth, vs input) and TE/TR identification error (median %)")
    for n, e in report["inputs"].items():
        lines.append(f"{n:10s} nrmse {e['self_nrmse_vs_truth']*100:5.2f}% {e['self_nrmse_vs_input']*100:5.2f}%  "
                     f"TE {e['te_id_err_pct']:5.1f}%  TR {e['tr_id_err_pct']:5.1f}%")
    lines.append("")
    lines.append("Median absolute error per tissue (%): PD / T1 / T2")
    tissues = list(phantom.MAJOR_TISSUES)
    lines.append(f"{'input':10s}" + "".join(f"{t:>20s}" for t in tissues))
    for n, e in report["inputs"].items():
        row = f"{n:10s}"
        for t in tissues:
            v = e["tissues"].get(t)
            row += f"{v['pd']:>8.1f}/{v['t1']:4.1f}/{v['t2']:5.1f}" if v else f"{'-':>20s}"
        lines.append(row)
    lines.append("")
    s = report["summary"]
    lines.append("Summary: " + ", ".join(f"{k}={v:.3f}" for k, v in s.items() if k != "met"))
    lines.append("Targets met: " + ", ".join(f"{k}={'yes' if v else 'NO'}" for k, v in s["met"].items()))
    return "\n".join(lines)


def save_figure(path: str | Path, name: str, case: Case, pred: QMaps) -> None:
    """Input, maps vs truth, rendered vs truth and error maps of the middle slice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    i = case.image.shape[0] // 2
    body = case.maps.labels[i] > 0
    fig, ax = plt.subplots(4, 5, figsize=(17, 13))
    ax[0, 0].imshow(case.image[i], cmap="gray")
    ax[0, 0].set_title(f"input {name}")
    for j, (lab, p, t, vmax) in enumerate((("PD", pred.pd[i], case.truth_pd[i], np.percentile(case.truth_pd[i], 99.5)),
                                           ("T1 ms", pred.t1[i], case.maps.t1[i], 4000),
                                           ("T2 ms", pred.t2[i], case.maps.t2[i], 300))):
        ax[0, j + 1].imshow(np.where(body, p, 0), cmap="magma", vmin=0, vmax=vmax)
        ax[0, j + 1].set_title(f"{lab} predicted")
        ax[1, j + 1].imshow(t, cmap="magma", vmin=0, vmax=vmax)
        ax[1, j + 1].set_title(f"{lab} truth")
    ax[0, 4].imshow(np.where(body, pred.t2[i] / np.maximum(case.maps.t2[i], 1) - 1, 0), cmap="coolwarm", vmin=-0.3, vmax=0.3)
    ax[0, 4].set_title("T2 relative error")
    ax[1, 0].imshow(np.where(body, pred.t1[i] / np.maximum(case.maps.t1[i], 1) - 1, 0), cmap="coolwarm", vmin=-0.3, vmax=0.3)
    ax[1, 0].set_title("T1 relative error")
    for j, (tn, (te, tr)) in enumerate(zip(SEED_CONTRAST_NAMES, SEED_CONTRASTS)):
        t = signal(case.truth_pd[i], te, tr, case.maps.t1[i], case.maps.t2[i])
        p = signal(pred.pd[i], te, tr, pred.t1[i], pred.t2[i])
        vmax = float(np.percentile(t, 99.5)) or 1.0
        ax[2, j].imshow(p, cmap="gray", vmin=0, vmax=vmax)
        ax[2, j].set_title(f"rendered {tn}")
        ax[3, j].imshow(p - t, cmap="coolwarm", vmin=-0.1 * vmax, vmax=0.1 * vmax)
        ax[3, j].set_title(f"error {tn} (±10 %)")
    for a in ax.ravel():
        a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


def not_an_onnx_model(path: Path) -> str | None:
    """Why ``path`` is no ONNX model this evaluation can run (None when it is one).

    A training checkpoint (``.pt``) is the usual mistake: it must be exported first, which
    is also what checks it against the contract.
    """
    if not path.is_file():
        return f"{path}: no such file"
    if path.suffix in (".pt", ".pth", ".ckpt"):
        return f"{path} is a training checkpoint, not an ONNX model: export it first (python export_onnx.py {path} --out M.onnx)"
    with open(path, "rb") as fh:
        head = fh.read(4)
    if path.suffix != ".onnx" or not head or head[:1] != b"\x08":  # an ONNX ModelProto starts with ir_version (field 1)
        return f"{path} is not an ONNX model (.onnx)"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rtcontrast.research.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--subjects", type=int, default=6)
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--figure", default=None, help="PNG path (default: OUT_DIR/NAME.eval.png)")
    ap.add_argument("--out-dir", default="var/evaluate", type=Path,
                    help="folder for figures (default var/evaluate; the shipped models/NAME.eval.png is the export's)")
    ap.add_argument("--json", default=None, help="write the report as JSON here")
    ap.add_argument("--provider", default="cpu", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--fusion", action="store_true", help="also the qmap/2 fusion table on the pelvis family (rtcontrast.research.evaluate_fusion)")
    ap.add_argument("--generalisation", choices=["auto", "yes", "no"], default="auto",
                    help="in-domain vs unseen-anatomy tables with the constant-maps floor and calibration "
                         "(rtcontrast.research.evaluate_se); auto = yes for qmap/1 and qmap/3 models")
    a = ap.parse_args(argv)
    problem = not_an_onnx_model(Path(a.model))
    if problem:
        print(f"evaluate: {problem}", file=sys.stderr)
        return 2
    if a.figure is None:
        a.out_dir.mkdir(parents=True, exist_ok=True)
    fig = a.figure or str(a.out_dir / (Path(a.model).stem + ".eval.png"))
    report = evaluate(a.model, a.subjects, a.slices, fig, a.provider)
    print(format_table(report))
    if a.generalisation == "yes" or (a.generalisation == "auto" and report.get("contract", "qmap/1") != "qmap/2"):
        from rtcontrast.research.evaluate_se import format_generalisation, generalisation

        report["generalisation"] = generalisation(a.model, a.subjects, a.slices, a.provider)
        print()
        print(format_generalisation(report["generalisation"]))
    if a.fusion:  # the fusion table lives in its own module (python -m rtcontrast.research.evaluate_fusion)
        from rtcontrast.research.evaluate_fusion import (
            evaluate_fusion,
            format_fusion_table,
        )

        report["fusion"] = evaluate_fusion(a.model, a.subjects, a.slices, a.provider)
        print()
        print(format_fusion_table(report["fusion"]))
    print(f"figure: {fig}")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0 if all(report["summary"]["met"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
