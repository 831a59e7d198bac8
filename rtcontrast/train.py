"""Train the qmap network on phantoms: ``python -m rtcontrast.train --config config/train_default.yaml``.

Losses (weights in the YAML):
* render  - L1 of contrasts rendered from the predicted maps against the truth, at the
            seed's five contrasts plus random TE/TR, each normalised by its truth's 99th
            percentile (so T1w and T2w count alike);
* maps    - masked L1 of log T1 and log T2 against the phantom truth (tissue with PD > 0.1);
* pd      - masked L1 of log PD (input units);
* clean   - L1 of the denoised input against the noise-free acquisition;
* ident   - L1 of log TE / log TR identified from the image alone.

Checkpoints (``last.pt`` every ``ckpt_every`` steps, ``best.pt`` at the best validation
render loss) hold model, optimiser, step and RNG state; ``--resume`` continues exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.nn import functional as F
from tqdm import tqdm

from rtcontrast import dataset
from rtcontrast.model import ModelConfig, QMapFusionNet, QMapNet
from rtcontrast.physics import SEED_CONTRASTS, signal

log = logging.getLogger("rtcontrast.train")


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved into checkpoints and the model card)."""

    name: str = "qmap-pelvis"
    version: str = "1.0.0"
    seed: int = 1234
    steps: int = 2000
    batch_size: int = 12
    patch: int = 128
    n_train_subjects: int = 2400
    n_val: int = 48
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    val_every: int = 250
    ckpt_every: int = 250
    random_targets: int = 2
    p_seed_contrast: float = 0.5
    scale_jitter: float = 0.25
    w_render: float = 1.0
    w_maps: float = 0.5
    w_pd: float = 0.1
    w_clean: float = 1.0
    w_ident: float = 0.1
    threads: int = 2
    cache_dir: str = "var/cache"
    out_dir: str = "var/train/default"
    model: dict[str, Any] = field(default_factory=lambda: {"widths": [16, 32, 64, 96, 128], "id_hidden": 64})
    #: "qmap/1" (one input) or "qmap/2" (K co-registered inputs, any subset present)
    contract: str = "qmap/1"
    max_inputs: int = 5
    #: qmap/2: probability of 1, 2, ... present inputs per sample
    p_inputs: list[float] = field(default_factory=lambda: [0.3, 0.3, 0.2, 0.1, 0.1])

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        data = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise SystemExit(f"{path}: unknown training option(s): {', '.join(sorted(unknown))}")
        return cls(**data)


def batch_to_torch(b: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device) for k, v in b.items()}


def make_batch(bank: dataset.Bank, idx: np.ndarray, rng: np.random.Generator, cfg: TrainConfig) -> dict[str, np.ndarray]:
    if cfg.contract == "qmap/2":
        multi = []
        p = np.asarray(cfg.p_inputs[: cfg.max_inputs], float)
        for i in idx:
            m = int(rng.choice(np.arange(1, len(p) + 1), p=p / p.sum()))
            contrasts = [dataset.random_contrast(rng, cfg.p_seed_contrast) for _ in range(m)]
            slots = sorted(rng.choice(cfg.max_inputs, m, replace=False).tolist())
            multi.append(dataset.make_multi_sample(bank.maps(int(i)), contrasts, slots, cfg.max_inputs, rng,
                                                   cfg.scale_jitter))
        return dataset.stack(multi)
    samples = []
    for i in idx:
        te, tr = dataset.random_contrast(rng, cfg.p_seed_contrast)
        samples.append(dataset.make_sample(bank.maps(int(i)), te, tr, rng, cfg.scale_jitter))
    return dataset.stack(samples)


def build_model(cfg: TrainConfig) -> QMapNet | QMapFusionNet:
    """The network for the configured contract."""
    if cfg.contract == "qmap/2":
        return QMapFusionNet(ModelConfig(**cfg.model), max_inputs=cfg.max_inputs)
    if cfg.contract != "qmap/1":
        raise SystemExit(f"unknown contract {cfg.contract!r} (qmap/1 or qmap/2)")
    return QMapNet(ModelConfig(**cfg.model))


