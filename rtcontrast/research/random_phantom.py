"""Random-geometry phantoms: label maps with no anatomy, tissue values from the broad prior (training only).

Why: if every training slice is a pelvis, "round dark thing in the middle = prostate"
is a cheaper rule than reading T1/T2 from the signal, and the network learns it (the
shipped qmap-pelvis 1.1.0 did: bright fluid on a brain T2w came out as fat).  Here the
geometry carries no information about the values: each class of a label map draws its
(PD, T1, T2) independently from :mod:`rtcontrast.research.tissue_prior`.

Geometry, one of (chosen per slice):
* ``field``   - K smooth random fields, label = argmax (organic, interleaved regions);
* ``blobs``   - random ellipses / super-ellipses painted over a background class;
* ``voronoi`` - cells of random seed points (sharp straight boundaries), optionally warped.
5-30 classes; random scale (feature size), orientation, a random body outline (air outside)
or a full field of view; smooth within-class texture; partial volume by 2x supersampling
(rates averaged PD-weighted, as in :mod:`rtcontrast.research.phantom`).  Deterministic from the seed.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from rtcontrast.research import tissue_prior
from rtcontrast.research.phantom import Maps

#: Label value of cortical bone (the same as the pelvis phantom's, which the losses exclude).
LABEL_BONE = 3
#: Classes are labelled LABEL_BASE + class index (0 = air / outside the body).
LABEL_BASE = 20
GEOMETRIES: tuple[str, ...] = ("field", "blobs", "voronoi")


def _smooth(rng: np.random.Generator, shape: tuple[int, int], feature_px: float) -> np.ndarray:
    """Zero-mean unit-sd random field with features of about ``feature_px`` pixels."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), max(feature_px / 2.5, 0.5), mode="wrap")
    f -= f.mean()
    sd = f.std()
    return f / sd if sd > 0 else f


