"""Refit the TE/TR identification head of a ``qmap/3`` model on whole slices; the maps stay bit-identical.

Why: the network's identification (``te_tr_pred``, which the node's QA compares with the header) is a small head on
the encoder's pooled bottleneck (its mean and its max over the image).  Training feeds 128x128 slices; the node feeds
whole series slices (256x256 and larger, the whole field of view, much of it air), so the pooled statistics the head
was fit on are not the ones it is asked about.  qmap-se 1.4.0 read the TE of held-out pelvis T1w series 43 % off
(the issue's target: 15 %) while its maps were unaffected.  This module computes the pooled features of the frozen
trunk once, on whole slices of several sizes and fields of view from the *training* seeds (pelvis and upper abdomen;
random-geometry slices carry no TE/TR information and are left out as in training), acquired with both of the
project's simulators, and refits only the head on them.  The decoder never reads the head, so PD, T1, T2 and their
sd cannot change (``tests/test_refit_ident.py`` checks that bit for bit).

``python -m rtcontrast.research.refit_ident models/qmap-se.pt --out var/train/se/ident.pt`` (or a training run's
``best.pt``), then ``python export_onnx.py var/train/se/ident.pt --out models/qmap-se.onnx --save-weights --version
X.Y.Z``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from rtcontrast.core.contract import pad_amounts, series_scale
from rtcontrast.research import abdomen_phantom, dataset, dataset_se, phantom
from rtcontrast.research.model import ModelConfig
from rtcontrast.research.model_se import QMapSENet, identify, pool

#: Slice sizes drawn for the features: the training size, the node's usual 256 (weighted) and a larger matrix.
SIZES = (128, 160, 192, 224, 256, 256, 256, 320)
#: Training seed ranges used (within config/train_se.yaml's se_sources: pelvis 0..1600, abdomen 0..800).
PELVIS_SEEDS, ABDOMEN_SEEDS = (0, 1600), (0, 800)


def whole_slice(source: str, seed: int, rng: np.random.Generator) -> phantom.Maps:
    """One training-seed slice at a random matrix: a random level and field of view, or (pelvis, half the time) the
    whole body at 1.2-2.4 mm as the held-out volumes are cut."""
    size = int(rng.choice(SIZES))
    if source == "abdomen":
        return abdomen_phantom.abdomen_maps(seed + dataset_se.SOURCE_OFFSET["abdomen"], (size, size))
    if rng.random() < 0.5:
        return phantom.random_slice(seed, (size, size))
    px = float(rng.uniform(1.2, 2.4))
    maps, _ = phantom.volume(seed, n_slices=1, shape=(size, size), pixel_mm=px, slice_mm=12.0)
    return phantom.Maps(maps.pd[0], maps.t1[0], maps.t2[0], maps.labels[0], (px, px), maps.field_t)


def acquisitions(job: tuple[str, int, int]) -> list[tuple[np.ndarray, float, float]]:
    """``(source, seed, k)`` -> k acquisitions of one slice at training contrasts, each normalised per the contract.

    Half with the training simulator (:func:`rtcontrast.research.acquisition.acquire_se`: fast-spin-echo blurring,
    reduced k-space, bias, gain), half with :func:`rtcontrast.research.phantom.acquire`: the head must not depend on
    one simulator's noise and bias.
    """
    source, seed, k = job
    rng = np.random.default_rng([seed, 777, k, dataset_se.SOURCES.index(source)])
    m = whole_slice(source, seed, rng)
    out = []
    for _ in range(k):
        te, tr = dataset.random_contrast(rng, 0.4)
        if rng.random() < 0.5:
            img = dataset_se.make_sample(m, te, tr, rng, 0.25).image
        else:
            vol = phantom.Maps(m.pd[None], m.t1[None], m.t2[None], m.labels[None], m.pixel_spacing, m.field_t)
            acq = phantom.acquire(vol, te, tr, rng, snr=float(rng.uniform(20, 120)))
            img = acq.image[0] / series_scale(acq.image, dataset.INPUT_PERCENTILE)
        out.append((img.astype(np.float32), te, tr))
    return out


def pooled_features(net: QMapSENet, image: np.ndarray) -> np.ndarray:
    """What the identification head reads: mean and max of the encoder's bottleneck, for one normalised slice
    (padded like the node pads)."""
    h, w = image.shape
    ph, pw = pad_amounts(h, w, net.cfg.spatial_multiple)
    x = torch.zeros((1, 1, h + ph, w + pw))
    x[0, 0, :h, :w] = torch.from_numpy(image)
    with torch.no_grad():
        return pool(net.encode(x)[-1])[0].numpy()


def features(net: QMapSENet, jobs: list[tuple[str, int, int]], workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features [M, 2C] and true (TE, TR) [M, 2] of every acquisition of ``jobs`` (slices in parallel)."""
    xs, ys = [], []
    with ProcessPoolExecutor(workers) as ex:
        for res in tqdm(ex.map(acquisitions, jobs, chunksize=4), total=len(jobs), desc="features", leave=False):
            for img, te, tr in res:
                xs.append(pooled_features(net, img))
                ys.append((te, tr))
    return np.array(xs, np.float32), np.array(ys, np.float32)