def run_model(model: QMapNet | QMapFusionNet, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if isinstance(model, QMapFusionNet):
        return model(b["image"], b["te_tr"], b["present"])
    return model(b["image"], b["te_tr"])


def target_contrasts(rng: np.random.Generator, n_random: int) -> list[tuple[float, float]]:
    return list(SEED_CONTRASTS) + [dataset.random_contrast(rng, 0.0) for _ in range(n_random)]


def losses(model: QMapNet | QMapFusionNet, b: dict[str, torch.Tensor], targets: list[tuple[float, float]], cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """All loss terms of one batch (weighted sum under 'total')."""
    pd, t1, t2, te_tr_pred = run_model(model, b)
    tissue = (b["pd_img"] > 0) & (b["t1"] > 0) & (b["labels"] != 3)
    strong = tissue & (b["pd_img"] > 0.1 * b["pd_img"].amax(dim=(2, 3), keepdim=True))
    nm = strong.sum().clamp(min=1)
    l_maps = ((torch.log(t1) - torch.log(b["t1"].clamp(min=1))).abs() * strong).sum() / nm
    l_maps = l_maps + ((torch.log(t2) - torch.log(b["t2"].clamp(min=1))).abs() * strong).sum() / nm
    l_pd = ((torch.log(pd + 1e-3) - torch.log(b["pd_img"] + 1e-3)).abs() * strong).sum() / nm
    l_render = torch.zeros((), device=pd.device)
    for te, tr in targets:
        truth = signal(b["pd_img"], te, tr, b["t1"], b["t2"], xp=torch)
        norm = torch.quantile(truth.flatten(1), 0.99, dim=1).clamp(min=1e-3)[:, None, None, None]
        pred = signal(pd, te, tr, t1, t2, xp=torch)
        l_render = l_render + ((pred - truth).abs() / norm).mean()
    l_render = l_render / len(targets)
    # The denoised input is the input's own rendering.
    te0, tr0 = b["te_tr0"][:, 0, None, None, None], b["te_tr0"][:, 1, None, None, None]
    own = signal(pd, te0, tr0, t1, t2, xp=torch)
    l_clean = F.l1_loss(own, b["clean"])
    l_ident = (torch.log(te_tr_pred) - torch.log(b["te_tr0"])).abs().mean()
    total = (cfg.w_render * l_render + cfg.w_maps * l_maps + cfg.w_pd * l_pd + cfg.w_clean * l_clean
             + cfg.w_ident * l_ident)
    return {"total": total, "render": l_render, "maps": l_maps, "pd": l_pd, "clean": l_clean, "ident": l_ident}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to 2 % of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def validation_batches(cfg: TrainConfig) -> list[dict[str, np.ndarray]]:
    """A fixed held-out validation set (seeds never used in training), deterministic."""
    bank = dataset.build_bank(range(dataset.HELDOUT_SEED_BASE, dataset.HELDOUT_SEED_BASE + cfg.n_val), cfg.patch,
                              Path(cfg.cache_dir), workers=1)
    rng = np.random.default_rng(4242)
    out = []
    for start in range(0, len(bank), 16):
        idx = np.arange(start, min(start + 16, len(bank)))
        out.append(make_batch(bank, idx, rng, TrainConfig(**{**asdict(cfg), "scale_jitter": 0.0})))
    return out


@torch.no_grad()
def validate(model: QMapNet | QMapFusionNet, batches: list[dict[str, np.ndarray]], cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    model.eval()
    acc: dict[str, float] = {}
    for b in batches:
        lo = losses(model, batch_to_torch(b, device), list(SEED_CONTRASTS), cfg)
        for k, v in lo.items():
            acc[k] = acc.get(k, 0.0) + float(v) / len(batches)
    model.train()
    return acc


def save_checkpoint(path: Path, model: QMapNet | QMapFusionNet, opt: torch.optim.Optimizer, step: int, cfg: TrainConfig,
                    best: float, rng: np.random.Generator, history: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({
        "model": model.state_dict(),
        "model_config": model.cfg.to_dict(),
        "contract": cfg.contract,
        "max_inputs": cfg.max_inputs if cfg.contract == "qmap/2" else 1,
        "train_config": asdict(cfg),
        "optimizer": opt.state_dict(),
        "step": step,
        "best": best,
        "rng": rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "history": history,
    }, tmp)
    tmp.replace(path)


def train(cfg: TrainConfig, device: str = "cpu", resume: str | None = None, stop_after: int | None = None) -> Path:
    """Run training; returns the path of the best checkpoint.

    ``stop_after`` ends this run at that step (checkpointed) without changing the
    schedule, for time-boxed jobs that ``--resume`` later.
    """
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    dev = torch.device(device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    model = build_model(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    step, best, history = 0, float("inf"), []
    if resume:
        ck = torch.load(resume, map_location=dev, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, best, history = ck["step"], ck["best"], ck.get("history", [])
        rng.bit_generator.state = ck["rng"]
        torch.set_rng_state(ck["torch_rng"])
        log.info("resumed from %s at step %d", resume, step)
    bank = dataset.build_bank(range(0, cfg.n_train_subjects), cfg.patch, Path(cfg.cache_dir))
    val = validation_batches(cfg)
    if step == 0:
        v0 = validate(model, val, cfg, dev)
        v0.update(step=0, elapsed_s=0.0)
        history.append(v0)
    model.train()
    bar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True)
    t0 = time.time()
    end = min(cfg.steps, stop_after) if stop_after else cfg.steps
    while step < end:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        idx = rng.integers(0, len(bank), cfg.batch_size)
        b = batch_to_torch(make_batch(bank, idx, rng, cfg), dev)
        lo = losses(model, b, target_contrasts(rng, cfg.random_targets), cfg)
        opt.zero_grad(set_to_none=True)
        lo["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{float(v):.4f}" for k, v in lo.items() if k in ("total", "render", "maps")})
        if step % cfg.val_every == 0 or step == cfg.steps:
            v = validate(model, val, cfg, dev)
            v.update(step=step, elapsed_s=round(time.time() - t0, 1))
            history.append(v)
            log.info("step %d validation: %s", step, json.dumps({k: round(x, 5) for k, x in v.items()}))
            if v["render"] < best:
                best = v["render"]
                save_checkpoint(out / "best.pt", model, opt, step, cfg, best, rng, history)
        if step % cfg.ckpt_every == 0 or step in (cfg.steps, end):
            save_checkpoint(out / "last.pt", model, opt, step, cfg, best, rng, history)
    bar.close()
    return out / "best.pt"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rtcontrast.train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="training YAML (default: built-in defaults)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--resume", default=None, help="checkpoint to resume from (last.pt)")
    ap.add_argument("--stop-after", type=int, default=None, help="stop (checkpointed) at this step; resume later")
    ap.add_argument("--steps", type=int, default=None, help="override the number of steps")
    ap.add_argument("--out-dir", default=None, help="override the output folder")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig.from_yaml(a.config) if a.config else TrainConfig()
    if a.steps is not None:
        cfg.steps = a.steps
    if a.out_dir is not None:
        cfg.out_dir = a.out_dir
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    best = train(cfg, a.device, a.resume, a.stop_after)
    print(best)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
