"""An evaluation report with pictures: ``python -m rtcontrast.research.report --model M.onnx [--data FOLDER] --out DIR``.

Why: numbers in a model card do not tell a physicist whether the maps *look* right for
their anatomy, or whether a fine-tuned model still behaves on the held-out phantoms.
This writes ``DIR/report.md`` (Markdown) with PNG figures:

* held-out phantoms (``rtcontrast.research.evaluate``'s split, truth known): example slices of the
  input, predicted maps vs truth, rendered contrasts and error maps; per-tissue
  Bland-Altman plots of T1 and T2 (region means per slice, % difference) with a bias /
  limits-of-agreement table (limits only from at least :data:`MIN_BA_POINTS` points:
  a standard deviation of one or two points is no limit of agreement);
* real data (``--data``, scanned with :func:`rtcontrast.research.importer.scan`, no truth): an
  example slice (input, maps, rendered contrasts) per contrast, identified vs header
  TE/TR, the self-consistency residual per series (rendering at the input's own TE/TR
  against the input), and for paired series the cross-contrast residual (render at the
  other series' TE/TR, per-slice least-squares gain, since each series has its own scale).

The model runs through the node's own inference path (:class:`rtcontrast.core.inference.QMapModel`).
Real series are named by UID and patient hash only (no patient identity in the report).
Every image has a colour bar with its unit; log axes are labelled at 1-2-5 steps only
(matplotlib's default minor labels overlapped).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from rtcontrast.research import phantom
from rtcontrast.research.evaluate import held_out_cases, nrmse, save_figure
from rtcontrast.core.physics import SEED_CONTRAST_NAMES, SEED_CONTRASTS, signal
from rtcontrast.core.inference import QMapModel
from rtcontrast.core.maps import QMaps

log = logging.getLogger(__name__)

#: Input contrasts shown for the phantom split (a T2w and a T1w input).
PHANTOM_INPUTS: tuple[str, ...] = ("T2w_75", "T1w_400")
#: Voxels above this fraction of the series scale are "body" for real-data residuals.
BODY_FRACTION = 0.05
#: Bland-Altman limits of agreement (bias +- 1.96 SD) need at least this many points.
MIN_BA_POINTS = 10


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log_axis(ax: Any, which: str = "x") -> None:
    """A log axis labelled at 1, 2, 5 x 10^k with plain numbers ("50", "200"), no minor labels."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis = ax.xaxis if which == "x" else ax.yaxis
    (ax.set_xscale if which == "x" else ax.set_yscale)("log")
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _imshow(ax: Any, img: np.ndarray, title: str, unit: str, **kw: Any) -> None:
    """An image with its colour bar (labelled with the unit) and no axes."""
    im = ax.imshow(img, **kw)
    cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cb.ax.tick_params(labelsize=6)
    if unit:
        cb.set_label(unit, fontsize=7)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


# ----------------------------------------------------------------------------- phantoms


def bland_altman_points(cases: list, preds: list[QMaps]) -> dict[str, dict[str, np.ndarray]]:
    """Per tissue: region means of predicted and true T1/T2 per slice (eroded label masks)."""
    out: dict[str, dict[str, list[float]]] = {}
    for case, p in zip(cases, preds):
        for tissue in phantom.MAJOR_TISSUES:
            lab = case.maps.labels == phantom.LABELS[tissue]
            lab = ndimage.binary_erosion(lab, structure=np.ones((1, 3, 3), bool))
            for z in range(lab.shape[0]):
                m = lab[z]
                if m.sum() < 5:
                    continue
                d = out.setdefault(tissue, {"t1_pred": [], "t1_true": [], "t2_pred": [], "t2_true": []})
                d["t1_pred"].append(float(p.t1[z][m].mean()))
                d["t1_true"].append(float(case.maps.t1[z][m].mean()))
                d["t2_pred"].append(float(p.t2[z][m].mean()))
                d["t2_true"].append(float(case.maps.t2[z][m].mean()))
    return {t: {k: np.asarray(v) for k, v in d.items()} for t, d in out.items()}


