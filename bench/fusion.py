"""Fusion cost per slice: the node's fused path (#11: physics gains, canonical network order) against the 1.1 path.

Why: issue #11 allows the fusion path at most 2x the per-slice cost it had.  The 1.1 path was
the network, gains read from the network's T1/T2 (``consistency.input_gains``) and the per-slice
fit; the #11 path adds a once-per-volume gain search (a fixed voxel sample, so its share falls
with the volume's size) and the QA figures.  Usage: ``python bench/fusion.py [--slices 12] [--size 256]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rtcontrast.core.consistency import Settings, gain_tissue, input_gains, refine  # noqa: E402
from rtcontrast.core.contract import series_scale  # noqa: E402
from rtcontrast.core.inference import QMapModel  # noqa: E402
from rtcontrast.research import phantom  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
C = [(8.0, 400.0), (75.0, 4500.0), (8.0, 4500.0)]


def old_path(model: QMapModel, inputs: list[tuple[np.ndarray, float, float]]) -> None:
    """The 1.1 fused path: network with the target first, network-read gains, per-slice refine."""
    net = model.predict_multi(inputs)
    scales = [series_scale(p, model.info.input_percentile) for p, _, _ in inputs]
    img = np.stack([p / sc for (p, _, _), sc in zip(inputs, scales)]).astype(np.float32)
    tt = np.array([(te, tr) for _, te, tr in inputs])
    ok = np.ones(img.shape, bool)
    pd_n = net.pd / net.scale
    g = input_gains(img, tt, net.t1, net.t2, gain_tissue(img, ok, pd_n, net.t1, net.t2, Settings()), ok)
    for i in range(img.shape[1]):
        refine(img[:, i], tt, pd_n[i], net.t1[i], net.t2[i], Settings(), gains=g)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=12)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    model = QMapModel(REPO / "models" / "qmap-pelvis-fusion.onnx", "cpu")
    maps, _ = phantom.volume(5_000_001, n_slices=a.slices, shape=(a.size, a.size), pixel_mm=400.0 / a.size,
                             slice_mm=5.0, field_t=1.5)
    rng = np.random.default_rng(0)
    inputs = [(phantom.acquire(maps, te, tr, rng, snr=60, gain=g).image, te, tr) for (te, tr), g in zip(C, (700, 2500, 1400))]
    times: dict[str, list[float]] = {"network only": [], "1.1 fused": [], "#11 fused": []}
    for _ in range(a.repeats):  # interleaved, medians reported
        for name, fn in (("network only", lambda: model.predict_multi(inputs)),
                         ("1.1 fused", lambda: old_path(model, inputs)),
                         ("#11 fused", lambda: model.predict_multi(inputs, consistency=Settings(), field_t=1.5))):
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) / a.slices)
    med = {k: float(np.median(v)) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:14s} {1000 * v:8.1f} ms/slice")
    ratio = med["#11 fused"] / med["1.1 fused"]
    print(f"#11 / 1.1 fused: {ratio:.2f}x (target <= 2x) on {a.slices} slices of {a.size}x{a.size}")
    return 0 if ratio <= 2.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
