"""Warm-start a torch network from an exported ONNX model of the same layout (training only).

Why: the shipped ``qmap-pelvis`` exists only as ONNX (its training checkpoints are not in
the repository), and training from scratch on two shared CPU cores buys a few hundred
steps.  Its convolutions are a good start for any spin-echo model of the same widths.

The exporter folds every BatchNorm into the convolution before it (W' = W * g / s,
b' = ...), so the ONNX file holds one (W', b') per convolution and no normalisation
statistics.  Loading: each ONNX ``Conv`` node is matched with the torch ``Conv2d`` its scope
name names (``/single/enc.0/enc.0.0/Conv`` -> ``single.enc.0.0``), so a gated fusion network,
whose two branches the exporter writes in another order than torch lists them, loads too;
exports without scope names fall back to graph order against forward order (shapes
checked either way).  W' goes into the conv; a
torch layer with more input channels (e.g. the extra field-strength channel of ``qmap/3``)
gets zeros there, one with more output channels (the uncertainty channels of the head)
keeps its own initial rows.  Then every BatchNorm is calibrated on a real batch, layer by
layer in forward order: gamma = batch sd and beta = batch mean + b' of its input, running
statistics = the batch statistics, so the network computes W'x + b' again in training
*and* eval mode on that batch distribution.  Linear layers are copied by name.
"""

from __future__ import annotations

import json
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
    convs, init, _ = _onnx_convs_named(path)
    return convs, init


def _onnx_convs_named(path: str | Path) -> tuple[list[tuple[np.ndarray, np.ndarray | None]], dict[str, np.ndarray],
                                                 list[str | None]]:
    """As :func:`onnx_convs`, plus the torch module name each Conv node's scope names (None when it has none)."""
    m = onnx.load(str(path))
    init = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    convs, names = [], []
    for node in m.graph.node:
        if node.op_type == "Conv":
            w = init[node.input[1]]
            b = init[node.input[2]] if len(node.input) > 2 and node.input[2] else None
            convs.append((w, b))
            names.append(scope_module_name(node.name))
    return convs, init, names


def scope_module_name(node_name: str) -> str | None:
    """The torch module path in an exporter scope name: ``/single/enc.0/enc.0.0/Conv`` -> ``single.enc.0.0``.

    Each scope segment is a module name relative to its parent module; a segment that the
    next one extends (``enc.0`` before ``enc.0.0``) is a container already named by it.
    """
    parts = [p for p in node_name.split("/") if p]
    if len(parts) < 2:
        return None
    segs = parts[:-1]  # the last part is the op ("Conv", "Conv_1")
    kept = [a for a, b in zip(segs, segs[1:] + [""]) if not (b and b.startswith(a + "."))]
    return ".".join(kept)


def torch_convs(net: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]:
    """Every Conv2d in module order with the BatchNorm2d that follows it inside the same Sequential."""
    return [(c, bn) for _, c, bn in _torch_convs_named(net)]


def _torch_convs_named(net: nn.Module) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d | None]]:
    out: list[tuple[str, nn.Conv2d, nn.BatchNorm2d | None]] = []
    mods = list(net.named_modules())
    for i, (name, m) in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            nxt = mods[i + 1][1] if i + 1 < len(mods) else None
            out.append((name, m, nxt if isinstance(nxt, nn.BatchNorm2d) else None))
    return out


def _pair_convs(path: str | Path, net: nn.Module, convs: list, names: list[str | None],
                ) -> tuple[list[tuple[nn.Conv2d, nn.BatchNorm2d | None]], str]:
    """The torch (conv, bn) for each ONNX conv: by scope name when every name resolves, else by order."""
    named = _torch_convs_named(net)
    if len(convs) != len(named):
        raise ValueError(f"{path}: {len(convs)} convolutions, the network has {len(named)}")
    by_name = {n: (c, bn) for n, c, bn in named}
    if all(n in by_name for n in names) and len(set(names)) == len(names):
        return [by_name[n] for n in names], "scope name"  # type: ignore[index]
    return [(c, bn) for _, c, bn in named], "order"


def load_from_onnx(net: nn.Module, path: str | Path, calib: tuple[torch.Tensor, ...]) -> dict[str, int]:
    """Copy ``path``'s weights into ``net`` and calibrate its BatchNorms on the inputs ``calib``.

    Returns counts for the log and the model card.  Raises ValueError when the layouts do
    not match (different widths or depth).
    """
    convs, init, names = _onnx_convs_named(path)
    tconvs, matched_by = _pair_convs(path, net, convs, names)
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
            if name in own and "id_head" in name.split(".") and tuple(own[name].shape) == arr.shape:
                own[name].copy_(torch.from_numpy(np.array(arr)))
                copied += 1
    _calibrate(net, [bn for _, bn in tconvs if bn is not None], fused_bias, calib)
    log.info("warm start from %s: %d convolutions matched by %s (%d widened), %d linear tensors, %d BatchNorms "
             "calibrated", path, len(convs), matched_by, widened, copied, len(fused_bias))
    return {"convolutions": len(convs), "matched_by": matched_by, "widened": widened, "linear_tensors": copied,
            "batchnorms": len(fused_bias)}


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


