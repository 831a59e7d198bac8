"""Upper-abdomen phantoms (training only): a second anatomy beside the pelvis.

Why: with one anatomy plus random geometry the network still sees "a body" of one kind
only.  An axial upper-abdomen slice has other organs at other places (liver, spleen,
kidneys, vertebra, aorta, bowel) and other values (liver T1 short, spleen/kidney long),
so the position-to-value shortcuts of the pelvis do not transfer.  Values come from
:mod:`rtcontrast.research.tissue_prior` (per subject, at its field strength); shapes are
:class:`rtcontrast.research.phantom.Shape` with random size, position, rotation and outline.
Deterministic from the seed.
"""

from __future__ import annotations

import numpy as np

from rtcontrast.research import tissue_prior
from rtcontrast.research.phantom import Maps, Shape, _harm
from rtcontrast.research.random_phantom import LABEL_BONE, _downsample

#: Label of each painted structure (0 = air, 3 = cortical bone as in the pelvis phantom).
ABDOMEN_LABELS: dict[str, int] = {"air": 0, "fat": 40, "muscle": 41, "cortical_bone": LABEL_BONE, "marrow": 42,
                                  "liver": 43, "spleen": 44, "kidney": 45, "kidney_medulla": 46, "blood": 47,
                                  "bowel": 48, "gas": 49, "cyst": 50}
#: Structure -> prior tissue whose values it draws.
_PRIOR = {"kidney_medulla": "kidney", "bowel": "glandular", "gas": "air"}


