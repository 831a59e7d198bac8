"""Warm-start a torch network from an exported ONNX model of the same layout (training only).

Why: the shipped ``qmap-pelvis`` exists only as ONNX (its training checkpoints are not in
the repository), and training from scratch on two shared CPU cores buys a few hundred
steps.  Its convolutions are a good start for any spin-echo model of the same widths.

The exporter folds every BatchNorm into the convolution before it (W' = W * g / s,
b' = ...), so the ONNX file holds one (W', b') per convolution and no normalisation
statistics.  Loading: the ONNX ``Conv`` nodes, in graph order, are matched one to one with
the torch ``Conv2d`` layers in forward order (shapes checked); W' goes into the conv; a
torch layer with more input channels (e.g. the extra field-strength channel of ``qmap/3``)
gets zeros there, one with more output channels (the uncertainty channels of the head)
keeps its own initial rows.  Then every BatchNorm is calibrated on a real batch, layer by
layer in forward order: gamma = batch sd and beta = batch mean + b' of its input, running
statistics = the batch statistics, so the network computes W'x + b' again in training
*and* eval mode on that batch distribution.  Linear layers are copied by name.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

log = logging.getLogger("rtcontrast.research.warmstart")


def onnx_convs(path: str | Path) -> tuple[list[tuple[np.ndarray, np.ndarray | None]], dict[str, np.ndarray]]:
    """(weight, bias) of every Conv node in graph order, and all named initializers."""
    m = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    convs = []
    for node in m.graph.node:
        if node.op_type == "Conv":
            w = init[node.input[1]]
            b = init[node.input[2]] if len(node.input) > 2 and node.input[2] else None
            convs.append((w, b))
    return convs, init


def torch_convs(net: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]:
    """Every Conv2d in module order with the BatchNorm2d that follows it inside the same Sequential."""
    out: list[tuple[nn.Conv2d, nn.BatchNorm2d | None]] = []
    mods = list(net.modules())
    for i, m in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            out.append((m, nxt if isinstance(nxt, nn.BatchNorm2d) else None))
    return out


def load_from_onnx(net: nn.Module, path: str | Path, calib: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """Copy ``path``'s weights into ``net`` and calibrate its BatchNorms on the inputs ``calib``.

    Returns counts for the log and the model card.  Raises ValueError when the layouts do
    not match (different widths or depth).
    """
    convs, init = onnx_convs(path)
    tconvs = torch_convs(net)
    if len(convs) != len(tconvs):
        raise ValueError(f"{path}: {len(convs)} convolutions, the network has {len(tconvs)}")
    fused_bias: dict[nn.BatchNorm2d, torch.Tensor] = {}
    widened = 0
    with torch.no_grad():
        for k, ((w, b), (conv, bn)) in enumerate(zip(convs, tconvs)):
            tw = conv.weight
            o, i = w.shape[0], w.shape[1]
            if o > tw.shape[0] or i > tw.shape[1] or w.shape[2:] != tuple(tw.shape[2:]):
                raise ValueError(f"conv {k}: ONNX weight {w.shape} does not fit {tuple(tw.shape)}")
            if (o, i) != tuple(tw.shape[:2]):
                widened += 1
                if i < tw.shape[1]:
                    tw[:o, i:] = 0.0  # new inputs (e.g. the field channel) start without influence
            tw[:o, :i] = torch.from_numpy(np.array(w))
            bias = torch.from_numpy(np.array(b)) if b is not None else torch.zeros(o)
            if bn is not None:
                fused_bias[bn] = bias
            elif conv.bias is not None:
                conv.bias[:o] = bias
        copied = 0
        own = dict(net.named_parameters())
        for name, arr in init.items():
            if name in own and name.startswith("id_head") and tuple(own[name].shape) == arr.shape:
                own[name].copy_(torch.from_numpy(np.array(arr)))
                copied += 1
    _calibrate(net, [bn for _, bn in tconvs if bn is not None], fused_bias, calib)
    log.info("warm start from %s: %d convolutions (%d widened), %d linear tensors, %d BatchNorms calibrated",
             path, len(convs), widened, copied, len(fused_bias))
    return {"convolutions": len(convs), "widened": widened, "linear_tensors": copied, "batchnorms": len(fused_bias)}


def _calibrate(net: nn.Module, bns: list[nn.BatchNorm2d], fused_bias: dict[nn.BatchNorm2d, torch.Tensor],
               calib: tuple[torch.Tensor, ...]) -> None:
    """Per BatchNorm in forward order: make it output (input + fused bias) on the calibration batch."""
    was_training = net.training
    momenta = {bn: bn.momentum for bn in bns}
    net.train()
    for bn in bns:
        bn.momentum = 0.0  # forward passes must not move the statistics already set
    try:
        for bn in bns:
            seen: list[torch.Tensor] = []
            h = bn.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach()))
            with torch.no_grad():
                net(*calib)
            h.remove()
            x = seen[0]
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False)
            with torch.no_grad():
                bn.weight.copy_(torch.sqrt(var + bn.eps))
                bn.bias.copy_(mean + fused_bias[bn])
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
    finally:
        for bn, m in momenta.items():
            bn.momentum = m
        net.train(was_training)