def _grid(shape: tuple[int, int], angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in [-1, 1] rotated by ``angle``."""
    h, w = shape
    y, x = np.meshgrid(np.linspace(-1, 1, h, dtype=np.float32), np.linspace(-1, 1, w, dtype=np.float32), indexing="ij")
    c, s = np.cos(angle), np.sin(angle)
    return x * c - y * s, x * s + y * c


def label_map(rng: np.random.Generator, shape: tuple[int, int], n_classes: int, geometry: str) -> np.ndarray:
    """Class indices [H,W] in [0, n_classes) of the given geometry (every class present when it fits)."""
    h, w = shape
    feature = float(np.exp(rng.uniform(np.log(0.04), np.log(0.4)))) * max(h, w)  # feature size in pixels
    angle = float(rng.uniform(0, np.pi))
    if geometry == "field":
        aniso = rng.uniform(0.5, 2.0)
        fields = []
        for _ in range(n_classes):
            f = _smooth(rng, (h, int(max(4, w * aniso))), feature)
            fields.append(ndimage.zoom(f, (1.0, w / f.shape[1]), order=1)[:, :w] if f.shape[1] != w else f)
        lab = np.argmax(np.stack(fields), axis=0)
    elif geometry == "blobs":
        lab = np.zeros(shape, np.int64)
        n_blobs = int(rng.integers(n_classes, 3 * n_classes + 1))
        for i in range(n_blobs):
            x, y = _grid(shape, float(rng.uniform(0, np.pi)))
            cx, cy = rng.uniform(-1, 1, 2)
            a, b = np.exp(rng.uniform(np.log(0.03), np.log(0.5), 2)) * feature / max(h, w) * 4
            p = rng.uniform(1.5, 4.0)
            r = (np.abs((x - cx) / a) ** p + np.abs((y - cy) / b) ** p) ** (1 / p)
            r = r + 0.15 * _smooth(rng, shape, feature) * rng.uniform(0, 1)
            lab[r < 1] = 1 + (i % (n_classes - 1)) if n_classes > 1 else 0
    elif geometry == "voronoi":
        n_pts = int(rng.integers(n_classes, 4 * n_classes + 1))
        x, y = _grid(shape, angle)
        if rng.random() < 0.5:  # warped cells
            x = x + 0.1 * _smooth(rng, shape, feature)
            y = y + 0.1 * _smooth(rng, shape, feature)
        pts = rng.uniform(-1, 1, (n_pts, 2)).astype(np.float32)
        d = (x[None] - pts[:, 0, None, None]) ** 2 + (y[None] - pts[:, 1, None, None]) ** 2
        cell = np.argmin(d, axis=0)
        assign = np.concatenate([np.arange(n_classes), rng.integers(0, n_classes, max(0, n_pts - n_classes))])
        lab = assign[rng.permutation(n_pts)][cell]
    else:
        raise ValueError(f"unknown geometry {geometry!r}; one of {GEOMETRIES}")
    return lab.astype(np.int64)


def _body(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A random body outline (super-ellipse with a wobbly edge), or the whole field of view."""
    if rng.random() < 0.25:
        return np.ones(shape, bool)
    x, y = _grid(shape, float(rng.uniform(0, np.pi)))
    a, b = rng.uniform(0.45, 0.98, 2)
    p = rng.uniform(2.0, 3.5)
    r = (np.abs(x / a) ** p + np.abs(y / b) ** p) ** (1 / p)
    r = r + 0.06 * _smooth(rng, shape, max(shape) * 0.2)
    return r < 1


def random_maps(seed: int, shape: tuple[int, int] = (128, 128), field_t: float | None = None,
                n_classes: int | None = None, geometry: str | None = None, supersample: int = 2) -> Maps:
    """One random-geometry slice with ground-truth maps (``Maps.labels``: 0 air, 3 bone, 20+ classes)."""
    rng = np.random.default_rng([seed, 77])
    field = tissue_prior.random_field(rng) if field_t is None else float(field_t)
    k = int(rng.integers(5, 31)) if n_classes is None else int(n_classes)
    geo = GEOMETRIES[int(rng.integers(len(GEOMETRIES)))] if geometry is None else geometry
    hh, ww = shape[0] * supersample, shape[1] * supersample
    cls = label_map(rng, (hh, ww), k, geo)
    body = _body(rng, (hh, ww))
    values = [tissue_prior.draw_class(field, rng) for _ in range(k)]
    tex_amp = rng.uniform(0.0, 0.08, 3)
    feat = max(hh, ww) * rng.uniform(0.05, 0.3)
    tex = [_smooth(rng, (hh, ww), feat) for _ in range(3)]
    pd = np.zeros((hh, ww), np.float32)
    r1 = np.zeros_like(pd)
    r2 = np.zeros_like(pd)
    lab = np.zeros((hh, ww), np.uint8)
    for i, (name, (p, t1, t2)) in enumerate(values):
        m = (cls == i) & body
        if p == 0.0 or not m.any():
            continue
        pd[m] = p * (1 + tex_amp[0] * tex[0][m])
        r1[m] = 1.0 / (t1 * (1 + tex_amp[1] * tex[1][m]))
        r2[m] = 1.0 / (t2 * (1 + tex_amp[2] * tex[2][m]))
        lab[m] = LABEL_BONE if name == "cortical_bone" else LABEL_BASE + i
    pd = np.clip(pd, 0, None)
    return _downsample(pd, r1, r2, lab, supersample, field)


def _downsample(pd: np.ndarray, r1: np.ndarray, r2: np.ndarray, lab: np.ndarray, ss: int, field: float) -> Maps:
    """Partial volume: PD area-averaged, rates PD-weighted (how signals mix at short TE / long TR)."""
    hh, ww = pd.shape
    h, w = hh // ss, ww // ss
    pd_l = pd.reshape(h, ss, w, ss).mean(axis=(1, 3))
    wsum = np.maximum(pd_l * ss * ss, 1e-12)
    r1_l = (pd * r1).reshape(h, ss, w, ss).sum(axis=(1, 3)) / wsum
    r2_l = (pd * r2).reshape(h, ss, w, ss).sum(axis=(1, 3)) / wsum
    valid = pd_l > 1e-4
    t1 = np.where(valid, 1.0 / np.maximum(r1_l, 1e-9), 0.0).astype(np.float32)
    t2 = np.where(valid, 1.0 / np.maximum(r2_l, 1e-9), 0.0).astype(np.float32)
    return Maps(pd=np.where(valid, pd_l, 0.0).astype(np.float32), t1=t1, t2=t2,
                labels=lab[ss // 2 :: ss, ss // 2 :: ss].copy(), pixel_spacing=(1.0, 1.0), field_t=field)