def abdomen_maps(seed: int, shape: tuple[int, int] = (128, 128), field_t: float | None = None,
                 supersample: int = 2) -> Maps:
    """One axial upper-abdomen slice with ground-truth maps at a random field of view."""
    rng = np.random.default_rng([seed, 4141])
    field = tissue_prior.random_field(rng) if field_t is None else float(field_t)
    vals = {}
    for name in ABDOMEN_LABELS:
        vals[name] = tissue_prior.draw(_PRIOR.get(name, name), field, rng)
    if rng.random() < 0.5:  # medulla: longer T1 than cortex
        p, t1, t2 = vals["kidney_medulla"]
        vals["kidney_medulla"] = (p, t1 * rng.uniform(1.1, 1.4), t2 * rng.uniform(0.9, 1.3))
    s = rng.uniform(0.8, 1.25)
    ax, ay = rng.uniform(140, 190) * s, rng.uniform(100, 140) * s
    fat_t = rng.uniform(8, 35) * s
    parts: list[tuple[str, Shape]] = [
        ("fat", Shape(0, 0, 0, ax, ay, 1e4, rng.normal(0, 0.05), rng.uniform(2.0, 2.8), _harm(rng, 5, 0.1))),
        ("muscle", Shape(0, rng.normal(0, 3), 0, ax - fat_t, ay - fat_t, 1e4, 0, rng.uniform(2.0, 2.6), _harm(rng, 4, 0.08))),
        ("fat", Shape(0, rng.normal(0, 5), 0, ax - fat_t - rng.uniform(8, 20), ay - fat_t - rng.uniform(8, 20), 1e4, 0, 2.0,
                      _harm(rng, 4, 0.1))),
    ]
    liver = Shape(-rng.uniform(30, 70) * s, -rng.uniform(0, 30) * s, 0, rng.uniform(60, 100) * s, rng.uniform(50, 85) * s,
                  1e4, rng.normal(0, 0.3), rng.uniform(2.0, 2.6), _harm(rng, 4, 0.15))
    parts.append(("liver", liver))
    parts.append(("spleen", Shape(rng.uniform(60, 100) * s, rng.uniform(0, 40) * s, 0, rng.uniform(20, 40) * s,
                                  rng.uniform(30, 50) * s, 1e4, rng.uniform(0.3, 1.2), 2.0, _harm(rng, 3, 0.15))))
    for _ in range(int(rng.integers(2, 7))):
        parts.append(("bowel", Shape(rng.uniform(-40, 80) * s, rng.uniform(-70, 0) * s, 0, rng.uniform(8, 22) * s,
                                     rng.uniform(6, 18) * s, 1e4, rng.uniform(0, np.pi), 2.0, _harm(rng, 3, 0.2))))
        if rng.random() < 0.4:
            b = parts[-1][1]
            parts.append(("gas", Shape(b.cx, b.cy, 0, b.a * 0.5, b.b * 0.5, 1e4, b.angle)))
    spine_y = ay * rng.uniform(0.45, 0.65)
    for side in (-1, 1):
        kx, ky = side * rng.uniform(45, 70) * s, spine_y - rng.uniform(10, 30) * s
        ka, kb = rng.uniform(20, 30) * s, rng.uniform(28, 40) * s
        ang = side * rng.uniform(0.2, 0.7)
        parts.append(("kidney", Shape(kx, ky, 0, ka, kb, 1e4, ang, 2.0, _harm(rng, 3, 0.1))))
        parts.append(("kidney_medulla", Shape(kx, ky, 0, ka * 0.55, kb * 0.6, 1e4, ang)))
        if rng.random() < 0.2:
            parts.append(("cyst", Shape(kx + rng.normal(0, 8), ky + rng.normal(0, 8), 0, *(rng.uniform(4, 12, 2)), 1e4)))
    vr = rng.uniform(16, 24) * s
    parts.append(("cortical_bone", Shape(rng.normal(0, 3), spine_y, 0, vr, vr * rng.uniform(0.8, 1.0), 1e4)))
    parts.append(("marrow", Shape(parts[-1][1].cx, spine_y, 0, vr - rng.uniform(2, 4), vr * 0.8 - rng.uniform(2, 4), 1e4)))
    for side in (-1, 1):  # paraspinal muscles
        parts.append(("muscle", Shape(side * vr * 1.9, spine_y + vr * 0.6, 0, rng.uniform(18, 28) * s,
                                      rng.uniform(14, 22) * s, 1e4, rng.normal(0, 0.2))))
    parts.append(("blood", Shape(rng.uniform(-5, 20), spine_y - vr - rng.uniform(8, 15), 0, *(rng.uniform(8, 14, 1).repeat(2)),
                                 1e4)))
    parts.append(("blood", Shape(-rng.uniform(15, 30), spine_y - vr - rng.uniform(5, 15), 0, rng.uniform(8, 14),
                                 rng.uniform(6, 12), 1e4)))

    h, w = shape
    ss = supersample
    hh, ww = h * ss, w * ss
    fov = rng.uniform(300, 480)
    px = fov / max(h, w) / ss
    cx0, cy0 = rng.normal(0, 15, 2)
    yy, xx = np.meshgrid((np.arange(hh) - hh / 2 + 0.5) * px + cy0, (np.arange(ww) - ww / 2 + 0.5) * px + cx0,
                         indexing="ij")
    th = rng.normal(0, 0.1)
    x = (xx * np.cos(th) - yy * np.sin(th)).astype(np.float32)
    y = (xx * np.sin(th) + yy * np.cos(th)).astype(np.float32)
    if rng.random() < 0.5:
        x = -x
    lab = np.zeros((hh, ww), np.uint8)
    for name, sh in parts:
        lab[sh.rho(x, y, 0.0) < 1] = ABDOMEN_LABELS[name]
    lab[parts[0][1].rho(x, y, 0.0) >= 1] = 0
    pd = np.zeros((hh, ww), np.float32)
    r1 = np.zeros_like(pd)
    r2 = np.zeros_like(pd)
    tex = rng.standard_normal((3, hh, ww)).astype(np.float32)
    from scipy import ndimage

    tex = np.stack([ndimage.gaussian_filter(t, 6.0) for t in tex])
    tex /= np.maximum(tex.std(axis=(1, 2), keepdims=True), 1e-6)
    for name, idx in ABDOMEN_LABELS.items():
        m = lab == idx
        p, t1, t2 = vals[name]
        if p == 0.0 or not m.any():
            continue
        pd[m] = p * (1 + 0.03 * tex[0][m])
        r1[m] = 1.0 / (t1 * (1 + 0.04 * tex[1][m]))
        r2[m] = 1.0 / (t2 * (1 + 0.05 * tex[2][m]))
    return _downsample(np.clip(pd, 0, None), r1, r2, lab, ss, field)
