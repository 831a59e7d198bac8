#!/usr/bin/env python3
"""Export a trained checkpoint to a ``qmap/1`` ONNX model with its model card.

    python export_onnx.py var/train/default/best.pt --out models/qmap-pelvis-1.0.0.onnx

Steps: build the torch model from the checkpoint, export with dynamic batch/height/width
(opset 17), write the contract metadata, check the ONNX model against torch on held-out
phantom slices of several sizes (exit 2 above tolerance), evaluate it on the held-out
phantom split, and write the card ``models/NAME.json`` (version, sha256, training
configuration, data, ranges, parity, evaluation table) plus ``NAME.eval.png``.  ``--report [--report-data FOLDER]`` also writes the evaluation
report with figures (:mod:`rtcontrast.research.report`) to ``models/NAME.report/report.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import torch

from rtcontrast.research import dataset
from rtcontrast.research import phantom
from rtcontrast.core.contract import (
    CONTRACT,
    CONTRACT_FUSION,
    CONTRACT_SE,
    INPUT_NAMES,
    INPUT_NAMES_FUSION,
    INPUT_NAMES_SE,
    OUTPUT_NAMES,
    UNCERTAINTY_OUTPUT_NAMES,
)
from rtcontrast.research.model import T1_RANGE, T2_RANGE, ModelConfig, QMapFusionNet, QMapNet, fusion_from_single
from rtcontrast.research.model_se import QMapSENet
from rtcontrast.core.inference import QMapModel, file_sha256

OPSET = 17
#: Parity tolerance: 99.9th percentile of |onnx - torch| / (|torch| + floor).
PARITY_RTOL = 2e-3


def load_checkpoint(path: str | Path) -> tuple[QMapNet | QMapFusionNet | QMapSENet, dict]:
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if ck.get("contract", CONTRACT) == CONTRACT_SE:
        model: QMapNet | QMapFusionNet | QMapSENet = QMapSENet(ModelConfig(**ck["model_config"]))
    elif ck.get("contract", CONTRACT) == CONTRACT_FUSION:
        model = QMapFusionNet(ModelConfig(**ck["model_config"]), max_inputs=ck["max_inputs"],
                              **ck.get("fusion_options", {}))
    else:
        model = QMapNet(ModelConfig(**ck["model_config"]))
    model.load_state_dict(ck["model"])
    model.eval()
    return model, ck


def replace_single_branch(model: QMapNet | QMapFusionNet, path: str) -> tuple[QMapFusionNet, dict]:
    """Put a qmap/1 checkpoint's weights into a gated fusion model's frozen single-input branch.

    Why: the branches are independent (the fused branch never sees the frozen one), so a
    better single-input model can be carried into the fusion model without retraining it.
    An ungated fusion network is wrapped into a gated one here.  Returns the (gated) model
    and what the card records.
    """
    if not isinstance(model, QMapFusionNet):
        raise SystemExit("--single-branch needs a qmap/2 checkpoint")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if ck.get("contract", CONTRACT) != CONTRACT:
        raise SystemExit(f"--single-branch {path}: a {ck.get('contract')} checkpoint, a {CONTRACT} one is needed")
    if ck["model_config"] != model.cfg.to_dict():
        raise SystemExit(f"--single-branch {path}: architecture {ck['model_config']} differs from {model.cfg.to_dict()}")
    gated_here = model.single is None
    if gated_here:  # an ungated fusion network: wrap it, the single branch answers single-input cases from now on
        model = fusion_from_single(ck["model"], model.cfg, model.max_inputs, gated=True, log_input=model.log_input,
                                   fused_state=model.state_dict())
    assert model.single is not None
    model.single.load_state_dict(ck["model"])
    model.eval()
    tc = ck.get("train_config", {})
    return model, {"checkpoint": str(path), "name": tc.get("name"), "version": tc.get("version"), "steps": ck.get("step"),
            "best_validation_render_l1": ck.get("best"), "gated_at_export": gated_here}


def output_names(model: torch.nn.Module) -> list[str]:
    """The ONNX output names of ``model`` (qmap/3 adds the uncertainty outputs)."""
    return list(OUTPUT_NAMES) + (list(UNCERTAINTY_OUTPUT_NAMES) if isinstance(model, QMapSENet) else [])


def export(model: QMapNet | QMapFusionNet | QMapSENet, out: Path, metadata: dict[str, str]) -> None:
    """torch -> ONNX with dynamic N/H/W (and K for qmap/2) and the contract metadata."""
    tmp = out.with_suffix(".tmp.onnx")
    dyn = {"pd": {0: "N", 2: "H", 3: "W"}, "t1": {0: "N", 2: "H", 3: "W"}, "t2": {0: "N", 2: "H", 3: "W"},
           "te_tr_pred": {0: "N"}}
    if isinstance(model, QMapSENet):
        args: tuple = (torch.rand(2, 1, 64, 96), torch.tensor([[80.0, 3000.0], [10.0, 500.0]]),
                       torch.tensor([[1.5], [3.0]]))
        names = list(INPUT_NAMES_SE)
        dyn.update({"image": {0: "N", 2: "H", 3: "W"}, "te_tr": {0: "N"}, "field_t": {0: "N"}})
        dyn.update({n: {0: "N", 2: "H", 3: "W"} for n in UNCERTAINTY_OUTPUT_NAMES})
    elif isinstance(model, QMapFusionNet):
        k = model.max_inputs
        args = (torch.rand(2, k, 64, 96), torch.tensor([[[80.0, 3000.0]] * k, [[10.0, 500.0]] * k]),
                       torch.tensor([[1.0] + [0.0] * (k - 1), [1.0] * k]))
        names = list(INPUT_NAMES_FUSION)
        dyn.update({"image": {0: "N", 2: "H", 3: "W"}, "te_tr": {0: "N"}, "present": {0: "N"}})
    else:
        args = (torch.rand(2, 1, 64, 96), torch.tensor([[80.0, 3000.0], [10.0, 500.0]]))
        names = list(INPUT_NAMES)
        dyn.update({"image": {0: "N", 2: "H", 3: "W"}, "te_tr": {0: "N"}})
    with torch.no_grad():
        torch.onnx.export(model, args, str(tmp), input_names=names, output_names=output_names(model),
                          dynamic_axes=dyn, opset_version=OPSET, dynamo=False)
    m = onnx.load(str(tmp))
    del m.metadata_props[:]
    for k, v in metadata.items():
        m.metadata_props.add(key=k, value=v)
    m.doc_string = f"rtcontrast {metadata['rtcontrast.contract']} model {metadata['name']} {metadata['version']}"
    onnx.checker.check_model(m)
    onnx.save(m, str(tmp))
    tmp.replace(out)


def parity(model: QMapNet | QMapFusionNet | QMapSENet, onnx_path: Path) -> dict:
    """Compare ONNX (onnxruntime CPU) with torch on held-out phantom slices of several sizes."""
    qm = QMapModel(onnx_path, provider="cpu")
    rng = np.random.default_rng(7)
    worst = 0.0
    checked = []
    for k, (h, w) in enumerate(((128, 128), (256, 256), (160, 224))):
        maps = phantom.random_slice(dataset.HELDOUT_SEED_BASE + 900 + k, (max(h, w), max(h, w)))
        if isinstance(model, QMapFusionNet):
            m = 1 + k % model.max_inputs
            ms = dataset.make_multi_sample(maps, [dataset.random_contrast(rng) for _ in range(m)],
                                           list(range(m)), model.max_inputs, rng)
            feeds = (ms.image[None, :, :h, :w].copy(), ms.te_tr[None], ms.present[None])
        else:
            sl = dataset.make_sample(maps, *dataset.random_contrast(rng), rng)
            feeds = (sl.image[:h, :w][None, None].astype(np.float32), np.array([[sl.te, sl.tr]], np.float32))
            if isinstance(model, QMapSENet):
                feeds = (*feeds, np.array([[(1.5, 3.0)[k % 2]]], np.float32))
        with torch.no_grad():
            ref = [t.numpy() for t in model(*(torch.from_numpy(np.ascontiguousarray(f)) for f in feeds))]
        if isinstance(model, QMapSENet):
            got = qm.run_normalised(feeds[0], feeds[1], None, feeds[2])
        else:
            got = qm.run_normalised(*feeds)
        for name, r in zip(output_names(model), ref):
            g = got[name]
            floor = 1e-3 * max(float(np.abs(r).max()), 1e-6)
            rel = float(np.percentile(np.abs(g - r) / (np.abs(r) + floor), 99.9))
            worst = max(worst, rel)
        checked.append([h, w])
    return {"sizes": checked, "p999_relative_error": worst, "tolerance": PARITY_RTOL, "ok": worst <= PARITY_RTOL}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--out", required=True, help="models/NAME.onnx")
    ap.add_argument("--name", default=None, help="model name (default: the training config's)")
    ap.add_argument("--version", default=None, help="model version (default: the training config's)")
    ap.add_argument("--eval-subjects", type=int, default=6, help="held-out subjects for the card (0 = skip)")
    ap.add_argument("--limitations", default=None, help="text for the card: known limits, targets missed and why")
    ap.add_argument("--report", action="store_true",
                    help="also write the evaluation report with figures to models/NAME.report/report.md")
    ap.add_argument("--report-data", default=None, help="with --report: a folder of real SE series to include")
    ap.add_argument("--report-subjects", type=int, default=2, help="with --report: held-out phantom subjects")
    ap.add_argument("--generalisation", action="store_true",
                    help="also the in-domain vs unseen-anatomy tables with the constant-maps floor (always for qmap/3)")
    ap.add_argument("--save-weights", action="store_true",
                    help="also write NAME.pt: the weights (+ architecture, contract) loadable with torch.load("
                         "weights_only=True), so --init can fine-tune from a fresh clone; its sha256 goes in the card")
    ap.add_argument("--single-branch", default=None,
                    help="qmap/2: a qmap/1 training checkpoint that becomes the frozen single-input branch (an "
                         "ungated fusion checkpoint is gated with it), so the single-input case is that model")
    a = ap.parse_args(argv)

    model, ck = load_checkpoint(a.checkpoint)
    single_info = None
    if a.single_branch:
        model, single_info = replace_single_branch(model, a.single_branch)
    tc = ck["train_config"]
    name = a.name or tc.get("name", "qmap")
    version = a.version or tc.get("version", "0.0.0")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fusion = isinstance(model, QMapFusionNet)
    se = isinstance(model, QMapSENet)
    meta = {
        "rtcontrast.contract": CONTRACT_FUSION if fusion else CONTRACT_SE if se else CONTRACT,
        "name": name,
        "version": version,
        "input_percentile": str(dataset.INPUT_PERCENTILE),
        "spatial_multiple": str(model.cfg.spatial_multiple),
        "te_range_ms": ",".join(str(v) for v in dataset.TE_RANGE_MS),
        "tr_range_ms": ",".join(str(v) for v in dataset.TR_RANGE_MS),
        "field_strengths_t": ",".join(str(v) for v in dataset.FIELD_STRENGTHS_T),
    }
    if fusion:
        meta["max_inputs"] = str(model.max_inputs)
    export(model, out, meta)
    par = parity(model, out)
    print(f"parity: 99.9th percentile relative error {par['p999_relative_error']:.2e} (tolerance {PARITY_RTOL:.0e})")
    if not par["ok"]:
        print(f"ERROR: ONNX model {out} disagrees with torch beyond tolerance; not writing a card", file=sys.stderr)
        out.unlink()
        return 2
    qa_cal = None
    if se and a.eval_subjects:  # the model's own uncertainty QA limits, before anything reads its metadata
        from rtcontrast.core.contract import QA_LIMITS_KEY
        from rtcontrast.research.qa_calibration import calibrate_into

        qa_cal = calibrate_into(out, n_subjects=a.eval_subjects)
        meta[QA_LIMITS_KEY] = json.dumps(qa_cal["limits"], sort_keys=True)
        print(f"QA limits (in-domain calibration): {meta[QA_LIMITS_KEY]}")
    qm = QMapModel(out, provider="cpu")
    card = {
        "contract": meta["rtcontrast.contract"],
        "name": name,
        "version": version,
        "file": out.name,
        "sha256": qm.sha256,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "metadata": meta,
        "io": {"inputs": {"image": "float32 [N,1,H,W] stored values / series scale", "te_tr": "float32 [N,2] ms"},
               "outputs": {"pd": "float32 [N,1,H,W] input units", "t1": "float32 [N,1,H,W] ms",
                           "t2": "float32 [N,1,H,W] ms", "te_tr_pred": "float32 [N,2] ms"}},
        "ranges": {"t1_ms": list(T1_RANGE), "t2_ms": list(T2_RANGE), "te_ms": list(dataset.TE_RANGE_MS),
                   "tr_ms": list(dataset.TR_RANGE_MS), "field_strengths_t": list(dataset.FIELD_STRENGTHS_T)},
        "architecture": {"model_config": ck["model_config"],
                         "parameters": int(sum(p.numel() for p in model.parameters()))},
        "training": {"config": tc, "steps": ck["step"], "best_validation_render_l1": ck["best"],
                     "history": ck.get("history", []), "hardware": ck.get("hardware"),
                     "wall_time_s_last_stage": (ck.get("history") or [{}])[-1].get("elapsed_s")},
        "data": {"kind": "synthetic male-pelvis phantoms (rtcontrast.research.phantom)",
                 "train_seeds": [0, tc.get("n_train_subjects")],
                 "validation_seeds": [dataset.HELDOUT_SEED_BASE, dataset.HELDOUT_SEED_BASE + tc.get("n_val", 0)],
                 "notes": "No real patient data. Relaxation values around de Bazelaire 2004 / Stanisz 2005 at "
                          "1.5 T and 3 T; bias field, gain, Rician noise, resolution and anatomy randomised."},
        "parity": par,
    }
    if qa_cal is not None:
        card["qa_calibration"] = qa_cal
    if a.limitations:
        card["limitations"] = a.limitations
    if ck.get("real_data"):  # fine-tuned on a researcher's own series (counts and contrasts only, no identities)
        card["data"]["real"] = ck["real_data"]
        card["data"]["kind"] += " + real spin-echo series (fine-tuning)"
        card["data"]["notes"] = ("Phantoms as below plus the researcher's own spin-echo series (counts above; patients "
                                 "only as hashes in the training run). " + card["data"]["notes"].replace(
                                     "No real patient data. ", ""))
    if tc.get("init"):
        card["training"]["initialised_from"] = str(tc["init"])
    if ck.get("ident_refit"):  # rtcontrast.research.refit_ident: the identification head refit after training
        card["training"]["ident_refit"] = ck["ident_refit"]
    if fusion:
        card["io"]["inputs"] = {"image": "float32 [N,K,H,W] each input's stored values / its series scale",
                                "te_tr": "float32 [N,K,2] ms", "present": "float32 [N,K] 1 = present"}
        card["architecture"]["fusion_options"] = getattr(model, "options", {})
    if single_info is not None:
        card["training"]["single_branch"] = single_info
    if se:
        card["io"]["inputs"]["field_t"] = "float32 [N,1] MagneticFieldStrength in T (node default 1.5 when absent)"
        card["io"]["outputs"].update({"t1_log_sd": "float32 [N,1,H,W] sd of ln T1", "t2_log_sd": "float32 [N,1,H,W] sd "
                                      "of ln T2", "pd_sd": "float32 [N,1,H,W] sd of PD, input units"})
        card["data"]["kind"] = ("synthetic phantoms: male pelvis (rtcontrast.research.phantom), upper abdomen "
                                "(rtcontrast.research.abdomen_phantom), random geometry with a broad tissue prior "
                                "(rtcontrast.research.random_phantom, rtcontrast.research.tissue_prior)")
        card["data"]["sources"] = {k: [0, n] for k, n in tc.get("se_sources", {}).items()}
        card["data"]["notes"] = ("No real patient data, no atlases or templates. Acquisitions with fast-spin-echo T2 "
                                 "blurring, reduced k-space, bias, gain and Rician noise (rtcontrast.research.acquisition). "
                                 "Evaluation-only head phantoms (rtcontrast.research.eval_phantoms) are never imported by "
                                 "training.")
    if a.save_weights:
        pt = out.with_suffix(".pt")
        torch.save({"model": model.state_dict(), "model_config": ck["model_config"],
                    "contract": meta["rtcontrast.contract"], "max_inputs": ck.get("max_inputs", 1),
                    "fusion_options": ck.get("fusion_options", {})}, pt)
        card["weights"] = {"file": pt.name, "sha256": file_sha256(pt),
                           "note": "weights-only (torch.load(weights_only=True)); fine-tune with "
                                   f"python -m rtcontrast.research.train --config ... --init models/{pt.name}"}
    if a.eval_subjects:
        from rtcontrast.research.evaluate import evaluate, format_table

        fig = out.with_suffix(".eval.png")
        report = evaluate(out, n_subjects=a.eval_subjects, figure=fig)
        card["evaluation"] = report
        card["evaluation_table"] = format_table(report).splitlines()
        card["evaluation_figure"] = fig.name
        print(format_table(report))
        if se or a.generalisation:
            from rtcontrast.research.evaluate_se import format_generalisation, generalisation

            gen = generalisation(out, n_subjects=a.eval_subjects)
            card["generalisation"] = gen
            card["generalisation_table"] = format_generalisation(gen).splitlines()
            from rtcontrast.research.evaluate_se import measured_limitations

            card["limitations_measured"] = measured_limitations(gen, report["summary"])
            print(format_generalisation(gen))
        if fusion:
            from rtcontrast.research.evaluate_fusion import evaluate_fusion, format_fusion_table

            freport = evaluate_fusion(out, n_subjects=a.eval_subjects)
            card["fusion_evaluation"] = freport
            card["fusion_evaluation_table"] = format_fusion_table(freport).splitlines()
            print(format_fusion_table(freport))
    card_path = out.with_suffix(".json")
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    if a.report:
        from rtcontrast.research.report import write_report

        md = write_report(out, out.with_suffix(".report"), a.report_data, n_subjects=a.report_subjects)
        card["report"] = str(md.relative_to(out.parent))
        card_path.write_text(json.dumps(card, indent=2) + "\n")
        print(f"report: {md}")
    print(f"wrote {out} and {card_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
