"""The ``qmap/3`` network: one SE image + TE/TR + field strength -> PD, T1, T2, TE/TR and their uncertainty.

:class:`rtcontrast.research.model.QMapNet` with two changes:

* the decoder is conditioned on the field strength (the header's MagneticFieldStrength):
  T1 of every tissue is ~20 % longer at 3 T than at 1.5 T, so without it one intensity
  has two right answers;
* the head has three more channels: the standard deviation of log T1, log T2 and log PD
  (a heteroscedastic Gaussian on log maps, trained by :func:`gaussian_nll`).  One SE
  image gives one equation per voxel for three unknowns, so the honest answer is often
  "uncertain"; the node turns these into a per-series QA score
  (:mod:`rtcontrast.core.uncertainty_qa`).  Exported: ``t1_log_sd``, ``t2_log_sd`` (sd of the
  natural log, ~ relative sd) and ``pd_sd`` (PD units: pd * sd of log PD).

Widths as today's shipped model ([16, 32, 64, 96, 128]) so node inference stays as fast.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from rtcontrast.research.model import (
    MIN_WEIGHTING,
    T1_RANGE,
    T2_RANGE,
    TE_ID_RANGE,
    TR_ID_RANGE,
    ConvBlock,
    ModelConfig,
    _bounded,
    _unbound,
    norm_te_tr,
)
from rtcontrast.core.physics import weighting

#: Range of the predicted sd of a log map (0.5 % .. 300 %).
LOG_SD_RANGE = (0.005, 3.0)
#: Field strengths are normalised as log(B0 / 2.12 T) / 0.5 (about -0.7 .. +0.7 for 1-3 T).
FIELD_REF_T = 2.12


def norm_field(field_t: torch.Tensor) -> torch.Tensor:
    """[N,1] tesla -> roughly [-1, 1]."""
    return torch.log(field_t.clamp(min=0.2) / FIELD_REF_T) / 0.5


class QMapSENet(nn.Module):
    """(image [N,1,H,W], te_tr [N,2], field_t [N,1]) -> (pd, t1, t2, te_tr_pred, t1_log_sd, t2_log_sd, pd_sd)."""

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ModelConfig()
        w = self.cfg.widths
        self.enc = nn.ModuleList()
        cin = 1
        for c in w:
            self.enc.append(ConvBlock(cin, c))
            cin = c
        self.dec = nn.ModuleList()
        for i in range(len(w) - 2, -1, -1):
            self.dec.append(ConvBlock(w[i + 1] + w[i] + 3, w[i]))  # + TE, TR, field channels
        self.head = nn.Conv2d(w[0] + 1, 6, 1)
        nn.init.zeros_(self.head.weight)
        sd0 = _unbound(0.3, *LOG_SD_RANGE)
        with torch.no_grad():
            self.head.bias.copy_(torch.tensor([_unbound(1000.0, *T1_RANGE), _unbound(60.0, *T2_RANGE), 0.0,
                                               sd0, sd0, sd0]))
        self.id_head = nn.Sequential(nn.Linear(2 * w[-1], self.cfg.id_hidden), nn.ReLU(inplace=True),
                                     nn.Linear(self.cfg.id_hidden, 2))

    def encode(self, image: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's feature maps, finest first (the last is the bottleneck)."""
        feats = []
        x = image
        for i, blk in enumerate(self.enc):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = blk(x)
            feats.append(x)
        return feats

    def forward(self, image: torch.Tensor, te_tr: torch.Tensor, field_t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.encode(image)
        x = feats[-1]
        te_tr_pred = identify(self.id_head, pool(x))
        cond = torch.cat([norm_te_tr(te_tr), norm_field(field_t)], dim=1)[:, :, None, None]
        for j, blk in enumerate(self.dec):
            skip = feats[len(feats) - 2 - j]
            x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
            x = blk(torch.cat([x, skip, cond.expand(-1, -1, skip.shape[2], skip.shape[3])], dim=1))
        out = self.head(torch.cat([x, image], dim=1))
        t1 = _bounded(out[:, 0:1], *T1_RANGE)
        t2 = _bounded(out[:, 1:2], *T2_RANGE)
        clean = F.relu(image + out[:, 2:3])
        e = weighting(te_tr[:, 0:1, None, None], te_tr[:, 1:2, None, None], t1, t2, xp=torch).clamp(min=MIN_WEIGHTING)
        pd = clean / e
        t1_sd = _bounded(out[:, 3:4], *LOG_SD_RANGE)
        t2_sd = _bounded(out[:, 4:5], *LOG_SD_RANGE)
        pd_sd = pd * _bounded(out[:, 5:6], *LOG_SD_RANGE)
        return pd, t1, t2, te_tr_pred, t1_sd, t2_sd, pd_sd


def pool(bottleneck: torch.Tensor) -> torch.Tensor:
    """What the identification head reads: the bottleneck's mean and max over the image ([N, 2C])."""
    return torch.cat([bottleneck.mean(dim=(2, 3)), bottleneck.amax(dim=(2, 3))], dim=1)


def identify(id_head: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """TE/TR in ms ([N, 2]) from pooled features through ``id_head`` (the network's or a refit copy,
    :mod:`rtcontrast.research.refit_ident`)."""
    idr = id_head(pooled)
    return torch.cat([_bounded(idr[:, 0:1], *TE_ID_RANGE), _bounded(idr[:, 1:2], *TR_ID_RANGE)], dim=1)


def gaussian_nll(pred_log: torch.Tensor, true_log: torch.Tensor, sd: torch.Tensor, mask: torch.Tensor,
                 beta: float = 1.0) -> torch.Tensor:
    """Masked mean Gaussian negative log-likelihood of ``true_log`` under N(pred_log, sd^2), beta-weighted.

    Per voxel ``sd_detached^(2 beta) * (log sd + 0.5 (err / sd)^2)`` (Seitzer et al. 2022,
    "beta-NLL"): the weight is detached, so the minimiser is unchanged (sd = |error|; in
    expectation the RMS error), but the gradient no longer explodes where a small sd
    meets a large error (with beta = 1 it is sd^2 - err^2), which otherwise swamps the
    maps' losses under gradient clipping.  The mean is detached too: the maps are trained
    by their own (L1) losses and this term only calibrates the sd.
    """
    err = (pred_log.detach() - true_log).float()
    sd = sd.float()
    nll = torch.log(sd) + 0.5 * (err / sd) ** 2
    if beta:
        nll = nll * sd.detach() ** (2 * beta)
    m = mask.to(nll.dtype)
    return (nll * m).sum() / m.sum().clamp(min=1.0)
