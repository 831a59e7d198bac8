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


def calibration_batch(n: int = 16, size: int = 128, seed: int = 4242, percentile: float = 99.0,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Phantom slices at the seed contrasts, normalised like the contract's input (series scale)."""
    from rtcontrast.core.contract import series_scale
    from rtcontrast.core.physics import SEED_CONTRASTS
    from rtcontrast.research import phantom

    rng = np.random.default_rng(seed)
    imgs, tts = [], []
    for k in range(n):
        te, tr = SEED_CONTRASTS[k % len(SEED_CONTRASTS)]
        maps = phantom.random_slice(seed + k, (size, size))
        img = phantom.acquire(maps, te, tr, rng).image.astype(np.float32)
        imgs.append(img / np.float32(series_scale(img, percentile)))
        tts.append((te, tr))
    return torch.from_numpy(np.stack(imgs)[:, None]), torch.tensor(tts, dtype=torch.float32)


def weights_from_onnx(onnx_path: str | Path, out: str | Path) -> dict[str, object]:
    """Rebuild a shipped ``qmap/1`` model's torch weights from its ONNX file and card, save them weights-only.

    So ``--init models/NAME.pt`` fine-tunes from a fresh clone although the training
    checkpoint is not in the repository.  Returns what goes into the card's ``weights``
    entry: file, sha256 and the parity of the rebuilt network against the ONNX model on
    other phantom slices (99.9th percentile of the relative difference of T1/T2).
    """
    import hashlib
    import json

    import onnxruntime as ort

    from rtcontrast.research.model import ModelConfig, QMapNet

    onnx_path, out = Path(onnx_path), Path(out)
    card = json.loads(onnx_path.with_suffix(".json").read_text())
    if card.get("contract", "qmap/1") != "qmap/1":
        raise ValueError(f"{onnx_path}: only qmap/1 models are rebuilt here (card says {card.get('contract')})")
    cfg = ModelConfig(**card["architecture"]["model_config"])
    net = QMapNet(cfg)
    load_from_onnx(net, onnx_path, calibration_batch())
    net.eval()
    img, tt = calibration_batch(n=10, seed=9090)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": img.numpy(), "te_tr": tt.numpy()})))
    with torch.no_grad():
        got = dict(zip(("pd", "t1", "t2", "te_tr_pred"), (t.numpy() for t in net(img, tt))))
    rel = max(float(np.percentile(np.abs(got[k] - ref[k]) / (np.abs(ref[k]) + 1.0), 99.9)) for k in ("t1", "t2"))
    torch.save({"model": net.state_dict(), "model_config": cfg.to_dict(), "contract": "qmap/1", "max_inputs": 1,
                "fusion_options": {}, "rebuilt_from": onnx_path.name}, out)
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    return {"file": out.name, "sha256": sha, "rebuilt_from_onnx": True, "parity_rel_p999_t1_t2": rel,
            "note": "weights-only (torch.load(weights_only=True)), rebuilt from the ONNX file by "
                    "rtcontrast.research.warmstart (BatchNorms re-derived on phantom slices); fine-tune with "
                    f"python -m rtcontrast.research.train --config ... --init models/{out.name}"}


def main(argv: list[str] | None = None) -> int:
    """``python -m rtcontrast.research.warmstart MODEL.onnx [--card]``: write MODEL.pt beside it."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m rtcontrast.research.warmstart", description=main.__doc__)
    ap.add_argument("onnx", type=Path)
    ap.add_argument("--card", action="store_true", help="record the weights (file, sha256, parity) in MODEL.json")
    a = ap.parse_args(argv)
    info = weights_from_onnx(a.onnx, a.onnx.with_suffix(".pt"))
    print(json.dumps(info, indent=2))
    if a.card:
        cp = a.onnx.with_suffix(".json")
        card = json.loads(cp.read_text())
        card["weights"] = info
        cp.write_text(json.dumps(card, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