def fusion_calibration_batch(k: int, n: int = 16, size: int = 128, seed: int = 4242, percentile: float = 99.0,
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``qmap/2`` inputs: each phantom slice at ``k`` seed contrasts, 1..k of them present (absent slots zero).

    The node fills absent slots with zeros (core.inference); the mix of counts exercises
    both branches of a gated network.
    """
    from rtcontrast.core.contract import series_scale
    from rtcontrast.core.physics import SEED_CONTRASTS
    from rtcontrast.research import phantom

    rng = np.random.default_rng(seed)
    img = np.zeros((n, k, size, size), np.float32)
    tt = np.zeros((n, k, 2), np.float32)
    present = np.zeros((n, k), np.float32)
    for i in range(n):
        maps = phantom.random_slice(seed + i, (size, size))
        m = 1 + i % k
        for j in range(m):
            te, tr = SEED_CONTRASTS[(i + 2 * j) % len(SEED_CONTRASTS)]
            x = phantom.acquire(maps, te, tr, rng).image.astype(np.float32)
            img[i, j] = x / np.float32(series_scale(x, percentile))
            tt[i, j] = (te, tr)
            present[i, j] = 1.0
    return torch.from_numpy(img), torch.from_numpy(tt), torch.from_numpy(present)


def _rebuild(card: dict, onnx_path: Path) -> tuple[nn.Module, dict[str, object], tuple[torch.Tensor, ...],
                                                   dict[str, np.ndarray]]:
    """The torch network a card describes, loaded from its ONNX file; its checkpoint header; test inputs."""
    from rtcontrast.research.model import ModelConfig, QMapFusionNet, QMapNet

    contract = card.get("contract", "qmap/1")
    cfg = ModelConfig(**card["architecture"]["model_config"])
    if contract == "qmap/1":
        net: nn.Module = QMapNet(cfg)
        load_from_onnx(net, onnx_path, calibration_batch())
        img, tt = calibration_batch(n=10, seed=9090)
        header: dict[str, object] = {"contract": "qmap/1", "max_inputs": 1, "fusion_options": {}}
        return net, header, (img, tt), {"image": img.numpy(), "te_tr": tt.numpy()}
    if contract == "qmap/2":
        opts = dict(card["architecture"].get("fusion_options", {}))
        k = int(card["metadata"]["max_inputs"])
        net = QMapFusionNet(cfg, max_inputs=k, gated=bool(opts.get("gated")), log_input=bool(opts.get("log_input")))
        load_from_onnx(net, onnx_path, fusion_calibration_batch(k))
        args = fusion_calibration_batch(k, n=2 * k + 2, seed=9090)
        header = {"contract": "qmap/2", "max_inputs": k, "fusion_options": dict(net.options)}
        return net, header, args, dict(zip(("image", "te_tr", "present"), (t.numpy() for t in args)))
    raise ValueError(f"{onnx_path}: only qmap/1 and qmap/2 models are rebuilt here (card says {contract})")


def weights_from_onnx(onnx_path: str | Path, out: str | Path) -> dict[str, object]:
    """Rebuild a shipped model's torch weights from its ONNX file and card, save them weights-only.

    So ``--init models/NAME.pt`` fine-tunes from a fresh clone although the training
    checkpoint is not in the repository (``qmap/1`` and ``qmap/2``, gated or not).  Returns
    what goes into the card's ``weights`` entry: file, sha256 and the parity of the rebuilt
    network against the ONNX model on other phantom slices (99.9th percentile of the
    relative difference of T1/T2).
    """
    import hashlib

    import onnxruntime as ort

    onnx_path, out = Path(onnx_path), Path(out)
    card = json.loads(onnx_path.with_suffix(".json").read_text())
    net, header, args, feeds = _rebuild(card, onnx_path)
    net.eval()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    with torch.no_grad():
        got = dict(zip(("pd", "t1", "t2", "te_tr_pred"), (t.numpy() for t in net(*args))))
    rel = max(float(np.percentile(np.abs(got[k] - ref[k]) / (np.abs(ref[k]) + 1.0), 99.9)) for k in ("t1", "t2"))
    torch.save({"model": net.state_dict(), "model_config": card["architecture"]["model_config"], **header,
                "rebuilt_from": onnx_path.name}, out)
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    unused = ("; the fused branch's identification head is not in the ONNX graph (a gated network answers "
              "identification from its single-input branch) and keeps its initial weights"
              if header["fusion_options"] and header["fusion_options"].get("gated") else "")  # type: ignore[union-attr]
    return {"file": out.name, "sha256": sha, "rebuilt_from_onnx": True, "parity_rel_p999_t1_t2": rel,
            "note": "weights-only (torch.load(weights_only=True)), rebuilt from the ONNX file by "
                    "rtcontrast.research.warmstart (BatchNorms re-derived on phantom slices" + unused + "); "
                    f"fine-tune with python -m rtcontrast.research.train --config ... --init models/{out.name}"}


def main(argv: list[str] | None = None) -> int:
    """``python -m rtcontrast.research.warmstart MODEL.onnx [--card]``: write MODEL.pt beside it."""
    import argparse

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
