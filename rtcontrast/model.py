"""The qmap network (torch): one spin-echo image + its TE/TR -> PD, T1, T2, and TE/TR identified.

After the seed (Simkó et al. 2021) with three changes that make it exact and fast:

* The encoder sees the image only; its bottleneck feeds the contrast-identification head,
  so ``te_tr_pred`` really comes "from the image alone".  TE/TR enter the decoder as
  constant channels (log-normalised) at every level.
* The decoder predicts log-bounded T1 in [1, 10000] ms and T2 in [1, 5000] ms, and a
  denoised copy ``c`` of the input (a zero-initialised residual).  PD is then *solved*
  from the signal equation, PD = c / E(TE, TR, T1, T2), so rendering at the input's own
  TE/TR reproduces the (denoised) input by construction: PD is in the units of the input.
* Widths are small (default 16-32-64-96) so a 256x256 slice runs in well under 100 ms on
  two CPU cores through onnxruntime.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from rtcontrast.physics import weighting

T1_RANGE = (1.0, 10000.0)
T2_RANGE = (1.0, 5000.0)
#: The identification head's output range (slightly wider than the trained input range).
TE_ID_RANGE = (4.0, 300.0)
TR_ID_RANGE = (150.0, 12000.0)
#: Smallest E used when solving PD = c / E: a voxel that gives < 0.1 % of its PD as
#: signal carries no usable PD information (PD is then bounded, not exploded).
MIN_WEIGHTING = 1e-3


@dataclass
class ModelConfig:
    """Architecture hyper-parameters (stored in checkpoints and the model card)."""

    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 96])
    id_hidden: int = 64

    @property
    def spatial_multiple(self) -> int:
        return 2 ** (len(self.widths) - 1)

    def to_dict(self) -> dict:
        return asdict(self)


def norm_te_tr(te_tr: torch.Tensor) -> torch.Tensor:
    """log-normalise [N,2] TE/TR (ms) to roughly [-1, 1]."""
    te = (torch.log(te_tr[:, 0:1].clamp(min=1.0)) - math.log(35.0)) / 1.5
    tr = (torch.log(te_tr[:, 1:2].clamp(min=1.0)) - math.log(1500.0)) / 1.5
    return torch.cat([te, tr], dim=1)


def _bounded(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Map an unbounded tensor into [lo, hi] on a log scale."""
    return torch.exp(math.log(lo) + torch.sigmoid(x) * (math.log(hi) - math.log(lo)))


def _unbound(v: float, lo: float, hi: float) -> float:
    """Inverse of :func:`_bounded` for a scalar (for bias initialisation)."""
    s = (math.log(v) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return math.log(s / (1 - s))


class ConvBlock(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class QMapNet(nn.Module):
    """Encoder-decoder mapping (image [N,1,H,W], te_tr [N,2]) to (pd, t1, t2, te_tr_pred)."""

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
            # upsampled deeper features + skip + 2 TE/TR channels
            self.dec.append(ConvBlock(w[i + 1] + w[i] + 2, w[i]))
        self.head = nn.Conv2d(w[0] + 1, 3, 1)  # + raw input channel (the seed's last skip)
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():
            self.head.bias.copy_(torch.tensor([_unbound(1000.0, *T1_RANGE), _unbound(60.0, *T2_RANGE), 0.0]))
        self.id_head = nn.Sequential(
            nn.Linear(2 * w[-1], self.cfg.id_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(self.cfg.id_hidden, 2),
        )

    def forward(self, image: torch.Tensor, te_tr: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = []
        x = image
        for i, blk in enumerate(self.enc):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = blk(x)
            feats.append(x)
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        idr = self.id_head(pooled)
        te_tr_pred = torch.cat(
            [_bounded(idr[:, 0:1], *TE_ID_RANGE), _bounded(idr[:, 1:2], *TR_ID_RANGE)], dim=1
        )
        cond = norm_te_tr(te_tr)[:, :, None, None]
        for j, blk in enumerate(self.dec):
            skip = feats[len(feats) - 2 - j]
            x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
            c = cond.expand(-1, -1, skip.shape[2], skip.shape[3])
            x = blk(torch.cat([x, skip, c], dim=1))
        out = self.head(torch.cat([x, image], dim=1))
        t1 = _bounded(out[:, 0:1], *T1_RANGE)
        t2 = _bounded(out[:, 1:2], *T2_RANGE)
        clean = F.relu(image + out[:, 2:3])
        te = te_tr[:, 0:1, None, None]
        tr = te_tr[:, 1:2, None, None]
        e = weighting(te, tr, t1, t2, xp=torch).clamp(min=MIN_WEIGHTING)
        pd = clean / e
        return pd, t1, t2, te_tr_pred


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
