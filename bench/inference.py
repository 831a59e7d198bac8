"""Inference throughput and latency: the node's path (QMapModel.predict) against bare runtimes.

Why: the node adds work around the model (series scale, padding, batching, un-scaling);
that overhead must stay small (>= 0.9x a bare ``session.run`` on the same normalised,
padded batches), and ONNX Runtime should beat eager torch on the same architecture.
Per-slice latency (one slice, batch 1) bounds how fast a single-slice job can turn
around (target <= 100 ms on the 2-core CI machine).

torch: the checkpoint var/train/default/best.pt when its architecture matches the
ONNX model's card (models/qmap-pelvis.json), else QMapNet with the card's widths and
random weights (timing only).  GPU: the same with the CUDA provider when a GPU is
present (target >= 1000 slices/s on an H100); otherwise recorded as "no GPU here".
Repetitions are interleaved (node, bare, torch, ...) and medians reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, machine, median, table, verdict, write_result  # noqa: E402
from rtcontrast.core.contract import pad_amounts, series_scale  # noqa: E402
from rtcontrast.core.inference import QMapModel, cuda_present  # noqa: E402
from tests.reliability.helpers import phantom_volume  # noqa: E402

MODEL = REPO / "models" / "qmap-pelvis.onnx"
CARD = REPO / "models" / "qmap-pelvis.json"
CKPT = REPO / "var" / "train" / "default" / "best.pt"


def normalised_batches(model: QMapModel, pixels: np.ndarray, te: float, tr: float, batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """What predict() feeds session.run, precomputed (the bare runtime gets it for free)."""
    n, h, w = pixels.shape
    s = series_scale(pixels, model.info.input_percentile)
    ph, pw = pad_amounts(h, w, model.info.spatial_multiple)
    out = []
    for start in range(0, n, batch):
        stop = min(start + batch, n)
        x = np.zeros((stop - start, 1, h + ph, w + pw), np.float32)
        x[:, 0, :h, :w] = pixels[start:stop] / np.float32(s)
        out.append((x, np.tile(np.array([[te, tr]], np.float32), (stop - start, 1))))
    return out


def torch_model() -> tuple[Any, str]:
    import torch

    from rtcontrast.research.model import ModelConfig, QMapNet

    card = json.loads(CARD.read_text())
    cfg = card["architecture"]["model_config"]
    if CKPT.exists():
        try:
            ck = torch.load(CKPT, map_location="cpu", weights_only=False)
            if ck.get("model_config") == cfg:
                m = QMapNet(ModelConfig(**cfg))
                m.load_state_dict(ck["model"])
                return m.eval(), f"checkpoint {CKPT.relative_to(REPO)} (same architecture as the ONNX model)"
            why = f"checkpoint architecture {ck.get('model_config')} differs from the card's {cfg}"
        except Exception as exc:  # noqa: BLE001 - e.g. being rewritten by a training run
            why = f"checkpoint unreadable ({type(exc).__name__})"
    else:
        why = "no checkpoint"
    torch.manual_seed(0)
    return QMapNet(ModelConfig(**cfg)).eval(), f"QMapNet{tuple(cfg['widths'])} with random weights ({why})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=32)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8, help="the node's batch size (QMapModel.predict default)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--latency-reps", type=int, default=15)
    ap.add_argument("--no-torch", action="store_true")
    args = ap.parse_args()
    info = machine()
    try:
        import torch
    except ImportError:  # runtime-only install: compare with onnxruntime only
        torch = None  # type: ignore[assignment]
        args.no_torch = True

    te, tr = 90.0, 4000.0
    pixels = phantom_volume(args.slices, args.size, 3)
    model = QMapModel(MODEL, "cpu")
    batches = normalised_batches(model, pixels, te, tr, args.batch)
    sess = model.session
    names = [o.name for o in sess.get_outputs()]
    tmodel, tdesc = (None, "skipped") if args.no_torch else torch_model()
    print(f"{args.slices} slices {args.size}x{args.size}, batch {args.batch}; ONNX Runtime threads: default; "
          f"torch threads {torch.get_num_threads() if torch else '-'}; torch model: {tdesc}", flush=True)

    def run_node() -> float:
        t0 = time.perf_counter()
        model.predict(pixels, te, tr, batch_size=args.batch)
        return time.perf_counter() - t0

    def run_bare() -> float:
        t0 = time.perf_counter()
        for x, tt in batches:
            sess.run(names, {"image": x, "te_tr": tt})
        return time.perf_counter() - t0

    def run_torch() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for x, tt in batches:
                tmodel(torch.from_numpy(x), torch.from_numpy(tt))
        return time.perf_counter() - t0

    runners = {"node (QMapModel.predict)": run_node, "bare onnxruntime session.run": run_bare}
    if tmodel is not None:
        runners["torch eager (CPU)"] = run_torch
    for fn in runners.values():  # warm-up
        fn()
    rates: dict[str, list[float]] = {k: [] for k in runners}
    for rep in range(args.reps):
        for name, fn in runners.items():
            rates[name].append(args.slices / fn())
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{k.split()[0]} {v[-1]:.1f}/s" for k, v in rates.items()),
              flush=True)
    one = pixels[:1]
    lat = []
    for _ in range(args.latency_reps):
        t0 = time.perf_counter()
        model.predict(one, te, tr, batch_size=1)
        lat.append((time.perf_counter() - t0) * 1000)
    med = {k: median(v) for k, v in rates.items()}
    node_k, bare_k = "node (QMapModel.predict)", "bare onnxruntime session.run"
    r_bare = med[node_k] / med[bare_k]
    r_torch = med[node_k] / med["torch eager (CPU)"] if tmodel is not None else None
    lat_med = median(lat)

    gpu: dict[str, Any]
    if cuda_present():
        # the node's GPU path (CUDA provider, I/O binding, GPU-sized batches) against a bare
        # session.run on the same normalised batches, interleaved; one warm-up each (cuDNN
        # algorithm search, arena growth)
        gm = QMapModel(MODEL, "cuda")
        gbatch = gm.batch_slices
        gb = normalised_batches(gm, pixels, te, tr, gbatch)
        gm.predict(pixels, te, tr)
        for x, tt in gb:
            gm.session.run(names, {"image": x, "te_tr": tt})
        g_rates, g_bare = [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            gm.predict(pixels, te, tr)
            g_rates.append(args.slices / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for x, tt in gb:
                gm.session.run(names, {"image": x, "te_tr": tt})
            g_bare.append(args.slices / (time.perf_counter() - t0))
        gpu = {"present": True, "provider": gm.provider, "batch": gbatch, "io_binding": gm.io_device,
               "slices_per_s": g_rates, "median": median(g_rates), "bare_slices_per_s": g_bare,
               "bare_median": median(g_bare), "node_vs_bare": median(g_rates) / median(g_bare),
               "target_1000_per_s_met": median(g_rates) >= 1000,
               "target_0.9x_bare_met": median(g_rates) / median(g_bare) >= 0.9}
    else:
        gpu = {"present": False, "note": "no GPU here: the CUDA path (provider, I/O binding, GPU batches) "
                                         "was not measured"}

    print()
    print(f"inference: {args.slices} slices {args.size}x{args.size}, batch {args.batch}, median of {args.reps} reps")
    print(table(["path", "slices/s", "ms/slice"], [[k, f"{v:.1f}", f"{1000 / v:.1f}"] for k, v in med.items()]))
    print(f"node / bare onnxruntime: {r_bare:.2f}x (target >= 0.9x: {verdict(r_bare >= 0.9)})")
    if r_torch is not None:
        print(f"node / torch eager:      {r_torch:.2f}x")
    print(f"single-slice latency (batch 1, node path): median {lat_med:.1f} ms, max {max(lat):.1f} ms "
          f"(target <= 100 ms: {verdict(lat_med <= 100)})")
    print("GPU: " + (f"{gpu['median']:.0f} slices/s on {gpu['provider']} (batch {gpu['batch']}), "
                     f"{gpu['node_vs_bare']:.2f}x bare session.run ({gpu['bare_median']:.0f}/s)"
                     if gpu["present"] else "no GPU here (not measured)"))
    out = write_result("inference", {
        "machine": info,
        "setup": {"slices": args.slices, "matrix": [args.size, args.size], "batch": args.batch, "reps": args.reps,
                  "model": str(MODEL.relative_to(REPO)), "model_version": model.info.version,
                  "model_sha256": model.sha256, "torch_model": tdesc, "torch_threads": torch.get_num_threads() if torch else None},
        "slices_per_s": rates, "median_slices_per_s": med,
        "ratios": {"node_vs_bare_onnxruntime": round(r_bare, 3),
                   "node_vs_torch_eager": None if r_torch is None else round(r_torch, 3)},
        "latency_ms_single_slice": {"median": round(lat_med, 2), "all": [round(v, 2) for v in lat]},
        "targets": {"node_vs_bare>=0.9": r_bare >= 0.9, "latency<=100ms": lat_med <= 100,
                    "gpu>=1000/s": gpu.get("target_1000_per_s_met")},
        "gpu": gpu,
    })
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
