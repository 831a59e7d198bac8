"""Axial head phantoms with known PD/T1/T2 maps, for evaluation only (never imported by training).

An anatomy unlike the pelvis: a thin skull (scalp, fat, outer table, diploe, inner table),
a CSF rim, a folded grey-matter ribbon with sulci, white matter, lateral ventricles, deep
grey nuclei, an interhemispheric fissure and optional white-matter lesions.  Written from
scratch (own polar geometry, own value table) so that nothing of the training generators
leaks into it.  Relaxation values: literature means of adult brain (1.5 T and 3 T; e.g.
Wansapura 1999, Stanisz 2005, Gelman 1999) with per-subject spreads.  numpy + scipy only.

``LABELS`` names the structures; :data:`MAJOR` are the tissues the evaluation reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

LABELS: dict[str, int] = {"air": 0, "scalp": 1, "fat": 2, "bone": 3, "diploe": 4, "csf": 5, "grey_matter": 6,
                          "white_matter": 7, "deep_grey": 8, "lesion": 9}
MAJOR: tuple[str, ...] = ("grey_matter", "white_matter", "csf", "deep_grey")

#: (PD, T1 at 1.5 T, T1 at 3 T, T2 at 1.5 T, T2 at 3 T) in ms; per-subject spread 6 % T1, 8 % T2.
VALUES: dict[str, tuple[float, float, float, float, float]] = {
    "scalp": (0.75, 900.0, 1250.0, 45.0, 38.0),
    "fat": (0.90, 270.0, 380.0, 85.0, 70.0),
    "bone": (0.03, 250.0, 300.0, 1.5, 1.2),
    "diploe": (0.75, 560.0, 620.0, 55.0, 50.0),
    "csf": (1.00, 4100.0, 4300.0, 1900.0, 1750.0),
    "grey_matter": (0.80, 1120.0, 1600.0, 95.0, 85.0),
    "white_matter": (0.70, 680.0, 950.0, 75.0, 68.0),
    "deep_grey": (0.78, 1000.0, 1300.0, 85.0, 72.0),
    "lesion": (0.85, 1150.0, 1500.0, 140.0, 120.0),
}


@dataclass
class HeadMaps:
    """Ground truth of one head volume: arrays [N,H,W]; PD relative to water, T1/T2 in ms."""

    pd: np.ndarray
    t1: np.ndarray
    t2: np.ndarray
    labels: np.ndarray
    field_t: float


def _values(rng: np.random.Generator, field_t: float) -> dict[str, tuple[float, float, float]]:
    x = np.log(field_t / 1.5) / np.log(2.0)
    out = {}
    for k, (pd, a15, a3, b15, b3) in VALUES.items():
        t1 = a15 * (a3 / a15) ** x * np.exp(rng.normal(0, 0.06))
        t2 = b15 * (b3 / b15) ** x * np.exp(rng.normal(0, 0.08))
        out[k] = (float(pd * np.exp(rng.normal(0, 0.03))), float(t1), float(t2))
    return out


def _head_labels(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, z: float, geo: dict) -> np.ndarray:
    """Label map on coordinates (mm) at height z (mm, 0 = level of the ventricles' bodies)."""
    shrink = np.sqrt(max(1.0 - (z / geo["zr"]) ** 2, 0.05))
    th = np.arctan2(y, x)
    outline = 1.0 + sum(a * np.cos(k * th + p) for k, (a, p) in enumerate(geo["harm"], start=2))
    rho = np.sqrt((x / (geo["a"] * shrink)) ** 2 + (y / (geo["b"] * shrink)) ** 2) / outline
    lab = np.zeros(x.shape, np.uint8)
    mm = 1.0 / (geo["a"] * shrink)  # one mm in rho units (approximately)
    layers = [("scalp", 1.0), ("fat", 1.0 - geo["skin"] * mm), ("bone", 1.0 - (geo["skin"] + geo["fat"]) * mm),
              ("diploe", 1.0 - (geo["skin"] + geo["fat"] + geo["table"]) * mm),
              ("bone", 1.0 - (geo["skin"] + geo["fat"] + geo["table"] + geo["diploe"]) * mm),
              ("csf", 1.0 - (geo["skin"] + geo["fat"] + 2 * geo["table"] + geo["diploe"]) * mm)]
    for name, r in layers:
        lab[rho < r] = LABELS[name]
    brain = 1.0 - (geo["skin"] + geo["fat"] + 2 * geo["table"] + geo["diploe"] + geo["csf"]) * mm
    # gyri: the grey/white boundary dips by the sulcal depth between gyral crowns
    wave = np.abs(np.sin(geo["gyri"] * th / 2 + geo["gphase"] + 0.4 * np.sin(3 * th + geo["gphase"])))
    wm_r = brain - (geo["cortex"] + geo["sulcus"] * (1 - wave) ** 1.5) * mm
    lab[rho < brain] = LABELS["grey_matter"]
    lab[rho < wm_r] = LABELS["white_matter"]
    sulcus = (wave < geo["sulc_w"]) & (rho < brain) & (rho > wm_r - 1.0 * mm)
    lab[sulcus] = LABELS["csf"]
    fissure = (np.abs(x) < geo["fissure"]) & (rho < brain) & (np.abs(y) > geo["b"] * shrink * 0.35)
    lab[fissure] = LABELS["csf"]
    # deep grey nuclei and lateral ventricles (depend on the level)
    zf = np.exp(-((z - geo["zv"]) / 25.0) ** 2)
    for side in (-1, 1):
        cx = side * geo["thal_x"]
        if zf > 0.2:
            d = ((x - cx) / (geo["thal_a"] * zf)) ** 2 + ((y - geo["thal_y"]) / (geo["thal_b"] * zf)) ** 2
            lab[d < 1] = LABELS["deep_grey"]
            d = ((x - side * geo["caud_x"]) / (7 * zf)) ** 2 + ((y + geo["caud_y"]) / (11 * zf)) ** 2
            lab[d < 1] = LABELS["deep_grey"]
        vx = side * geo["vent_x"]
        rot = side * geo["vent_rot"]
        xr = (x - vx) * np.cos(rot) + (y - geo["vent_y"]) * np.sin(rot)
        yr = -(x - vx) * np.sin(rot) + (y - geo["vent_y"]) * np.cos(rot)
        d = (xr / (geo["vent_a"] * max(zf, 0.15))) ** 2 + (yr / geo["vent_b"]) ** 2
        lab[(d < 1) & (rho < wm_r)] = LABELS["csf"]
    for cx, cy, cz, r in geo["lesions"]:
        if abs(z - cz) < r:
            rr = r * np.sqrt(1 - ((z - cz) / r) ** 2)
            m = ((x - cx) ** 2 + (y - cy) ** 2 < rr**2) & (lab == LABELS["white_matter"])
            lab[m] = LABELS["lesion"]
    return lab


def head_volume(seed: int, n_slices: int = 4, shape: tuple[int, int] = (256, 256), pixel_mm: float = 0.9,
                slice_mm: float = 8.0, field_t: float = 1.5, supersample: int = 2) -> HeadMaps:
    """A head volume of ``n_slices`` axial slices around the ventricles; deterministic from ``seed``."""
    rng = np.random.default_rng([seed, 31337])
    s = rng.uniform(0.9, 1.1)
    geo = {
        "a": rng.uniform(66, 76) * s, "b": rng.uniform(86, 98) * s, "zr": 90.0,
        "harm": [(rng.normal(0, 0.03 / k), rng.uniform(0, 2 * np.pi)) for k in range(2, 6)],
        "skin": rng.uniform(2, 4), "fat": rng.uniform(1.5, 4), "table": rng.uniform(1.5, 2.5), "diploe": rng.uniform(2, 5),
        "csf": rng.uniform(1.5, 3.5), "cortex": rng.uniform(4.0, 6.0), "sulcus": rng.uniform(10, 18),
        "sulc_w": rng.uniform(0.06, 0.12), "gyri": int(rng.integers(22, 34)), "gphase": rng.uniform(0, 2 * np.pi),
        "fissure": rng.uniform(0.8, 1.6), "zv": rng.uniform(-10, 10),
        "thal_x": rng.uniform(9, 13), "thal_y": rng.uniform(8, 16), "thal_a": rng.uniform(8, 11), "thal_b": rng.uniform(11, 15),
        "caud_x": rng.uniform(12, 16), "caud_y": rng.uniform(12, 20),
        "vent_x": rng.uniform(5, 9), "vent_y": rng.uniform(-8, 4), "vent_a": rng.uniform(3, 9), "vent_b": rng.uniform(18, 30),
        "vent_rot": rng.uniform(-0.2, 0.3),
        "lesions": [(rng.uniform(-45, 45), rng.uniform(-55, 55), rng.uniform(-20, 20), rng.uniform(2, 6))
                    for _ in range(int(rng.integers(0, 6)))],
    }
    vals = _values(rng, field_t)
    h, w = shape
    ss = supersample
    ys = (np.arange(h * ss) - h * ss / 2 + 0.5) * pixel_mm / ss
    xs = (np.arange(w * ss) - w * ss / 2 + 0.5) * pixel_mm / ss
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    ang = rng.normal(0, 0.08)
    x = xx * np.cos(ang) - yy * np.sin(ang) + rng.normal(0, 4)
    y = xx * np.sin(ang) + yy * np.cos(ang) + rng.normal(0, 4)
    zs = (np.arange(n_slices) - (n_slices - 1) / 2) * slice_mm + geo["zv"]
    tex = [ndimage.gaussian_filter(rng.standard_normal((h * ss, w * ss)), 5.0) for _ in range(3)]
    tex = [t / max(t.std(), 1e-9) for t in tex]
    out = {k: np.zeros((n_slices, h, w), np.float32) for k in ("pd", "t1", "t2")}
    labs = np.zeros((n_slices, h, w), np.uint8)
    for i, z in enumerate(zs):
        lab = _head_labels(rng, x, y, float(z), geo)
        pd = np.zeros(lab.shape, np.float64)
        r1 = np.zeros_like(pd)
        r2 = np.zeros_like(pd)
        for name, idx in LABELS.items():
            m = lab == idx
            if idx == 0 or not m.any():
                continue
            p, t1, t2 = vals[name]
            pd[m] = p * (1 + 0.02 * tex[0][m])
            r1[m] = 1.0 / (t1 * (1 + 0.03 * tex[1][m]))
            r2[m] = 1.0 / (t2 * (1 + 0.04 * tex[2][m]))
        pdl = pd.reshape(h, ss, w, ss).mean(axis=(1, 3))
        wsum = np.maximum(pdl * ss * ss, 1e-12)
        r1l = (pd * r1).reshape(h, ss, w, ss).sum(axis=(1, 3)) / wsum
        r2l = (pd * r2).reshape(h, ss, w, ss).sum(axis=(1, 3)) / wsum
        ok = pdl > 1e-4
        out["pd"][i] = np.where(ok, pdl, 0)
        out["t1"][i] = np.where(ok, 1 / np.maximum(r1l, 1e-9), 0)
        out["t2"][i] = np.where(ok, 1 / np.maximum(r2l, 1e-9), 0)
        labs[i] = lab[ss // 2 :: ss, ss // 2 :: ss]
    return HeadMaps(out["pd"], out["t1"], out["t2"], labs, float(field_t))
