"""Train the qmap network on phantoms: ``python -m rtcontrast.research.train --config config/train_default.yaml``.

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
series (:mod:`rtcontrast.research.realdata_source`) add two sources, mixed with the phantoms by
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
  ``u_adv``       a small discriminator (:class:`~rtcontrast.research.model.Discriminator`, its
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
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import distributed as dist
from tqdm import tqdm

from rtcontrast.research import dataset
from rtcontrast.research.model import Discriminator, QMapFusionNet, QMapNet
from rtcontrast.core.physics import SEED_CONTRASTS

from rtcontrast.research.train_config import TrainConfig
from rtcontrast.research.train_losses import _extra, batch_to_torch, build_model, discriminator_step, losses, make_batch, mixed_losses, target_contrasts, validate_real  # noqa: F401 (re-exported)
from rtcontrast.research.train_runtime import Dist, MetricsLog, autocast_for, load_init, lr_at, save_checkpoint, seed_everything, setup_distributed  # noqa: F401 (re-exported)

log = logging.getLogger("rtcontrast.research.train")


def validation_batches(cfg: TrainConfig) -> list[dict[str, np.ndarray]]:
    """A fixed held-out validation set (seeds never used in training), deterministic."""
    if cfg.contract == "qmap/3":
        from rtcontrast.research import dataset_se

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
        from rtcontrast.research.realdata_source import RealDataSource

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
    if cfg.init_onnx and not resume and init_ck is None:  # --init wins over the config's ONNX warm start
        from rtcontrast.research.warmstart import load_from_onnx

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
    pf = None
    if cfg.data_workers and not mixed:  # phantom batches made ahead by workers (rtcontrast.research.prefetch)
        from rtcontrast.research.prefetch import TARGET_STREAM, Prefetcher, step_rng

        pf = Prefetcher(bank, cfg, dd.rank, step, cfg.data_workers)
    while step < end:
        elapsed, spent = _clock(cfg, dd, elapsed_total)
        if spent:
            log.info("time budget of %.0f s spent at step %d: stopping", cfg.time_budget_s, step)
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg, elapsed)
        if pf is not None:
            b = batch_to_torch(pf.get(step), dev)
            with autocast:
                lo = losses(model, b, target_contrasts(step_rng(cfg, dd.rank, step, TARGET_STREAM),
                                                       cfg.random_targets), cfg)
            fake = None
        elif not mixed:
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
    if pf is not None:
        pf.close()
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
    """The phantom maps of the training seeds (qmap/3: the mixed sources of rtcontrast.research.dataset_se)."""
    if cfg.contract == "qmap/3":
        from rtcontrast.research import dataset_se

        return dataset_se.build_mixed_bank({k: (0, n) for k, n in cfg.se_sources.items()}, cfg.patch,
                                           Path(cfg.cache_dir))
    return dataset.build_bank(range(0, cfg.n_train_subjects), cfg.patch, Path(cfg.cache_dir))




def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rtcontrast.research.train", description=__doc__.splitlines()[0])
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
