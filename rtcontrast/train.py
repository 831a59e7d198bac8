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

Real data (config keys ``data_dir``, ``w_phantom``, ``w_unpaired``, ``w_paired``; see
config/train_finetune_example.yaml and docs/researchers.md).  The researcher's own SE
series (:mod:`rtcontrast.realdata_source`) add two sources, mixed with the phantoms by
weight (total = w_phantom * phantom + w_unpaired * unpaired + w_paired * paired):

* unpaired (any SE slice, header TE/TR, no maps).  Re-rendering the input at its own
  TE/TR reproduces it by construction (PD = c / E), so the useful terms are:
  ``u_self``      L1 of that re-rendering (the denoised input) against the input, which
                  keeps the denoiser honest on real noise;
  ``u_id_real``   the identification head recovers the header TE/TR of real inputs;
  ``u_id_render`` images rendered from the predicted maps at other contrasts (drawn from
                  the real data's contrasts and at random), normalised like an input,
                  must be identified at the TE/TR they were rendered at
                  (:meth:`QMapNet.identify`), the seed's contrast-identification loss;
  ``u_adv``       a small discriminator (:class:`~rtcontrast.model.Discriminator`, its
                  own optimiser, ``lr_disc``) tells real inputs from renderings at the
                  real data's contrast distribution; the generator is penalised when it
                  can (non-saturating GAN loss ``d_loss``/``u_adv``);
* paired (two SE series of one patient, one frame of reference, same matrix): predict
  from one, render at the other's TE/TR and compare with it (``p_cross``).  Each series
  carries its own scanner scaling, so the comparison is made after a per-sample
  least-squares gain (``paired_compare: lsq_gain``, default: invariant to any global
  scale, compares contrast only) or after normalising both by their 99th percentile
  (``paired_compare: percentile``).  Plus ``p_id``: header TE/TR of the paired inputs.

Fine-tuning: ``--init CHECKPOINT`` (or ``init:``) starts from a training checkpoint
(``var/train/*/best.pt``; its architecture is used); ONNX models cannot be fine-tuned.

Scale-out: the same command under ``torchrun --nproc_per_node=N`` trains with
DistributedDataParallel (gloo on CPU, nccl on CUDA); each rank draws its own batches
(numpy seed + rank; ``batch_size`` is per rank), rank 0 validates, checkpoints, shows
progress and writes ``metrics.csv`` (and TensorBoard events when tensorboard is
installed).  ``amp: bf16|fp16|auto`` autocasts the forward passes on CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import distributed as dist
from torch.nn import functional as F
from tqdm import tqdm

from rtcontrast import dataset
from rtcontrast.model import Discriminator, ModelConfig, QMapFusionNet, QMapNet, fusion_from_single
from rtcontrast.model_se import LOG_SD_RANGE, QMapSENet, gaussian_nll
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
    # -- data sources (weights of each source's total loss; real sources need data_dir, qmap/1 only)
    w_phantom: float = 1.0
    w_unpaired: float = 0.0
    w_paired: float = 0.0
    #: folder of the researcher's own SE series (scanned with rtcontrast.importer)
    data_dir: str | None = None
    #: real slices per batch and source (per rank)
    real_batch_size: int = 4
    # -- unpaired terms
    w_u_self: float = 1.0
    w_u_id_real: float = 1.0
    w_u_id_render: float = 1.0
    w_u_adv: float = 0.05
    disc: dict[str, Any] = field(default_factory=lambda: {"widths": [16, 32, 64], "dropout": 0.2})
    lr_disc: float = 1e-4
    # -- paired terms: "lsq_gain" (per-sample least-squares gain) or "percentile" (both / 99th percentile)
    paired_compare: str = "lsq_gain"
    # -- fine-tuning: a training checkpoint (.pt) to start from (its architecture is used)
    init: str | None = None
    #: qmap/2: probability that a sample with >= 2 inputs has one T1w and one T2w among them
    p_complementary: float = 0.0
    #: qmap/2: start as an exact copy of this trained qmap/1 checkpoint (model.fusion_from_single)
    init_single: str | None = None
    #: qmap/2: start the fused branch from this earlier fusion checkpoint instead (needs init_single)
    init_fused: str | None = None
    #: qmap/2: a frozen copy of init_single answers single-input cases (model.QMapFusionNet)
    fusion_gated: bool = False
    #: qmap/2: the encoder also sees log intensities (voxel-wise log ratios between inputs)
    fusion_log_input: bool = False
    #: validation metric that selects best.pt: "render" (phantom) or "real_cross" (paired real data)
    select_on: str = "render"
    #: CUDA autocast: "none", "bf16", "fp16" or "auto" (bf16 where supported, else fp16); ignored on CPU
    amp: str = "none"
    #: wall-clock budget in seconds (None: none).  The cosine schedule then runs on the larger of step/steps and
    #: elapsed/budget, and training stops (validated, checkpointed) when the budget is spent, so a run on a slow or
    #: shared machine still ends with a decayed learning rate.  Elapsed time carries over --resume.
    time_budget_s: float | None = None
    #: warm start from an exported ONNX model of the same widths (rtcontrast.warmstart: folded BatchNorms are
    #: re-derived on a training batch; new input/output channels start fresh); ignored on --resume
    init_onnx: str | None = None
    #: qmap/3: phantom slices per source {pelvis, random, abdomen} (rtcontrast.dataset_se); the mix is by count
    se_sources: dict[str, int] = field(default_factory=lambda: {"pelvis": 2000, "random": 2000, "abdomen": 1000})
    #: qmap/3: validation slices per source (held-out seeds)
    se_val_sources: dict[str, int] = field(default_factory=lambda: {"pelvis": 24, "random": 16, "abdomen": 8})
    #: qmap/3: weight of the Gaussian NLL of log T1, log T2, log PD (trains the uncertainty outputs)
    w_nll: float = 0.1

    @classmethod
    def from_yaml(cls, path: str | Path) -> "TrainConfig":
        data = yaml.safe_load(Path(path).read_text()) or {}
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise SystemExit(f"{path}: unknown training option(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    @property
    def uses_real(self) -> bool:
        """True when a real-data source has weight (and so needs ``data_dir``)."""
        return self.w_unpaired > 0 or self.w_paired > 0

    def check(self) -> None:
        """Refuse inconsistent settings with a message that says what to change."""
        if self.uses_real and not self.data_dir:
            raise SystemExit("w_unpaired/w_paired > 0 need data_dir: the folder of your SE series")
        if self.uses_real and self.contract != "qmap/1":
            raise SystemExit("real-data training (w_unpaired/w_paired) is implemented for qmap/1 models only")
        if self.w_phantom <= 0 and not self.uses_real:
            raise SystemExit("no data source has weight: set w_phantom, w_unpaired or w_paired > 0")
        if self.paired_compare not in ("lsq_gain", "percentile"):
            raise SystemExit(f"paired_compare must be lsq_gain or percentile, got {self.paired_compare!r}")
        if self.select_on not in ("render", "real_cross"):
            raise SystemExit(f"select_on must be render or real_cross, got {self.select_on!r}")
        if self.select_on == "real_cross" and not self.data_dir:
            raise SystemExit("select_on: real_cross needs data_dir with paired series")
        if (self.fusion_gated or self.init_fused) and not (self.init_single or self.init):
            raise SystemExit("fusion_gated / init_fused need init_single: the trained qmap/1 checkpoint")
        if self.contract == "qmap/3" and self.uses_real:
            raise SystemExit("real-data training is not implemented for qmap/3 models yet (phantom sources only)")
        if self.amp not in ("none", "bf16", "fp16", "auto"):
            raise SystemExit(f"amp must be none, bf16, fp16 or auto, got {self.amp!r}")


def batch_to_torch(b: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device) for k, v in b.items()}


def make_batch(bank: Any, idx: np.ndarray, rng: np.random.Generator, cfg: TrainConfig) -> dict[str, np.ndarray]:
    if cfg.contract == "qmap/3":
        from rtcontrast import dataset_se

        se = [dataset_se.make_sample(bank.maps(int(i)), *dataset.random_contrast(rng, cfg.p_seed_contrast), rng,
                                     cfg.scale_jitter) for i in idx]
        out = dataset.stack(se)
        out["field_t"] = np.array([[s.field_t] for s in se], np.float32)
        # TE/TR cannot be told from a random-geometry image (its tissue values are random): identification
        # learns from the anatomical sources only
        out["id_weight"] = np.array([bank.source[int(i)] != dataset_se.SOURCES.index("random") for i in idx], np.float32)
        return out
    if cfg.contract == "qmap/2":
        multi = []
        p = np.asarray(cfg.p_inputs[: cfg.max_inputs], float)
        for i in idx:
            m = int(rng.choice(np.arange(1, len(p) + 1), p=p / p.sum()))
            contrasts = [dataset.random_contrast(rng, cfg.p_seed_contrast) for _ in range(m)]
            if m >= 2 and cfg.p_complementary > 0 and rng.random() < cfg.p_complementary:
                contrasts[:2] = dataset.complementary_pair(rng)
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
        opts = {"gated": cfg.fusion_gated, "log_input": cfg.fusion_log_input}
        if cfg.init_single:
            ck = _load_same_arch(cfg.init_single, cfg, "init_single")
            fused = _load_same_arch(cfg.init_fused, cfg, "init_fused")["model"] if cfg.init_fused else None
            return fusion_from_single(ck["model"], ModelConfig(**cfg.model), cfg.max_inputs, fused_state=fused, **opts)
        return QMapFusionNet(ModelConfig(**cfg.model), max_inputs=cfg.max_inputs, **opts)
    if cfg.contract == "qmap/3":
        return QMapSENet(ModelConfig(**cfg.model))  # type: ignore[return-value]
    if cfg.contract != "qmap/1":
        raise SystemExit(f"unknown contract {cfg.contract!r} (qmap/1, qmap/2 or qmap/3)")
    return QMapNet(ModelConfig(**cfg.model))


def _load_same_arch(path: str, cfg: TrainConfig, what: str) -> dict[str, Any]:
    """A checkpoint whose architecture must equal the configured one (else a message saying so)."""
    if not Path(path).is_file():
        raise SystemExit(f"{what} {path}: no such checkpoint")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if ck["model_config"] != ModelConfig(**cfg.model).to_dict():
        raise SystemExit(f"{what} {path}: architecture {ck['model_config']} differs from {cfg.model}")
    return ck


def run_model(model: QMapNet | QMapFusionNet, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if isinstance(getattr(model, "module", model), QMapFusionNet):  # DDP wraps the model
        return model(b["image"], b["te_tr"], b["present"])
    if isinstance(getattr(model, "module", model), QMapSENet):
        return model(b["image"], b["te_tr"], b["field_t"])
    return model(b["image"], b["te_tr"])


def target_contrasts(rng: np.random.Generator, n_random: int) -> list[tuple[float, float]]:
    return list(SEED_CONTRASTS) + [dataset.random_contrast(rng, 0.0) for _ in range(n_random)]


def losses(model: QMapNet | QMapFusionNet, b: dict[str, torch.Tensor], targets: list[tuple[float, float]], cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """All loss terms of one batch (weighted sum under 'total')."""
    return phantom_losses(run_model(model, b), b, targets, cfg)


def phantom_losses(outputs: tuple[torch.Tensor, ...], b: dict[str, torch.Tensor], targets: list[tuple[float, float]],
                   cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The phantom loss terms from the model's outputs on batch ``b`` (see the module docstring)."""
    pd, t1, t2, te_tr_pred = outputs[:4]
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
    if "id_weight" in b:
        per = (torch.log(te_tr_pred) - torch.log(b["te_tr0"])).abs().mean(dim=1)
        l_ident = (per * b["id_weight"]).sum() / b["id_weight"].sum().clamp(min=1.0)
    else:
        l_ident = (torch.log(te_tr_pred) - torch.log(b["te_tr0"])).abs().mean()
    total = (cfg.w_render * l_render + cfg.w_maps * l_maps + cfg.w_pd * l_pd + cfg.w_clean * l_clean
             + cfg.w_ident * l_ident)
    out = {"total": total, "render": l_render, "maps": l_maps, "pd": l_pd, "clean": l_clean, "ident": l_ident}
    if len(outputs) > 4:  # qmap/3: uncertainty of log T1, log T2, log PD (rtcontrast.model_se)
        t1_sd, t2_sd, pd_sd = outputs[4:7]
        l_nll = (gaussian_nll(torch.log(t1), torch.log(b["t1"].clamp(min=1)), t1_sd, strong)
                 + gaussian_nll(torch.log(t2), torch.log(b["t2"].clamp(min=1)), t2_sd, strong)
                 + gaussian_nll(torch.log(pd + 1e-3), torch.log(b["pd_img"] + 1e-3),
                                (pd_sd / pd.clamp(min=1e-3)).clamp(min=LOG_SD_RANGE[0]), strong))
        out["nll"] = l_nll
        out["total"] = total + cfg.w_nll * l_nll
    return out


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_at(step: int, cfg: TrainConfig, elapsed_s: float | None = None) -> float:
    """Linear warm-up then cosine decay to 2 % of the peak (progress by steps or by ``time_budget_s``)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.time_budget_s and elapsed_s is not None:
        p = max(p, elapsed_s / cfg.time_budget_s)
    return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def validation_batches(cfg: TrainConfig) -> list[dict[str, np.ndarray]]:
    """A fixed held-out validation set (seeds never used in training), deterministic."""
    if cfg.contract == "qmap/3":
        from rtcontrast import dataset_se

        base = dataset.HELDOUT_SEED_BASE
        bank: Any = dataset_se.build_mixed_bank({k: (base, base + n) for k, n in cfg.se_val_sources.items()}, cfg.patch,
                                               Path(cfg.cache_dir), workers=1)
    else:
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
                    best: float, rng: np.random.Generator, history: list[dict], extra: dict[str, Any] | None = None) -> None:
    """Atomically write a checkpoint (``extra``: real-data state: discriminator, its optimiser, RNG)."""
    tmp = path.with_suffix(".tmp")
    torch.save({
        "model": model.state_dict(),
        "model_config": model.cfg.to_dict(),
        "contract": cfg.contract,
        "max_inputs": cfg.max_inputs if cfg.contract == "qmap/2" else 1,
        "fusion_options": getattr(model, "options", {}),
        "train_config": asdict(cfg),
        "optimizer": opt.state_dict(),
        "step": step,
        "best": best,
        "rng": rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
        "history": history,
        "hardware": hardware(next(model.parameters()).device),
        **(extra or {}),
    }, tmp)
    tmp.replace(path)


def hardware(device: torch.device) -> str:
    """What trained this checkpoint (for the model card): device, CPU count, torch threads."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA), torch {torch.__version__}"
    return (f"CPU: {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads, no GPU, "
            f"torch {torch.__version__}")


# ----------------------------------------------------------------------------- real data


def _patch_norm(x: torch.Tensor) -> torch.Tensor:
    """Divide each image by the 99th percentile of its voxels > 0 (detached), like a series scale."""
    q = torch.nanquantile(torch.where(x > 0, x, torch.nan).detach().flatten(1).float(), 0.99, dim=1)
    q = torch.nan_to_num(q, nan=1.0).clamp(min=1e-6)
    return x / q[:, None, None, None]


def _id_l1(pred: torch.Tensor, te_tr: torch.Tensor) -> torch.Tensor:
    return (torch.log(pred) - torch.log(te_tr)).abs().mean()


def _at(te_tr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return te_tr[:, 0, None, None, None], te_tr[:, 1, None, None, None]


def unpaired_losses(core: QMapNet, disc: Discriminator, outputs: tuple[torch.Tensor, ...], ub: dict[str, torch.Tensor],
                    contrasts: np.ndarray, rng: np.random.Generator, cfg: TrainConfig,
                    autocast: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Unpaired terms (module docstring) and the renderings the discriminator step uses (detached)."""
    pd, t1, t2, idp = outputs
    img, tt = ub["image"], ub["te_tr"]
    n = img.shape[0]
    own = signal(pd, *_at(tt), t1, t2, xp=torch)
    l_self = F.l1_loss(own, img)
    l_id_real = _id_l1(idp, tt)
    # renderings: at the real data's contrasts (the discriminator's "real" distribution) and at random ones
    emp = contrasts[rng.integers(len(contrasts), size=n)]
    rnd = np.array([dataset.random_contrast(rng, 0.0) for _ in range(n)], np.float32)
    c = torch.from_numpy(np.concatenate([emp, rnd]).astype(np.float32)).to(img.device)
    rendered = _patch_norm(signal(pd.repeat(2, 1, 1, 1), *_at(c), t1.repeat(2, 1, 1, 1), t2.repeat(2, 1, 1, 1),
                                  xp=torch))
    with autocast:
        idr = core.identify(rendered)
        logits = disc(rendered[:n])
    l_id_render = _id_l1(idr.float(), c)
    l_adv = F.softplus(-logits.float()).mean()
    total = cfg.w_u_self * l_self + cfg.w_u_id_real * l_id_real + cfg.w_u_id_render * l_id_render + cfg.w_u_adv * l_adv
    return ({"u_total": total, "u_self": l_self, "u_id_real": l_id_real, "u_id_render": l_id_render, "u_adv": l_adv},
            rendered[:n].detach())


def paired_losses(outputs: tuple[torch.Tensor, ...], pb: dict[str, torch.Tensor], cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Cross-contrast term: the rendering at the target's TE/TR against the target (module docstring)."""
    pd, t1, t2, idp = outputs
    tgt = pb["target"]
    pred = signal(pd, *_at(pb["target_te_tr"]), t1, t2, xp=torch)
    m = ((tgt > 0) & (pb["image"] > 0)).to(pred.dtype)
    if cfg.paired_compare == "lsq_gain":
        g = (pred * tgt * m).sum(dim=(1, 2, 3)) / (pred * pred * m).sum(dim=(1, 2, 3)).clamp(min=1e-8)
        a, b = pred * g[:, None, None, None], tgt
    else:
        a, b = _patch_norm(pred), _patch_norm(tgt)
    l_cross = ((a - b).abs() * m).sum() / m.sum().clamp(min=1)
    l_id = _id_l1(idp, pb["te_tr"])
    return {"p_total": l_cross + cfg.w_u_id_real * l_id, "p_cross": l_cross, "p_id": l_id}


@torch.no_grad()
def validate_real(core: QMapNet, pairs: list[dict[str, np.ndarray]], cfg: TrainConfig, device: torch.device) -> dict[str, float]:
    """Paired cross-contrast L1 and TE/TR identification on fixed real slices (eval mode)."""
    core.eval()
    cross, ident = [], []
    for p in pairs:
        b = batch_to_torch(p, device)
        out = core(b["image"], b["te_tr"])
        lo = paired_losses(out, b, cfg)
        cross.append(float(lo["p_cross"]))
        ident.append(float(lo["p_id"]))
    core.train()
    return {"real_cross": float(np.mean(cross)), "real_id": float(np.mean(ident))} if pairs else {}


# ----------------------------------------------------------------------------- run-time plumbing


@dataclass
class Dist:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def setup_distributed(device: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the group (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device)
    if device == "cuda":
        dev = torch.device(f"cuda:{local}")
        torch.cuda.set_device(dev)
    if world <= 1:
        return Dist(0, 1, dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), dev)


def autocast_for(cfg: TrainConfig, dev: torch.device) -> tuple[Any, torch.dtype | None]:
    """The autocast context of the forward passes (a no-op on CPU or with amp: none)."""
    if dev.type != "cuda" or cfg.amp == "none":
        return contextlib.nullcontext(), None
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)
    if dtype is None:  # auto
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype), dtype


class MetricsLog:
    """``metrics.csv`` in the output folder (rank 0): step, lr, elapsed, train losses, val_* columns.

    On resume, rows past the resumed step (written by the interrupted run) are dropped so
    the file reads as one run.  TensorBoard events go to ``out_dir/tb`` when tensorboard
    is installed.
    """

    def __init__(self, path: Path, columns: list[str], resume_step: int | None) -> None:
        self.path = path
        self.columns = ["step", "lr", "elapsed_s"] + columns
        rows: list[dict[str, str]] = []
        if resume_step is not None and path.exists():
            with path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, self.columns, restval="", extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tb"))
        except Exception:  # tensorboard not installed: CSV only
            self.tb = None

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns, restval="", extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, int(row["step"]))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def load_init(cfg: TrainConfig, path: str) -> dict[str, Any]:
    """A training checkpoint to fine-tune from; its architecture replaces ``cfg.model``."""
    p = Path(path)
    if p.suffix == ".onnx":
        raise SystemExit(f"{p}: an ONNX model cannot be fine-tuned; use the training checkpoint it was exported "
                         "from (var/train/<run>/best.pt)")
    if not p.is_file():
        raise SystemExit(f"--init {p}: no such checkpoint")
    ck = torch.load(p, map_location="cpu", weights_only=False)
    if ck.get("contract", "qmap/1") != cfg.contract:
        raise SystemExit(f"--init {p} is a {ck.get('contract')} model, this run trains {cfg.contract}")
    if cfg.model != ck["model_config"]:
        log.info("fine-tuning: architecture from %s (%s) replaces the config's %s", p, ck["model_config"], cfg.model)
    cfg.model = dict(ck["model_config"])
    opts = ck.get("fusion_options", {})
    cfg.fusion_gated = bool(opts.get("gated", False))
    cfg.fusion_log_input = bool(opts.get("log_input", False))
    return ck


# ----------------------------------------------------------------------------- training


def train(cfg: TrainConfig, device: str = "cpu", resume: str | None = None, stop_after: int | None = None,
          init: str | None = None) -> Path:
    """Run training; returns the path of the best checkpoint.

    ``stop_after`` ends this run at that step (checkpointed) without changing the
    schedule, for time-boxed jobs that ``--resume`` later.  ``init`` (or ``cfg.init``)
    starts from a training checkpoint's weights (fine-tuning; fresh optimiser, step 0).
    Under torchrun every rank calls this; only rank 0 writes files.
    """
    cfg.check()
    init = init or cfg.init
    cfg.init = init
    dd = setup_distributed(device)
    torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    dev = dd.device
    out = Path(cfg.out_dir)
    init_ck = load_init(cfg, init) if init else None
    if dd.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    core = build_model(cfg).to(dev)
    if init_ck is not None:
        core.load_state_dict(init_ck["model"])
    opt = torch.optim.AdamW(core.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    # rank 0 draws exactly what a single process draws (the phantom path's RNG order is unchanged)
    rng = np.random.default_rng(cfg.seed + dd.rank)
    real = None
    real_rng = np.random.default_rng([cfg.seed, dd.rank, 1])
    disc = disc_opt = None
    if cfg.uses_real:
        from rtcontrast.realdata_source import RealDataSource

        real = RealDataSource.from_folder(cfg.data_dir, cfg.patch)  # type: ignore[arg-type]
        if cfg.w_paired > 0 and not real.pairs:
            raise SystemExit(f"w_paired > 0 but {cfg.data_dir} has no paired series (two SE contrasts of one "
                             "frame of reference with the same matrix); set w_paired: 0")
        if cfg.select_on == "real_cross" and not real.pairs:
            raise SystemExit(f"select_on: real_cross needs paired series in {cfg.data_dir}; none found")
        if cfg.w_unpaired > 0:
            disc = Discriminator(**cfg.disc).to(dev)
            disc_opt = torch.optim.Adam(disc.parameters(), lr=cfg.lr_disc, betas=(0.5, 0.999))
    step, best, history = 0, float("inf"), []
    elapsed0 = 0.0
    if resume:
        ck = torch.load(resume, map_location=dev, weights_only=False)
        core.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, best, history = ck["step"], ck["best"], ck.get("history", [])
        elapsed0 = float(ck.get("elapsed_total_s", 0.0))
        if dd.main:
            rng.bit_generator.state = ck["rng"]
            torch.set_rng_state(ck["torch_rng"])
            if "real_rng" in ck:
                real_rng.bit_generator.state = ck["real_rng"]
        else:  # other ranks: fresh, distinct streams (resume is exact on one process)
            rng = np.random.default_rng([cfg.seed, dd.rank, step])
            real_rng = np.random.default_rng([cfg.seed, dd.rank, step, 1])
        if disc is not None and "disc" in ck:
            disc.load_state_dict(ck["disc"])
            disc_opt.load_state_dict(ck["disc_optimizer"])  # type: ignore[union-attr]
        if dd.main:
            log.info("resumed from %s at step %d", resume, step)
    model: Any = core
    disc_ddp: Any = disc
    if dd.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [dev.index] if dev.type == "cuda" else None
        # gated fusion: the fused branch's identification head is computed but unused (the frozen branch answers)
        model = DDP(core, device_ids=ids, find_unused_parameters=bool(getattr(core, "gated", False)))
        if disc is not None:
            disc_ddp = DDP(disc, device_ids=ids)
    autocast, amp_dtype = autocast_for(cfg, dev)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16) if dev.type == "cuda" else None
    # phantoms: rank 0 fills the cache first, the others then read it
    bank = None
    if cfg.w_phantom > 0:
        if dd.main:
            bank = training_bank(cfg)
        dd.barrier()
        if not dd.main:
            bank = training_bank(cfg)
    if cfg.init_onnx and not resume:
        from rtcontrast.warmstart import load_from_onnx

        calib = batch_to_torch(make_batch(bank, np.random.default_rng(cfg.seed + 99).integers(0, len(bank), 16),
                                          np.random.default_rng(cfg.seed + 98), cfg), dev)  # type: ignore[arg-type]
        args = (calib["image"], calib["te_tr"]) + ((calib["field_t"],) if cfg.contract == "qmap/3" else ())
        load_from_onnx(core, cfg.init_onnx, args)
        if dd.world > 1:  # every rank starts from rank 0's calibration
            for t in core.state_dict().values():
                dist.broadcast(t, 0)
    val = validation_batches(cfg) if dd.main else []
    real_val = real.validation_pairs() if (real is not None and dd.main) else []
    if step == 0 and dd.main:
        v0 = validate(core, val, cfg, dev)
        v0.update(validate_real(core, real_val, cfg, dev))
        v0.update(step=0, elapsed_s=0.0)
        history.append(v0)
    core.train()
    mixed = cfg.uses_real or cfg.w_phantom != 1.0
    keys = (["total", "render", "maps", "pd", "clean", "ident"] if cfg.w_phantom > 0 else ["total"])
    if cfg.contract == "qmap/3":
        keys.append("nll")
    if cfg.w_unpaired > 0:
        keys += ["u_total", "u_self", "u_id_real", "u_id_render", "u_adv", "d_loss"]
    if cfg.w_paired > 0:
        keys += ["p_total", "p_cross", "p_id"]
    val_keys = ["val_" + k for k in ("total", "render", "maps", "pd", "clean", "ident", "nll", "real_cross", "real_id")]
    metrics = MetricsLog(out / "metrics.csv", keys + val_keys, step if resume else None) if dd.main else None
    bar = tqdm(total=cfg.steps, initial=step, desc="train", dynamic_ncols=True, disable=not dd.main)
    t0 = time.time()
    end = min(cfg.steps, stop_after) if stop_after else cfg.steps
    spent = False
    elapsed_total = elapsed0  # measured after each step: the same figure decides the last validation and the stop
    while step < end:
        elapsed, spent = _clock(cfg, dd, elapsed_total)
        if spent:
            log.info("time budget of %.0f s spent at step %d: stopping", cfg.time_budget_s, step)
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, elapsed)
        if not mixed:
            idx = rng.integers(0, len(bank), cfg.batch_size)  # type: ignore[arg-type]
            b = batch_to_torch(make_batch(bank, idx, rng, cfg), dev)  # type: ignore[arg-type]
            with autocast:
                lo = losses(model, b, target_contrasts(rng, cfg.random_targets), cfg)
            fake = None
        else:
            lo, fake, ub = mixed_losses(model, core, disc, bank, real, rng, real_rng, cfg, dev, autocast)
        opt.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(lo["total"]).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(core.parameters(), 1.0)
            scaler.step(opt)
            scaler.update()
        else:
            lo["total"].backward()
            torch.nn.utils.clip_grad_norm_(core.parameters(), 1.0)
            opt.step()
        if fake is not None and disc is not None:
            lo["d_loss"] = discriminator_step(disc, disc_ddp, disc_opt, ub["image"], fake, autocast)  # type: ignore[arg-type]
        step += 1
        bar.update(1)
        bar.set_postfix({k: f"{float(v.detach()):.4f}" for k, v in lo.items() if k in ("total", "render", "maps", "nll", "p_cross")})
        row: dict[str, Any] = {"step": step, "lr": lr_at(step - 1, cfg, elapsed), "elapsed_s": round(time.time() - t0, 1)}
        elapsed_total = elapsed0 + time.time() - t0
        last_one = step == cfg.steps or bool(cfg.time_budget_s and elapsed_total >= cfg.time_budget_s)
        row.update({k: float(v.detach()) for k, v in lo.items()})
        if dd.main and (step % cfg.val_every == 0 or last_one):
            v = validate(core, val, cfg, dev)
            v.update(validate_real(core, real_val, cfg, dev))
            v.update(step=step, elapsed_s=round(time.time() - t0, 1))
            history.append(v)
            row.update({"val_" + k: x for k, x in v.items() if k not in ("step", "elapsed_s")})
            log.info("step %d validation: %s", step, json.dumps({k: round(x, 5) for k, x in v.items()}))
            if v[cfg.select_on] < best:
                best = v[cfg.select_on]
                save_checkpoint(out / "best.pt", core, opt, step, cfg, best, rng, history,
                                {**_extra(disc, disc_opt, real_rng, real), "elapsed_total_s": elapsed_total})
        if metrics is not None:
            metrics.write(row)
        if dd.main and (step % cfg.ckpt_every == 0 or step in (cfg.steps, end) or last_one):
            save_checkpoint(out / "last.pt", core, opt, step, cfg, best, rng, history,
                            {**_extra(disc, disc_opt, real_rng, real), "elapsed_total_s": elapsed_total})
    bar.close()
    if metrics is not None:
        metrics.close()
    dd.barrier()
    return out / "best.pt"


def _clock(cfg: TrainConfig, dd: Dist, elapsed: float) -> tuple[float, bool]:
    """(elapsed seconds, budget spent?) as rank 0 sees them, so every rank uses one lr and stops at one step."""
    spent = bool(cfg.time_budget_s and elapsed >= cfg.time_budget_s)
    if dd.world > 1 and cfg.time_budget_s:
        t = torch.tensor([elapsed, float(spent)], device=dd.device)
        dist.broadcast(t, 0)
        elapsed, spent = float(t[0]), bool(t[1] > 0.5)
    return elapsed, spent


def training_bank(cfg: TrainConfig) -> Any:
    """The phantom maps of the training seeds (qmap/3: the mixed sources of rtcontrast.dataset_se)."""
    if cfg.contract == "qmap/3":
        from rtcontrast import dataset_se

        return dataset_se.build_mixed_bank({k: (0, n) for k, n in cfg.se_sources.items()}, cfg.patch,
                                           Path(cfg.cache_dir))
    return dataset.build_bank(range(0, cfg.n_train_subjects), cfg.patch, Path(cfg.cache_dir))


def mixed_losses(model: Any, core: QMapNet, disc: Discriminator | None, bank: dataset.Bank | None, real: Any,
                 rng: np.random.Generator, real_rng: np.random.Generator, cfg: TrainConfig, dev: torch.device,
                 autocast: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, dict[str, torch.Tensor]]:
    """One forward over the concatenated sources (one DDP forward per step), then each source's terms."""
    parts: list[tuple[str, dict[str, torch.Tensor]]] = []
    targets: list[tuple[float, float]] = []
    if cfg.w_phantom > 0 and bank is not None:
        idx = rng.integers(0, len(bank), cfg.batch_size)
        parts.append(("phantom", batch_to_torch(make_batch(bank, idx, rng, cfg), dev)))
        targets = target_contrasts(rng, cfg.random_targets)
    if cfg.w_unpaired > 0:
        parts.append(("unpaired", batch_to_torch(real.unpaired_batch(real_rng, cfg.real_batch_size), dev)))
    if cfg.w_paired > 0:
        parts.append(("paired", batch_to_torch(real.paired_batch(real_rng, cfg.real_batch_size), dev)))
    image = torch.cat([b["image"] for _, b in parts])
    te_tr = torch.cat([b["te_tr"] for _, b in parts])
    with autocast:
        outs = model(image, te_tr)
    outs = tuple(o.float() for o in outs)
    sizes = [b["image"].shape[0] for _, b in parts]
    split = list(zip(*(torch.split(o, sizes) for o in outs)))
    lo: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=dev)
    fake = None
    ub: dict[str, torch.Tensor] = {}
    for (name, b), o in zip(parts, split):
        if name == "phantom":
            lp = phantom_losses(o, b, targets, cfg)
            total = total + cfg.w_phantom * lp["total"]
            lo.update({k: v for k, v in lp.items() if k != "total"})
        elif name == "unpaired":
            assert disc is not None
            for p in disc.parameters():
                p.requires_grad_(False)
            lu, fake = unpaired_losses(core, disc, o, b, real.contrasts, real_rng, cfg, autocast)
            for p in disc.parameters():
                p.requires_grad_(True)
            total = total + cfg.w_unpaired * lu["u_total"]
            lo.update(lu)
            ub = b
        else:
            lq = paired_losses(o, b, cfg)
            total = total + cfg.w_paired * lq["p_total"]
            lo.update(lq)
    lo["total"] = total
    return lo, fake, ub


def discriminator_step(disc: Discriminator, disc_ddp: Any, disc_opt: torch.optim.Optimizer, real_images: torch.Tensor,
                       fake: torch.Tensor, autocast: Any) -> torch.Tensor:
    """One update of the critic: real inputs vs renderings (both normalised per patch); its loss."""
    n = real_images.shape[0]
    with autocast:
        logits = disc_ddp(torch.cat([_patch_norm(real_images), fake])).float()
    loss = F.softplus(-logits[:n]).mean() + F.softplus(logits[n:]).mean()
    disc_opt.zero_grad(set_to_none=True)
    loss.backward()
    disc_opt.step()
    return loss.detach()


def _extra(disc: Discriminator | None, disc_opt: torch.optim.Optimizer | None, real_rng: np.random.Generator,
           real: Any) -> dict[str, Any]:
    """Checkpoint entries of the real-data path (none on the phantom-only path)."""
    if real is None:
        return {}
    e: dict[str, Any] = {"real_rng": real_rng.bit_generator.state, "real_data": {
        "series": len(real.series), "patients": len({s.patient_hash for s in real.series}),
        "paired_directions": len(real.pairs), "slices": int(sum(s.pixels.shape[0] for s in real.series)),
        "contrasts_te_tr_ms": sorted({(s.te, s.tr) for s in real.series})}}
    if disc is not None and disc_opt is not None:
        e["disc"] = disc.state_dict()
        e["disc_optimizer"] = disc_opt.state_dict()
    return e


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rtcontrast.train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None, help="training YAML (default: built-in defaults)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--resume", default=None, help="checkpoint to resume from (last.pt)")
    ap.add_argument("--init", default=None, help="fine-tune from this training checkpoint (.pt, not .onnx)")
    ap.add_argument("--data", default=None, help="override data_dir (folder of your SE series)")
    ap.add_argument("--amp", default=None, choices=["none", "bf16", "fp16", "auto"], help="override amp (CUDA)")
    ap.add_argument("--stop-after", type=int, default=None, help="stop (checkpointed) at this step; resume later")
    ap.add_argument("--steps", type=int, default=None, help="override the number of steps")
    ap.add_argument("--out-dir", default=None, help="override the output folder")
    a = ap.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig.from_yaml(a.config) if a.config else TrainConfig()
    if a.steps is not None:
        cfg.steps = a.steps
    if a.out_dir is not None:
        cfg.out_dir = a.out_dir
    if a.data is not None:
        cfg.data_dir = a.data
    if a.amp is not None:
        cfg.amp = a.amp
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    try:
        best = train(cfg, a.device, a.resume, a.stop_after, a.init)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(best)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