def _figures(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        p = identify(head, x)
    rel = (p / y - 1).abs()
    return {"loss": float((torch.log(p) - torch.log(y)).abs().mean()),
            "te_median_err_pct": float(rel[:, 0].median() * 100), "tr_median_err_pct": float(rel[:, 1].median() * 100)}


def fit_head(head: torch.nn.Module, x: np.ndarray, y: np.ndarray, val: np.ndarray, iters: int = 4000,
             lr: float = 3e-4, batch: int = 512, seed: int = 0) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A copy of ``head`` refit by the training loss (L1 of log TE/TR) on the rows not in ``val``; the state with the
    lowest validation loss (checked every 100 iterations) is kept."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    tr_idx = np.setdiff1d(np.arange(len(x)), val)
    vx, vy = X[val], Y[val]
    new = copy.deepcopy(head)
    before = {"fit": _figures(head, X[tr_idx], Y[tr_idx]), "validation": _figures(head, vx, vy)}
    opt = torch.optim.Adam(new.parameters(), lr=lr, weight_decay=1e-4)
    best = (before["validation"]["loss"], copy.deepcopy(new.state_dict()))
    for it in range(iters):
        idx = torch.from_numpy(rng.choice(tr_idx, min(batch, tr_idx.size)))
        loss = (torch.log(identify(new, X[idx])) - torch.log(Y[idx])).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (it + 1) % 100 == 0 or it + 1 == iters:
            vl = _figures(new, vx, vy)["loss"]
            if vl < best[0]:
                best = (vl, copy.deepcopy(new.state_dict()))
    new.load_state_dict(best[1])
    after = {"fit": _figures(new, X[tr_idx], Y[tr_idx]), "validation": _figures(new, vx, vy)}
    return new, {"before": before, "after": after, "iterations": iters, "lr": lr, "batch": batch,
                 "fit_rows": int(tr_idx.size), "validation_rows": int(len(val))}


def load_se(path: str | Path) -> tuple[QMapSENet, dict[str, Any]]:
    """A ``qmap/3`` checkpoint (training checkpoint or shipped weights) and its dict; anything else is refused."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if ck.get("contract") != "qmap/3":
        raise SystemExit(f"{path}: contract {ck.get('contract')!r}; the identification refit is for qmap/3 models")
    net = QMapSENet(ModelConfig(**ck["model_config"]))
    net.load_state_dict(ck["model"])
    net.eval()
    return net, ck


def with_training_record(ck: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """``ck`` with the training record ``export_onnx.py`` puts on the card: a training checkpoint has it; shipped
    weights (``models/NAME.pt``) take it from the card beside them, so a refit from a fresh clone keeps it."""
    if "train_config" in ck:
        return ck
    card = Path(path).with_suffix(".json")
    if not card.is_file():
        raise SystemExit(f"{path}: weights without a training record, and no card {card} beside them to take it from")
    t = json.loads(card.read_text())["training"]
    return {**ck, "train_config": t["config"], "step": t["steps"], "best": t["best_validation_render_l1"],
            "history": t.get("history", []), "hardware": t.get("hardware")}


def refit(path: str | Path, n_slices: int = 1500, per_slice: int = 4, iters: int = 4000, lr: float = 3e-4,
          workers: int = 2, seed: int = 0) -> dict[str, Any]:
    """The checkpoint at ``path`` with a refit identification head and an ``ident_refit`` record (for the card)."""
    t0 = time.time()
    net, ck = load_se(path)
    ck = with_training_record(ck, path)
    n_pel = min(2 * n_slices // 3, PELVIS_SEEDS[1] - PELVIS_SEEDS[0])
    n_abd = min(n_slices - n_pel, ABDOMEN_SEEDS[1] - ABDOMEN_SEEDS[0])
    jobs = ([("pelvis", PELVIS_SEEDS[0] + s, per_slice) for s in range(n_pel)]
            + [("abdomen", ABDOMEN_SEEDS[0] + s, per_slice) for s in range(n_abd)])
    x, y = features(net, jobs, workers)
    # validation: whole slices (all their acquisitions), 10 %, at least one
    slices = np.random.default_rng(seed).permutation(len(jobs))[: max(1, len(jobs) // 10)]
    val = np.concatenate([np.arange(per_slice * s, per_slice * s + per_slice) for s in slices])
    head, fig = fit_head(net.id_head, x, y, val, iters=iters, lr=lr, seed=seed)
    net.id_head.load_state_dict(head.state_dict())
    # not a resumable training state any more: the optimiser's moments belong to the old head
    out = {k: v for k, v in ck.items() if k not in ("optimizer", "rng", "torch_rng")}
    out["model"] = net.state_dict()
    out["ident_refit"] = {
        "what": "identification head refit on pooled features of the frozen trunk (rtcontrast.research.refit_ident); "
                "trunk, maps and uncertainty heads unchanged",
        "from": str(path), "slices": {"pelvis": [PELVIS_SEEDS[0], PELVIS_SEEDS[0] + n_pel],
                                      "abdomen": [ABDOMEN_SEEDS[0], ABDOMEN_SEEDS[0] + n_abd]},
        "acquisitions_per_slice": per_slice, "sizes": list(SIZES), **fig,
        "hardware": f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch threads",
        "wall_time_s": round(time.time() - t0, 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a qmap/3 training checkpoint (keeps its training record for the card)")
    ap.add_argument("--out", required=True, help="where to write the refit checkpoint")
    ap.add_argument("--slices", type=int, default=1500, help="training-seed slices (2/3 pelvis, 1/3 abdomen)")
    ap.add_argument("--per-slice", type=int, default=4, help="acquisitions per slice")
    ap.add_argument("--iters", type=int, default=4000)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    ck = refit(a.checkpoint, a.slices, a.per_slice, a.iters, a.lr, a.workers)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(ck, a.out)
    r = ck["ident_refit"]
    for when in ("before", "after"):
        v = r[when]["validation"]
        print(f"{when:6s} validation: L1(log) {v['loss']:.4f}, TE {v['te_median_err_pct']:.1f} %, "
              f"TR {v['tr_median_err_pct']:.1f} % (median relative error)")
    print(f"wrote {a.out} in {r['wall_time_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
