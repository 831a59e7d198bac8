"""Run-time plumbing of training: seeds, the learning-rate schedule, checkpoints, hardware, distributed
set-up, autocast and the metrics log.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import distributed as dist

from rtcontrast.research.model import QMapFusionNet, QMapNet

from rtcontrast.research.train_config import TrainConfig

log = logging.getLogger(__name__)


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
    if cfg.contract == "qmap/2" and ck.get("max_inputs") and int(ck["max_inputs"]) != cfg.max_inputs:
        log.info("fine-tuning: max_inputs %s from %s replaces the config's %d", ck["max_inputs"], p, cfg.max_inputs)
        cfg.max_inputs = int(ck["max_inputs"])
    return ck
