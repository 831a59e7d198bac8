"""Batches and losses: phantom batches (maps known), real-data batches (unpaired/paired), the discriminator.

Every loss is computed from the model's outputs and the signal equation; the training loop
(:mod:`rtcontrast.research.train`) only weighs and sums them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from rtcontrast.research import dataset
from rtcontrast.research.model import Discriminator, ModelConfig, QMapFusionNet, QMapNet, fusion_from_single
from rtcontrast.research.model_se import LOG_SD_RANGE, QMapSENet, gaussian_nll
from rtcontrast.core.physics import SEED_CONTRASTS, signal

from rtcontrast.research.train_config import TrainConfig

log = logging.getLogger(__name__)


def batch_to_torch(b: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v).to(device) for k, v in b.items()}


def make_batch(bank: Any, idx: np.ndarray, rng: np.random.Generator, cfg: TrainConfig) -> dict[str, np.ndarray]:
    if cfg.contract == "qmap/3":
        from rtcontrast.research import dataset_se

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
    if len(outputs) > 4:  # qmap/3: uncertainty of log T1, log T2, log PD (rtcontrast.research.model_se)
        t1_sd, t2_sd, pd_sd = outputs[4:7]
        l_nll = (gaussian_nll(torch.log(t1), torch.log(b["t1"].clamp(min=1)), t1_sd, strong)
                 + gaussian_nll(torch.log(t2), torch.log(b["t2"].clamp(min=1)), t2_sd, strong)
                 + gaussian_nll(torch.log(pd + 1e-3), torch.log(b["pd_img"] + 1e-3),
                                (pd_sd / pd.clamp(min=1e-3)).clamp(min=LOG_SD_RANGE[0]), strong))
        out["nll"] = l_nll
        out["total"] = total + cfg.w_nll * l_nll
    return out




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
