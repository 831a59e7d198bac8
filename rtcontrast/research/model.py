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

from rtcontrast.core.physics import MIN_WEIGHTING, weighting

T1_RANGE = (1.0, 10000.0)
T2_RANGE = (1.0, 5000.0)
#: The identification head's output range (slightly wider than the trained input range).
TE_ID_RANGE = (4.0, 300.0)
TR_ID_RANGE = (150.0, 12000.0)
#: Added before the log of a (series-scaled) input for the fusion network's log channel.
LOG_FLOOR = 1e-2


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


    def identify(self, image: torch.Tensor) -> torch.Tensor:
        """TE/TR [N,2] (ms) identified from ``image`` [N,1,H,W] alone (encoder + id head only).

        Why a separate method: training on unpaired real data asks the identifier to recover
        the TE/TR at which an image was *rendered* from predicted maps (the seed's
        contrast-identification loss).  The same computation as in :meth:`forward`, which
        stays untouched so the exported ONNX graph does not change.
        """
        x = image
        for i, blk in enumerate(self.enc):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = blk(x)
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        idr = self.id_head(pooled)
        return torch.cat([_bounded(idr[:, 0:1], *TE_ID_RANGE), _bounded(idr[:, 1:2], *TR_ID_RANGE)], dim=1)


class Discriminator(nn.Module):
    """Small real-vs-rendered critic for adversarial fine-tuning on real images (training only).

    After the seed's identifier: strided 4x4 convolutions with LeakyReLU(0.2) and dropout,
    global average pooling, one logit (> 0: "looks like a real acquisition").  It keeps
    images rendered from the predicted maps at real-looking contrasts realistic; it is
    never exported.
    """

    def __init__(self, widths: list[int] | None = None, dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for c in widths or [16, 32, 64]:
            layers += [nn.Conv2d(cin, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True), nn.Dropout2d(dropout)]
            cin = c
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(cin, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Logits [N] for normalised images [N,1,H,W]."""
        return self.out(self.body(image).mean(dim=(2, 3)))[:, 0]


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class QMapFusionNet(nn.Module):
    """``qmap/2``: K co-registered SE images (any non-empty subset present) -> PD, T1, T2.

    One image gives one equation per voxel for three unknowns; two or more images with
    different TE/TR make the maps determined.  A shared encoder (image only, so the
    identification head stays honest) runs on every input; at every level the features
    of each input are conditioned on that input's TE/TR (1x1 conv) and fused over the
    *present* inputs by masked mean and max, so any subset works and input order does
    not matter.  The decoder predicts T1, T2 and a denoised copy of the first present
    input; PD = c / E(TE_first, TR_first, T1, T2) is in the units of that input.
    """

    def __init__(self, cfg: ModelConfig | None = None, max_inputs: int = 4, gated: bool = False,
                 log_input: bool = False) -> None:
        super().__init__()
        self.cfg = cfg or ModelConfig()
        self.max_inputs = max_inputs
        self.gated = gated
        self.log_input = log_input
        w = self.cfg.widths
        self.enc = nn.ModuleList()
        cin = 2 if log_input else 1
        for c in w:
            self.enc.append(ConvBlock(cin, c))
            cin = c
        self.cond = nn.ModuleList([nn.Conv2d(c + 2, c, 1) for c in w])
        self.fuse = nn.ModuleList([nn.Sequential(nn.Conv2d(2 * c, c, 1), nn.ReLU(inplace=True)) for c in w])
        self.dec = nn.ModuleList()
        for i in range(len(w) - 2, -1, -1):
            self.dec.append(ConvBlock(w[i + 1] + w[i] + 2, w[i]))
        self.head = nn.Conv2d(w[0] + 1, 3, 1)
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():
            self.head.bias.copy_(torch.tensor([_unbound(1000.0, *T1_RANGE), _unbound(60.0, *T2_RANGE), 0.0]))
        self.id_head = nn.Sequential(nn.Linear(2 * w[-1], self.cfg.id_hidden), nn.ReLU(inplace=True),
                                     nn.Linear(self.cfg.id_hidden, 2))
        #: gated: a frozen qmap/1 network answers whenever exactly one input is present
        self.single: QMapNet | None = None
        if gated:
            self.single = QMapNet(self.cfg)
            self.single.requires_grad_(False)

    @property
    def options(self) -> dict[str, bool]:
        """Constructor switches beyond the ModelConfig (stored in checkpoints as ``fusion_options``)."""
        return {"gated": self.gated, "log_input": self.log_input}

    def train(self, mode: bool = True) -> "QMapFusionNet":
        """Keep the frozen single-input branch in eval mode (its BatchNorm statistics must not move)."""
        super().train(mode)
        if self.single is not None:
            self.single.eval()
        return self

    def forward(self, image: torch.Tensor, te_tr: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n, k, h, w_ = image.shape
        # one-hot of the first present input: present * (cumsum(present) == 1)
        first = present * (torch.cumsum(present, dim=1) == 1).to(present.dtype)  # [N,K]
        x = image.reshape(n * k, 1, h, w_)
        if self.log_input:
            # log intensities: the encoder can then form voxel-wise log ratios between inputs,
            # which is where T2 (TE pairs) and T1 (TR pairs) are written
            x = torch.cat([x, torch.log(x.clamp(min=0.0) + LOG_FLOOR)], dim=1)
        cond_all = norm_te_tr(te_tr.reshape(n * k, 2))[:, :, None, None]  # [N*K,2,1,1]
        pm = present.reshape(n, k, 1, 1, 1)
        npresent = present.sum(dim=1).clamp(min=1.0).reshape(n, 1, 1, 1)
        fused = []
        for i, blk in enumerate(self.enc):
            if i > 0:
                x = F.max_pool2d(x, 2)
            x = blk(x)
            hh, ww = x.shape[2], x.shape[3]
            fx = self.cond[i](torch.cat([x, cond_all.expand(-1, -1, hh, ww)], dim=1))
            fx = fx.reshape(n, k, fx.shape[1], hh, ww)
            mean = (fx * pm).sum(dim=1) / npresent
            mx = (fx + (pm - 1.0) * 1e4).amax(dim=1)
            fused.append(self.fuse[i](torch.cat([mean, mx], dim=1)))
        bott = x.reshape(n, k, x.shape[1], x.shape[2], x.shape[3])
        pooled = torch.cat([bott.mean(dim=(3, 4)), bott.amax(dim=(3, 4))], dim=2)  # [N,K,2C]
        idr = self.id_head(pooled)  # [N,K,2]
        idr = (idr * first[:, :, None]).sum(dim=1)
        te_tr_pred = torch.cat([_bounded(idr[:, 0:1], *TE_ID_RANGE), _bounded(idr[:, 1:2], *TR_ID_RANGE)], dim=1)
        te_tr0 = (te_tr * first[:, :, None]).sum(dim=1)  # [N,2]
        img0 = (image * first[:, :, None, None]).sum(dim=1, keepdim=True)  # [N,1,H,W]
        cond = norm_te_tr(te_tr0)[:, :, None, None]
        y = fused[-1]
        for j, blk in enumerate(self.dec):
            skip = fused[len(fused) - 2 - j]
            y = F.interpolate(y, size=skip.shape[2:], mode="bilinear", align_corners=False)
            y = blk(torch.cat([y, skip, cond.expand(-1, -1, skip.shape[2], skip.shape[3])], dim=1))
        out = self.head(torch.cat([y, img0], dim=1))
        t1 = _bounded(out[:, 0:1], *T1_RANGE)
        t2 = _bounded(out[:, 1:2], *T2_RANGE)
        clean = F.relu(img0 + out[:, 2:3])
        e = weighting(te_tr0[:, 0:1, None, None], te_tr0[:, 1:2, None, None], t1, t2, xp=torch).clamp(min=MIN_WEIGHTING)
        pd = clean / e
        if self.single is None:
            return pd, t1, t2, te_tr_pred
        # One input: the frozen qmap/1 answer, so the single-input case is the qmap/1 model
        # exactly (also its honest TE/TR identification); >= 2 inputs: the fused answer.
        s_pd, s_t1, s_t2, s_id = self.single(img0, te_tr0)
        multi = (present.sum(dim=1) > 1.5).reshape(n, 1, 1, 1)
        return (torch.where(multi, pd, s_pd), torch.where(multi, t1, s_t1), torch.where(multi, t2, s_t2), s_id)


def fusion_from_single(single_state: dict[str, torch.Tensor], cfg: ModelConfig, max_inputs: int,
                       gated: bool = False, log_input: bool = False,
                       fused_state: dict[str, torch.Tensor] | None = None) -> QMapFusionNet:
    """A ``qmap/2`` network that starts as a trained ``qmap/1`` network.

    Encoder, decoder, heads and identification head are copied; the new per-input
    conditioning convs start as identity on the features (zero on TE/TR) and the fusion
    convs as identity on the masked mean (zero on the max), so with one input present the
    fusion network computes exactly what the single-input network did.  Training then
    only has to learn how to use the extra inputs: it starts from the single-input
    quality instead of from scratch.

    ``gated``: the qmap/1 weights also become the frozen single-input branch.
    ``log_input``: the encoder's extra log-intensity channel starts at zero weight.
    ``fused_state``: a trained (ungated) fusion network's weights for the fused branch
    instead of the identity start, to continue from an earlier fusion run.
    """
    net = QMapFusionNet(cfg, max_inputs=max_inputs, gated=gated, log_input=log_input)
    own = net.state_dict()
    source = fused_state if fused_state is not None else single_state
    first_conv = "enc.0.0.weight"
    for k, v in source.items():
        if k.startswith("single."):
            continue
        if k == first_conv and log_input and v.shape[1] == 1:
            w = torch.zeros_like(own[k])
            w[:, :1] = v
            own[k] = w
        elif k in own:
            if own[k].shape != v.shape:
                raise ValueError(f"{k}: checkpoint shape {tuple(v.shape)} does not fit this network's "
                                 f"{tuple(own[k].shape)} (log_input / max_inputs / architecture differ)")
            own[k] = v.clone()
    if gated:
        for k, v in single_state.items():
            own["single." + k] = v.clone()
    net.load_state_dict(own)
    if fused_state is None:
        with torch.no_grad():
            for c, conv in zip(cfg.widths, net.cond):
                conv.weight.zero_()
                conv.bias.zero_()
                conv.weight[:, :c, 0, 0] = torch.eye(c)
            for c, seq in zip(cfg.widths, net.fuse):
                conv = seq[0]
                conv.weight.zero_()
                conv.bias.zero_()
                conv.weight[:, :c, 0, 0] = torch.eye(c)
    return net