def bland_altman_stats(points: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per tissue and quantity: n, bias and 95 % limits of agreement of the % difference.

    The limits are None with fewer than :data:`MIN_BA_POINTS` points (an SD from n = 1 is 0,
    from n = 2 or 3 meaningless): the report says so instead of drawing a false band.
    """
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for tissue, d in points.items():
        out[tissue] = {}
        for q in ("t1", "t2"):
            pred, true = d[f"{q}_pred"], d[f"{q}_true"]
            diff = 100 * (pred - true) / ((pred + true) / 2)
            bias = float(diff.mean()) if diff.size else float("nan")
            enough = diff.size >= MIN_BA_POINTS
            sd = float(diff.std(ddof=1)) if enough else None
            out[tissue][q] = {"n": int(diff.size), "bias_pct": bias,
                              "loa_low_pct": bias - 1.96 * sd if sd is not None else None,
                              "loa_high_pct": bias + 1.96 * sd if sd is not None else None}
    return out


def _loa_text(s: dict[str, float | None]) -> str:
    if s["loa_low_pct"] is None:
        return f"n < {MIN_BA_POINTS}"
    return f"{s['loa_low_pct']:+.1f} .. {s['loa_high_pct']:+.1f}"


def plot_bland_altman(points: dict[str, dict[str, np.ndarray]], path: Path, title: str) -> None:
    """Bland-Altman of T1 and T2 (all tissues): limits drawn only from >= MIN_BA_POINTS points."""
    fig = bland_altman_figure(points, title)
    fig.savefig(path, dpi=70)
    _plt().close(fig)


def bland_altman_figure(points: dict[str, dict[str, np.ndarray]], title: str) -> Any:
    """The Bland-Altman figure (see :func:`plot_bland_altman`)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, q, unit in ((axes[0], "t1", "T1"), (axes[1], "t2", "T2")):
        alld = []
        for tissue, d in points.items():
            pred, true = d[f"{q}_pred"], d[f"{q}_true"]
            mean = (pred + true) / 2
            diff = 100 * (pred - true) / mean
            alld.append(diff)
            ax.scatter(mean, diff, s=14, label=tissue)
        a = np.concatenate(alld) if alld else np.zeros(0)
        if a.size >= MIN_BA_POINTS:
            bias, sd = float(a.mean()), float(a.std(ddof=1))
            for y, style, label in ((bias, "-", f"bias {bias:+.1f} %"),
                                    (bias - 1.96 * sd, "--", "95 % limits of agreement"), (bias + 1.96 * sd, "--", None)):
                ax.axhline(y, color="k", linestyle=style, linewidth=0.8, label=label)
        else:
            ax.text(0.02, 0.96, f"n = {a.size} < {MIN_BA_POINTS}: no limits of agreement", transform=ax.transAxes,
                    fontsize=8, va="top")
        ax.axhline(0, color="grey", linewidth=0.5)
        log_axis(ax, "x")
        ax.set_xlabel(f"mean of predicted and true {unit} (ms)")
        ax.set_ylabel(f"{unit} difference (% of mean)")
        ax.set_title(f"{unit}: {title}", fontsize=9)
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def phantom_section(model: QMapModel, out: Path, n_subjects: int, n_slices: int) -> tuple[list[str], dict]:
    lines = ["## Held-out phantoms (truth known)", "",
             f"Subjects from the evaluation split ({n_subjects} subject(s) x {n_slices} slice(s), 256x256, 1.5 T / 3 T), "
             "acquired with bias, gain and Rician noise.", ""]
    data: dict = {}
    for name in PHANTOM_INPUTS:
        te, tr = SEED_CONTRASTS[SEED_CONTRAST_NAMES.index(name)]
        cases = held_out_cases(n_subjects, n_slices, te, tr)
        preds = [model.predict(c.image, te, tr) for c in cases]
        ex = f"phantom_example_{name}.png"
        save_figure(out / ex, name, cases[0], preds[0])
        pts = bland_altman_points(cases, preds)
        ba = f"bland_altman_{name}.png"
        plot_bland_altman(pts, out / ba, f"input {name} (TE {te:g} / TR {tr:g} ms)")
        stats = bland_altman_stats(pts)
        data[name] = stats
        lines += [f"### Input {name} (TE {te:g} ms, TR {tr:g} ms)", "",
                  f"![example slice: input, maps vs truth, rendered contrasts and errors]({ex})", "",
                  f"![Bland-Altman T1 and T2 per tissue]({ba})", "",
                  "| tissue | n | T1 bias % | T1 95 % LoA % | T2 bias % | T2 95 % LoA % |", "|---|---|---|---|---|---|"]
        for tissue, s in stats.items():
            t1, t2 = s["t1"], s["t2"]
            lines.append(f"| {tissue} | {t1['n']} | {t1['bias_pct']:+.1f} | {_loa_text(t1)} "
                         f"| {t2['bias_pct']:+.1f} | {_loa_text(t2)} |")
        lines += ["", f"Limits of agreement are given from {MIN_BA_POINTS} points (slices) per tissue on; "
                      "use more subjects/slices (`--subjects`, `--slices`) for them.", ""]
    return lines, data


# ----------------------------------------------------------------------------- real data


def real_example_figure(pixels: np.ndarray, maps: QMaps, te: float, tr: float, label: str) -> Any:
    """Middle slice: input, PD/T1/T2 maps, three rendered contrasts, residual; each with a colour bar."""
    plt = _plt()
    z = pixels.shape[0] // 2
    shown = [("input", pixels[z], "gray", None, "stored value"), ("PD", maps.pd[z], "magma", None, "PD (input units)"),
             ("T1", maps.t1[z], "magma", 4000, "ms"), ("T2", maps.t2[z], "magma", 300, "ms")]
    for n, (cte, ctr) in zip(SEED_CONTRAST_NAMES, SEED_CONTRASTS):
        if n in ("T2w_75", "T1w_400", "PDw"):
            shown.append((f"rendered {n}", signal(maps.pd[z], cte, ctr, maps.t1[z], maps.t2[z]), "gray", None,
                          "signal (input units)"))
    own = signal(maps.pd[z], te, tr, maps.t1[z], maps.t2[z])
    shown.append(("own TE/TR - input", own - pixels[z], "coolwarm", None, "difference (input units)"))
    fig, axes = plt.subplots(1, len(shown), figsize=(3.0 * len(shown), 3.2))
    for ax, (title, img, cmap, vmax, unit) in zip(axes, shown):
        if cmap == "coolwarm":
            lim = float(np.percentile(np.abs(pixels[z]), 99)) * 0.1 or 1.0
            _imshow(ax, img, title, unit, cmap=cmap, vmin=-lim, vmax=lim)
        else:
            _imshow(ax, img, title, unit, cmap=cmap, vmin=0,
                    vmax=vmax if vmax else (float(np.percentile(img, 99.5)) or 1.0))
    fig.suptitle(label, fontsize=9)
    fig.tight_layout()
    return fig


def _real_example(path: Path, pixels: np.ndarray, maps: QMaps, te: float, tr: float, label: str) -> None:
    fig = real_example_figure(pixels, maps, te, tr, label)
    fig.savefig(path, dpi=70)
    _plt().close(fig)


def identification_figure(rows: list[dict[str, Any]]) -> Any:
    """Identified vs header TE and TR (log axes, 1-2-5 labels) and the self-consistency NRMSE per series."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, k, unit in ((axes[0], "te", "TE"), (axes[1], "tr", "TR")):
        hdr = np.concatenate([[r[k]] * len(r[f"{k}_id_slices"]) for r in rows])
        idn = np.concatenate([r[f"{k}_id_slices"] for r in rows])
        ax.scatter(hdr, idn, s=10, alpha=0.6, label="slices")
        ax.scatter([r[k] for r in rows], [r[f"{k}_id"] for r in rows], s=40, marker="x", color="k", label="series median")
        lo_, hi_ = min(hdr.min(), idn.min()) * 0.8, max(hdr.max(), idn.max()) * 1.25
        ax.plot([lo_, hi_], [lo_, hi_], color="grey", linewidth=0.8)
        ax.set_xlim(lo_, hi_)
        ax.set_ylim(lo_, hi_)
        log_axis(ax, "x")
        log_axis(ax, "y")
        ax.set_xlabel(f"header {unit} (ms)")
        ax.set_ylabel(f"identified {unit} (ms)")
        ax.legend(fontsize=7)
    axes[2].bar(range(len(rows)), [100 * r["self_nrmse"] for r in rows])
    axes[2].set_xticks(range(len(rows)), [f"…{r['series_uid'][-6:]}\n{r['te']:g}/{r['tr']:g}" for r in rows], fontsize=6,
                       rotation=90 if len(rows) > 8 else 0)
    axes[2].set_ylabel("self-consistency NRMSE (%)")
    axes[2].set_title("render at own TE/TR vs input")
    fig.tight_layout()
    return fig


def real_section(model: QMapModel, folder: Path, out: Path) -> tuple[list[str], dict]:
    from rtcontrast.core.contract import series_scale
    from rtcontrast.research.importer import load_series, scan

    rep = scan(folder)
    lines = ["## Real data (no truth)", "",
             f"{len(rep.series)} spin-echo series of {len(rep.patients)} patient(s), {len(rep.paired_groups)} paired "
             f"group(s); {len(rep.skipped)} file(s)/series skipped (see `python -m rtcontrast.research.importer scan`).", ""]
    rows, loaded, examples = [], {}, set()
    for s in rep.series:
        key = f"{s.series_uid}|{s.te_ms}|{s.tr_ms}"
        try:
            pixels, te, tr = load_series(s)
        except Exception as exc:  # the importer's loader names the problem
            lines.append(f"- series …{s.series_uid[-12:]}: not evaluated: {type(exc).__name__}: {exc}")
            continue
        maps = model.predict(pixels, te, tr)
        mask = pixels > BODY_FRACTION * maps.scale
        own = signal(maps.pd, te, tr, maps.t1, maps.t2)
        idp = np.median(maps.te_tr_pred, axis=0)
        row = {"series_uid": s.series_uid, "patient_hash": s.patient_hash, "te": te, "tr": tr,
               "te_id": float(idp[0]), "tr_id": float(idp[1]), "te_id_slices": maps.te_tr_pred[:, 0].tolist(),
               "tr_id_slices": maps.te_tr_pred[:, 1].tolist(), "self_nrmse": nrmse(own, pixels, mask),
               "in_range": model.info.te_tr_in_range(te, tr)}
        rows.append(row)
        loaded[key] = (pixels, te, tr, maps)
        if (te, tr) not in examples:
            examples.add((te, tr))
            fn = f"real_example_TE{te:g}_TR{tr:g}.png"
            _real_example(out / fn, pixels, maps, te, tr, f"series …{s.series_uid[-12:]} (patient {s.patient_hash}), "
                          f"TE {te:g} / TR {tr:g} ms")
            lines += [f"![real example TE {te:g} TR {tr:g}]({fn})", ""]
    if not rows:
        lines.append("No series could be evaluated.")
        return lines, {"series": []}
    fig = identification_figure(rows)
    fig.savefig(out / "real_identification_selfconsistency.png", dpi=70)
    _plt().close(fig)
    lines += ["![identified vs header TE/TR, self-consistency per series](real_identification_selfconsistency.png)", "",
              "| series | patient | TE / TR ms (header) | identified TE / TR ms | self NRMSE % | in trained range |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| …{r['series_uid'][-12:]} | {r['patient_hash']} | {r['te']:g} / {r['tr']:g} | "
                     f"{r['te_id']:.1f} / {r['tr_id']:.0f} | {100 * r['self_nrmse']:.2f} | {'yes' if r['in_range'] else 'NO'} |")
    lines.append("")
    cross = []
    for g in rep.paired_groups:
        members = [(f"{s.series_uid}|{s.te_ms}|{s.tr_ms}", s) for s in g.series]
        for ka, sa in members:
            for kb, sb in members:
                if ka == kb or ka not in loaded or kb not in loaded or sa.contrast == sb.contrast:
                    continue
                pa, _, _, ma = loaded[ka]
                pb, teb, trb, _ = loaded[kb]
                if pa.shape != pb.shape:
                    continue
                pred = signal(ma.pd, teb, trb, ma.t1, ma.t2)
                mask = (pa > BODY_FRACTION * ma.scale) & (pb > BODY_FRACTION * series_scale(pb, model.info.input_percentile))
                num = (pred * pb * mask).sum(axis=(1, 2))
                den = np.maximum((pred * pred * mask).sum(axis=(1, 2)), 1e-12)
                gained = pred * (num / den)[:, None, None]
                cross.append({"patient_hash": g.patient_hash, "from": list(sa.contrast), "to": list(sb.contrast),
                              "nrmse": nrmse(gained, pb, mask)})
    if cross:
        lines += ["### Paired series: cross-contrast (predict from one, render at the other's TE/TR, per-slice "
                  "least-squares gain)", "", "| patient | from TE/TR | to TE/TR | NRMSE % |", "|---|---|---|---|"]
        for c in cross:
            lines.append(f"| {c['patient_hash']} | {c['from'][0]:g}/{c['from'][1]:g} | {c['to'][0]:g}/{c['to'][1]:g} | "
                         f"{100 * c['nrmse']:.2f} |")
        lines.append("")
    for r in rows:
        del r["te_id_slices"], r["tr_id_slices"]
    return lines, {"series": rows, "paired": cross}


# ----------------------------------------------------------------------------- the report


def write_report(model_path: str | Path, out_dir: str | Path, data: str | Path | None = None, n_subjects: int = 2,
                 n_slices: int = 2, provider: str = "cpu") -> Path:
    """Write ``out_dir/report.md`` (+ PNGs, + ``report.json``); returns the Markdown path."""
    model_path = Path(model_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = QMapModel(model_path, provider=provider)
    i = model.info
    lines = [f"# Evaluation report: {i.name} {i.version}", "",
             f"- model file: `{model_path.name}`, sha256 `{model.sha256}`",
             f"- contract {i.contract}, trained TE {i.te_range_ms[0]:g}-{i.te_range_ms[1]:g} ms, "
             f"TR {i.tr_range_ms[0]:g}-{i.tr_range_ms[1]:g} ms", ""]
    card_path = model_path.with_suffix(".json")
    if card_path.is_file():
        card = json.loads(card_path.read_text())
        if card.get("evaluation_table"):
            lines += ["## Model card evaluation (held-out phantoms, five seed contrasts)", "", "```",
                      *card["evaluation_table"], "```", ""]
        real = card.get("data", {}).get("real")
        if real:
            lines += [f"Fine-tuned on real data: {json.dumps(real)}", ""]
    ph_lines, ph = phantom_section(model, out, n_subjects, n_slices)
    lines += ph_lines
    result: dict = {"model": i.name, "version": i.version, "sha256": model.sha256, "phantom_bland_altman": ph}
    if data is not None:
        real_lines, real = real_section(model, Path(data), out)
        lines += real_lines
        result["real"] = real
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rtcontrast.research.report", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="ONNX model (qmap/1 or qmap/2)")
    ap.add_argument("--data", default=None, help="folder of real SE series (optional)")
    ap.add_argument("--out", required=True, help="output folder for report.md and figures")
    ap.add_argument("--subjects", type=int, default=2, help="held-out phantom subjects")
    ap.add_argument("--slices", type=int, default=2, help="slices per phantom subject")
    ap.add_argument("--provider", default="cpu", choices=["auto", "cpu", "cuda"])
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    md = write_report(a.model, a.out, a.data, a.subjects, a.slices, a.provider)
    print(f"wrote {md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
