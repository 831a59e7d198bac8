"""A head phantom for evaluation only: anatomy the fusion model never saw in training.

Why: every shipped model is trained on the pelvis phantom (:mod:`rtcontrast.research.phantom`),
so an evaluation on that family cannot tell whether the fused maps come from the data or
from learned pelvic anatomy.  This family is written independently (layers by depth below a
random head outline instead of painted organs) and is never used by ``research.train``:
scalp fat, skull (cortical tables around fatty diploe/marrow), CSF (subarachnoid space and
ventricles), a gyrated grey-matter ribbon, white matter and a lesion, with a random shape
per seed and per-subject tissue values.

Relaxation values (PD relative to water; T1, T2 in ms; mean and per-subject sd), from
Gold et al. 2004, Stanisz et al. 2005, Wansapura et al. 1999, de Bazelaire et al. 2004 and
Bojorquez et al. 2017; the sd is the spread between those studies, not one study's error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from rtcontrast.research.phantom import Maps

LABELS: dict[str, int] = {"air": 0, "fat": 1, "bone": 2, "marrow": 3, "csf": 4, "gm": 5, "wm": 6, "lesion": 7,
                          "ventricle": 8}
LABEL_NAMES: dict[int, str] = {v: k for k, v in LABELS.items()}
#: Tissues whose map accuracy is reported (ventricles are CSF; bone has no signal).
MAJOR_TISSUES: tuple[str, ...] = ("fat", "marrow", "csf", "gm", "wm", "lesion")

#: (PD, T1 mean, T1 sd, T2 mean, T2 sd) at 1.5 T and 3 T.
TISSUES: dict[float, dict[str, tuple[float, float, float, float, float]]] = {
    1.5: {
        "fat": (0.90, 343.0, 30.0, 80.0, 8.0),
        "bone": (0.05, 300.0, 30.0, 2.0, 0.3),
        "marrow": (0.80, 500.0, 50.0, 55.0, 6.0),
        "csf": (1.00, 4000.0, 300.0, 1900.0, 300.0),
        "gm": (0.80, 1100.0, 80.0, 95.0, 8.0),
        "wm": (0.69, 700.0, 50.0, 80.0, 6.0),
        "lesion": (0.85, 1300.0, 150.0, 160.0, 30.0),
    },
    3.0: {
        "fat": (0.90, 382.0, 30.0, 68.0, 6.0),
        "bone": (0.05, 330.0, 30.0, 1.5, 0.3),
        "marrow": (0.80, 586.0, 60.0, 49.0, 5.0),
        "csf": (1.00, 4300.0, 300.0, 1700.0, 300.0),
        "gm": (0.80, 1550.0, 100.0, 85.0, 7.0),
        "wm": (0.69, 1000.0, 70.0, 70.0, 6.0),
        "lesion": (0.85, 1800.0, 200.0, 140.0, 25.0),
    },
}
#: Within-tissue texture (relative sd of a smooth field) for PD, T1, T2.
TEXTURE = (0.02, 0.03, 0.04)


@dataclass
class Head:
    """One synthetic head: outline, layer thicknesses (mm), ventricles, lesion and tissue values."""

    seed: int
    field_t: float
    semi_axes: tuple[float, float, float]  # x, y (in-plane) and z (mm)
    harmonics: np.ndarray  # [n, 2] amplitude, phase of the outline for k = 2, 3, ...
    layers: dict[str, float]  # thickness of fat, outer table, marrow, inner table, csf, gm (mm)
    gyri: tuple[int, float, float]  # angular frequency, depth amplitude (mm), phase
    ventricles: tuple[float, float, float, float]  # half-separation, semi-axes a, b (mm), angle
    lesion: tuple[float, float, float, float]  # x, y, z, radius (mm)
    values: dict[str, tuple[float, float, float]]


def make_head(seed: int, field_t: float | None = None) -> Head:
    """Draw one head deterministically from ``seed`` (1.5 or 3 T at random if ``field_t`` is None)."""
    rng = np.random.default_rng(seed)
    b0 = float(rng.choice([1.5, 3.0])) if field_t is None else float(field_t)
    table = TISSUES[1.5] if b0 < 2.25 else TISSUES[3.0]
    values = {}
    for name, (pd, t1, t1sd, t2, t2sd) in table.items():
        values[name] = (float(pd * rng.uniform(0.95, 1.05)), float(max(rng.normal(t1, t1sd), 0.5 * t1)),
                        float(max(rng.normal(t2, t2sd), 0.5 * t2)))
    n_h = 5
    harm = np.stack([rng.uniform(0, 0.05, n_h) / np.arange(1, n_h + 1), rng.uniform(0, 2 * np.pi, n_h)], axis=1)
    layers = {"fat": rng.uniform(3, 8), "outer": rng.uniform(1.5, 2.5), "marrow": rng.uniform(2, 5),
              "inner": rng.uniform(1.5, 2.5), "csf": rng.uniform(1.5, 4), "gm": rng.uniform(2.5, 4)}
    r = float(rng.uniform(12, 22))
    ang = float(rng.uniform(0, 2 * np.pi))
    return Head(seed=seed, field_t=b0, semi_axes=(float(rng.uniform(68, 80)), float(rng.uniform(85, 100)),
                                                  float(rng.uniform(70, 85))),
                harmonics=harm, layers=layers,
                gyri=(int(rng.integers(14, 24)), float(rng.uniform(1.5, 4)), float(rng.uniform(0, 2 * np.pi))),
                ventricles=(float(rng.uniform(4, 9)), float(rng.uniform(4, 9)), float(rng.uniform(14, 24)),
                            float(rng.normal(0, 0.1))),
                lesion=(r * np.cos(ang), r * np.sin(ang), float(rng.uniform(6, 14)), float(rng.uniform(7, 13))),
                values=values)


def _labels(h: Head, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    """Label map at (x, y, z) mm: layers by depth below the outline, then ventricles and lesion."""
    ax, ay, az = h.semi_axes
    s = np.sqrt(max(1.0 - (z / az) ** 2, 0.0))
    lab = np.zeros(x.shape, np.uint8)
    if s <= 0.05:
        return lab
    th = np.arctan2(y / ay, x / ax)
    pert = np.ones_like(th)
    for k, (amp, ph) in enumerate(h.harmonics, start=2):
        pert += amp * np.cos(k * th + ph)
    r_out = s * pert / np.sqrt((np.cos(th) / ax) ** 2 + (np.sin(th) / ay) ** 2)  # outline radius at angle th
    depth = r_out - np.hypot(x, y)  # mm below the surface (approximately normal for near-circular heads)
    inside = depth > 0
    lab[inside] = LABELS["wm"]
    edges = np.cumsum([h.layers[k] for k in ("fat", "outer", "marrow", "inner", "csf")])
    k_g, amp_g, ph_g = h.gyri
    gm_end = edges[-1] + h.layers["gm"] + amp_g * (1 + np.sin(k_g * th + ph_g))
    csf_end = edges[-1] + 0.6 * amp_g * np.maximum(np.sin(k_g * th + ph_g + np.pi), 0)  # sulci
    for name, lo, hi in (("fat", 0, edges[0]), ("bone", edges[0], edges[1]), ("marrow", edges[1], edges[2]),
                         ("bone", edges[2], edges[3]), ("csf", edges[3], csf_end), ("gm", csf_end, gm_end)):
        lab[inside & (depth >= lo) & (depth < hi)] = LABELS[name]
    sep, va, vb, vang = h.ventricles
    ca, sa = np.cos(vang), np.sin(vang)
    vs = max(1.0 - (z / 35.0) ** 2, 0.0)
    if vs > 0:
        for side in (-1, 1):
            xr = ((x - side * sep) * ca + y * sa) / (va * vs)
            yr = (-(x - side * sep) * sa + y * ca) / (vb * vs)
            lab[inside & (xr * xr + yr * yr < 1)] = LABELS["ventricle"]
    lx, ly, lz, lr = h.lesion
    rr = lr * lr - (z - lz) ** 2
    if rr > 0:
        lab[inside & ((x - lx) ** 2 + (y - ly) ** 2 < rr) & (lab == LABELS["wm"])] = LABELS["lesion"]
    return lab


def _smooth(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=max(shape) / 24)
    sd = float(f.std())
    return f / sd if sd > 0 else f


def render_slice(h: Head, z_mm: float, shape: tuple[int, int] = (128, 128), pixel_mm: float = 1.9,
                 supersample: int = 2) -> Maps:
    """Maps of the head at height ``z_mm``; partial volume as PD-weighted relaxation rates."""
    ss = supersample
    hh, ww = shape[0] * ss, shape[1] * ss
    ry = (np.arange(hh, dtype=np.float32) - hh / 2 + 0.5) * pixel_mm / ss
    rx = (np.arange(ww, dtype=np.float32) - ww / 2 + 0.5) * pixel_mm / ss
    x, y = np.meshgrid(rx, ry)
    lab = _labels(h, x, y, z_mm)
    rng = np.random.default_rng((h.seed * 104729 + round(z_mm * 10)) % 2**63)
    fields = [_smooth(rng, (hh, ww)) for _ in range(3)]
    pd = np.zeros((hh, ww), np.float32)
    r1 = np.zeros_like(pd)
    r2 = np.zeros_like(pd)
    for name, idx in LABELS.items():
        m = lab == idx
        if idx == 0 or not m.any():
            continue
        pdv, t1v, t2v = h.values["csf" if name == "ventricle" else name]
        pd[m] = pdv * (1 + TEXTURE[0] * fields[0][m])
        r1[m] = 1.0 / (t1v * (1 + TEXTURE[1] * fields[1][m]))
        r2[m] = 1.0 / (t2v * (1 + TEXTURE[2] * fields[2][m]))
    pd_l = pd.reshape(shape[0], ss, shape[1], ss).mean(axis=(1, 3))
    w = np.maximum(pd_l * ss * ss, 1e-12)
    r1_l = (pd * r1).reshape(shape[0], ss, shape[1], ss).sum(axis=(1, 3)) / w
    r2_l = (pd * r2).reshape(shape[0], ss, shape[1], ss).sum(axis=(1, 3)) / w
    ok = pd_l > 1e-4
    lab_l = lab[ss // 2:: ss, ss // 2:: ss]
    return Maps(pd=np.where(ok, pd_l, 0).astype(np.float32),
                t1=np.where(ok, 1.0 / np.maximum(r1_l, 1e-9), 0).astype(np.float32),
                t2=np.where(ok, 1.0 / np.maximum(r2_l, 1e-9), 0).astype(np.float32),
                labels=lab_l.astype(np.uint8), pixel_spacing=(pixel_mm, pixel_mm), field_t=h.field_t)


def volume(seed: int, n_slices: int = 4, shape: tuple[int, int] = (128, 128), pixel_mm: float = 1.9,
           slice_mm: float = 8.0, field_t: float | None = None) -> tuple[Maps, np.ndarray]:
    """A stack of axial slices through the ventricles; returns the maps [N,H,W] and the z positions (mm)."""
    h = make_head(seed, field_t)
    zs = (np.arange(n_slices) - (n_slices - 1) / 2) * slice_mm + 10.0
    sl = [render_slice(h, float(z), shape, pixel_mm) for z in zs]
    return Maps(pd=np.stack([s.pd for s in sl]), t1=np.stack([s.t1 for s in sl]), t2=np.stack([s.t2 for s in sl]),
                labels=np.stack([s.labels for s in sl]), pixel_spacing=(pixel_mm, pixel_mm), field_t=h.field_t), zs


def major_masks(maps: Maps) -> dict[str, np.ndarray]:
    """Eroded per-tissue masks of the reported tissues (CSF includes the ventricles)."""
    out = {}
    st = np.ones((1, 3, 3), bool)
    for t in MAJOR_TISSUES:
        m = maps.labels == LABELS[t]
        if t == "csf":
            m |= maps.labels == LABELS["ventricle"]
        out[t] = ndimage.binary_erosion(m, structure=st) if t not in ("fat", "marrow") else m
    return out


__all__ = ["LABELS", "MAJOR_TISSUES", "TISSUES", "Head", "major_masks", "make_head", "render_slice", "volume"]
