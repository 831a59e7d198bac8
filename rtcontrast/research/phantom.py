"""Male-pelvis phantoms with known PD, T1 and T2 maps (2D slices and 3D volumes).

Real pelvic data with ground-truth maps does not exist, so the model learns from these.
It is judged on anatomies it has never seen, so everything that a template could leak
is randomised per subject: body size and shape (Fourier-perturbed super-ellipses), organ
positions, sizes and orientations, bladder filling, rectal gas, an optional prostate
lesion, relaxation values drawn around literature means at 1.5 T or 3 T with widened
spreads, smooth within-tissue texture, partial volume (2x supersampling), and, at
acquisition time, a receive-bias field, an arbitrary scanner gain and Rician noise.

Coordinates are patient-based in mm: x to the patient's left (image columns), y
posterior (image rows), z superior.  A subject is a set of 3D implicit shapes, so a 2D
slice is the 3D subject evaluated at one z, and a volume is a stack of slices.

Everything is deterministic from the seed.  numpy + scipy only (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from rtcontrast.core.physics import signal

# Tissue labels (0 = outside the body / air).
LABELS: dict[str, int] = {
    "air": 0,
    "fat": 1,
    "muscle": 2,
    "cortical_bone": 3,
    "marrow": 4,
    "bladder_wall": 5,
    "urine": 6,
    "prostate": 7,
    "lesion": 8,
    "seminal_vesicle": 9,
    "rectal_wall": 10,
    "rectal_content": 11,
    "gas": 12,
    "blood": 13,
}
LABEL_NAMES: dict[int, str] = {v: k for k, v in LABELS.items()}

#: Tissues whose map accuracy is reported ("major tissues").
MAJOR_TISSUES: tuple[str, ...] = ("fat", "muscle", "marrow", "urine", "prostate", "rectal_wall")

# Relaxation at 3.0 T: (PD, T1 mean, T1 sd, T2 mean, T2 sd) in ms; PD relative to water.
# de Bazelaire 2004 / Stanisz 2005 / seed-paper.md.  Spreads are widened (>= 6 % T1,
# >= 8 % T2) on purpose: scanners, sequences and subjects differ more than one study shows.
TISSUES_3T: dict[str, tuple[float, float, float, float, float]] = {
    "fat": (0.90, 382.0, 30.0, 68.0, 6.0),
    "muscle": (0.72, 1100.0, 200.0, 36.0, 8.0),
    "cortical_bone": (0.04, 1000.0, 200.0, 2.0, 0.5),
    "marrow": (0.78, 586.0, 73.0, 49.0, 5.0),
    "bladder_wall": (0.75, 1200.0, 150.0, 45.0, 6.0),
    "urine": (0.98, 3800.0, 500.0, 1500.0, 350.0),
    "prostate": (0.82, 1597.0, 110.0, 74.0, 9.0),
    "lesion": (0.82, 1400.0, 120.0, 52.0, 8.0),
    "seminal_vesicle": (0.90, 2000.0, 250.0, 180.0, 40.0),
    "rectal_wall": (0.74, 1150.0, 130.0, 48.0, 6.0),
    "rectal_content": (0.60, 1100.0, 300.0, 70.0, 25.0),
    "gas": (0.0, 0.0, 0.0, 0.0, 0.0),
    "blood": (0.85, 1932.0, 150.0, 250.0, 60.0),
}
#: Within-tissue texture amplitude (relative sd of the smooth field) for PD, T1, T2.
TEXTURE: dict[str, tuple[float, float, float]] = {
    "fat": (0.02, 0.03, 0.03),
    "muscle": (0.03, 0.03, 0.05),
    "marrow": (0.05, 0.06, 0.05),
    "prostate": (0.03, 0.04, 0.08),
    "rectal_content": (0.15, 0.15, 0.20),
    "urine": (0.01, 0.02, 0.03),
}


def field_factors(field_t: float) -> tuple[float, float]:
    """T1 and T2 scale factors relative to 3 T.

    T1 is about 21 % longer at 3.0 T than at 1.5 T (seed-paper.md); T2 is slightly
    shorter.  Interpolated in log-field so that any field strength gets a value.
    """
    t = np.log(field_t / 3.0) / np.log(2.0)  # 0 at 3 T, -1 at 1.5 T
    return float(1.21**t), float(0.93**t)


@dataclass
class Shape:
    """A 3D ellipsoid-like shape with a Fourier-perturbed outline.

    Inside where rho < 1; the cross-section shrinks as sqrt(1 - dz^2) away from cz.
    """

    cx: float
    cy: float
    cz: float
    a: float
    b: float
    c: float
    angle: float = 0.0
    exponent: float = 2.0
    harmonics: tuple[tuple[float, float], ...] = ()  # (amplitude, phase) for k = 2, 3, ...

    def rho(self, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
        """Normalised radius (1 on the outline); +inf outside the shape's z extent."""
        dz = (z - self.cz) / self.c
        if abs(dz) >= 1.0:
            return np.full(x.shape, np.inf, dtype=np.float32)
        s = np.sqrt(1.0 - dz * dz)
        ca, sa = np.cos(self.angle), np.sin(self.angle)
        xr = ((x - self.cx) * ca + (y - self.cy) * sa) / (self.a * s)
        yr = (-(x - self.cx) * sa + (y - self.cy) * ca) / (self.b * s)
        p = self.exponent
        r = (np.abs(xr) ** p + np.abs(yr) ** p) ** (1.0 / p)
        if self.harmonics:
            th = np.arctan2(yr, xr)
            pert = np.ones_like(r)
            for k, (amp, ph) in enumerate(self.harmonics, start=2):
                pert += amp * np.cos(k * th + ph)
            r = r / pert
        return r.astype(np.float32)


@dataclass
class Subject:
    """One synthetic patient: shapes, per-subject tissue values and texture seeds."""

    seed: int
    field_t: float
    values: dict[str, tuple[float, float, float]]  # tissue -> (PD, T1, T2)
    shapes: list[tuple[str, Shape]]  # painted in order; later wins
    rings: list[tuple[str, str, Shape, float]]  # (outer tissue, inner tissue, shape, wall mm)
    z_extent: tuple[float, float]
    rotation: float
    flip: bool
    extra: dict[str, float] = field(default_factory=dict)


def _harm(rng: np.random.Generator, n: int, amp: float) -> tuple[tuple[float, float], ...]:
    return tuple((float(rng.normal(0, amp / (k + 1))), float(rng.uniform(0, 2 * np.pi))) for k in range(n))


def make_subject(seed: int, field_t: float | None = None) -> Subject:
    """Draw one subject deterministically from ``seed`` (field strength random if None)."""
    rng = np.random.default_rng(seed)
    if field_t is None:
        field_t = float(rng.choice([1.5, 3.0], p=[0.5, 0.5]))
    f1, f2 = field_factors(field_t)
    scale = rng.uniform(0.8, 1.25)  # overall body size

    values: dict[str, tuple[float, float, float]] = {}
    for name, (pd, t1, t1sd, t2, t2sd) in TISSUES_3T.items():
        if pd == 0.0:
            values[name] = (0.0, 0.0, 0.0)
            continue
        pdv = float(np.clip(pd * (1 + rng.normal(0, 0.06)), 0.02, 1.0))
        t1v = float(max(t1 + rng.normal(0, t1sd), 0.4 * t1) * f1 * rng.uniform(0.95, 1.05))
        t2v = float(max(t2 + rng.normal(0, t2sd), 0.4 * t2) * f2)
        values[name] = (pdv, t1v, t2v)

    sh: list[tuple[str, Shape]] = []
    rings: list[tuple[str, str, Shape, float]] = []
    ax, ay = rng.uniform(150, 205) * scale, rng.uniform(100, 145) * scale
    body = Shape(0, rng.normal(0, 5), 0, ax, ay, 400, rng.normal(0, 0.05), rng.uniform(2.0, 3.2), _harm(rng, 5, 0.12))
    sh.append(("fat", body))
    fat_t = rng.uniform(8, 40) * scale
    inner = Shape(body.cx, body.cy + rng.normal(0, 4), 0, ax - fat_t, ay - fat_t * rng.uniform(0.6, 1.2), 400,
                  body.angle, rng.uniform(2.0, 3.0), _harm(rng, 5, 0.15))
    sh.append(("muscle", inner))
    # Pelvic fat around the organs and the ischiorectal fossae.
    sh.append(("fat", Shape(rng.normal(0, 5), rng.uniform(-10, 20) * scale, 0, rng.uniform(55, 85) * scale,
                            rng.uniform(50, 80) * scale, 400, rng.normal(0, 0.1), 2.0, _harm(rng, 4, 0.2))))
    for side in (-1, 1):
        sh.append(("fat", Shape(side * rng.uniform(35, 55) * scale, rng.uniform(40, 70) * scale, 0,
                                rng.uniform(12, 28) * scale, rng.uniform(20, 40) * scale, 400,
                                rng.normal(0, 0.3), 2.0, _harm(rng, 3, 0.2))))
    # Intermuscular fat planes: thin elongated fat ellipses.
    for _ in range(rng.integers(2, 7)):
        sh.append(("fat", Shape(rng.uniform(-0.8, 0.8) * (ax - fat_t), rng.uniform(-0.7, 0.7) * (ay - fat_t), 0,
                                rng.uniform(15, 50) * scale, rng.uniform(1.5, 4), 400, rng.uniform(0, np.pi))))
    # Pelvic bones: acetabulum/ischium arcs lateral to the organs, sacrum/coccyx posterior.
    for side in (-1, 1):
        hx = side * rng.uniform(78, 110) * scale
        hy = rng.uniform(-15, 15) * scale
        hz = rng.uniform(-15, 15)
        r = rng.uniform(20, 27) * scale
        rings.append(("cortical_bone", "marrow",
                      Shape(hx + side * rng.uniform(5, 15), hy + rng.uniform(0, 20), hz, r * rng.uniform(1.3, 1.8),
                            r * rng.uniform(1.4, 2.0), r * 3, rng.normal(0, 0.3), 2.0, _harm(rng, 3, 0.15)),
                      rng.uniform(2, 5)))
        rings.append(("cortical_bone", "marrow", Shape(hx, hy, hz, r, r, r * 1.3), rng.uniform(1.5, 3.5)))
    rings.append(("cortical_bone", "marrow",
                  Shape(rng.normal(0, 4), ay * rng.uniform(0.6, 0.8), rng.uniform(-20, 20), rng.uniform(25, 45) * scale,
                        rng.uniform(12, 22) * scale, 120, rng.normal(0, 0.1), 2.0, _harm(rng, 3, 0.1)),
                  rng.uniform(2, 4)))
    # Bladder (variable filling), prostate (+ lesion), seminal vesicles, rectum, vessels.
    fill = rng.uniform(0.3, 1.0)
    by = -rng.uniform(25, 55) * scale
    bz = rng.uniform(10, 50)
    bladder = Shape(rng.normal(0, 6), by, bz, rng.uniform(25, 65) * fill * scale + 10, rng.uniform(20, 50) * fill * scale + 8,
                    rng.uniform(25, 60) * fill + 10, rng.normal(0, 0.2), 2.0, _harm(rng, 4, 0.12))
    rings.append(("bladder_wall", "urine", bladder, rng.uniform(2, 5)))
    prost = Shape(rng.normal(0, 3), by + rng.uniform(35, 60) * scale, bz - rng.uniform(35, 55), rng.uniform(17, 30) * scale,
                  rng.uniform(13, 23) * scale, rng.uniform(18, 30), rng.normal(0, 0.15), 2.0, _harm(rng, 3, 0.1))
    sh.append(("prostate", prost))
    if rng.random() < 0.5:
        sh.append(("lesion", Shape(prost.cx + rng.uniform(-0.5, 0.5) * prost.a, prost.cy + rng.uniform(-0.4, 0.5) * prost.b,
                                   prost.cz + rng.uniform(-8, 8), rng.uniform(4, 10), rng.uniform(4, 10), rng.uniform(4, 10),
                                   rng.uniform(0, np.pi), 2.0, _harm(rng, 2, 0.15))))
    for side in (-1, 1):
        sh.append(("seminal_vesicle", Shape(side * rng.uniform(12, 25), prost.cy + rng.uniform(5, 15), prost.cz + rng.uniform(20, 35),
                                            rng.uniform(15, 25), rng.uniform(4, 8), rng.uniform(8, 15), side * rng.uniform(0.2, 0.6))))
    rect = Shape(rng.normal(0, 5), prost.cy + prost.b + rng.uniform(12, 25), 0, rng.uniform(12, 24) * scale,
                 rng.uniform(10, 20) * scale, 300, rng.normal(0, 0.3), 2.0, _harm(rng, 3, 0.15))
    rings.append(("rectal_wall", "rectal_content", rect, rng.uniform(2.5, 5)))
    if rng.random() < 0.6:
        sh.append(("gas", Shape(rect.cx + rng.normal(0, 3), rect.cy + rng.normal(0, 3), rng.uniform(-40, 40),
                                rng.uniform(0.2, 0.6) * rect.a, rng.uniform(0.2, 0.6) * rect.b, rng.uniform(10, 30),
                                rng.uniform(0, np.pi), 2.0, _harm(rng, 3, 0.2))))
    for side in (-1, 1):
        for dx, r in ((rng.uniform(55, 75), rng.uniform(3, 5)), (rng.uniform(75, 95), rng.uniform(4, 7))):
            sh.append(("blood", Shape(side * dx * scale, by + rng.uniform(-30, 0), 0, r, r * rng.uniform(0.8, 1.2), 400)))
    return Subject(seed=seed, field_t=field_t, values=values, shapes=sh, rings=rings,
                   z_extent=(-60.0, 70.0), rotation=float(rng.normal(0, 0.12)), flip=bool(rng.random() < 0.5),
                   extra={"scale": float(scale)})


@dataclass
class Maps:
    """Ground-truth maps of one slice or volume: PD (relative to water), T1/T2 in ms."""

    pd: np.ndarray
    t1: np.ndarray
    t2: np.ndarray
    labels: np.ndarray  # tissue label at the voxel centre (uint8)
    pixel_spacing: tuple[float, float]
    field_t: float


_ORGANS = ("prostate", "lesion", "seminal_vesicle", "gas", "blood")


def _paint(subject: Subject, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    """Label map at (x, y, z): body fat, muscle, fat planes, then rings, then organs."""
    lab = np.zeros(x.shape, dtype=np.uint8)
    for tissue, shape in subject.shapes:
        if tissue not in _ORGANS:
            lab[shape.rho(x, y, z) < 1] = LABELS[tissue]
    for outer, inner, shape, wall in subject.rings:
        r = shape.rho(x, y, z)
        lab[r < 1] = LABELS[outer]
        lab[r < 1 - wall / max(min(shape.a, shape.b), 1e-3)] = LABELS[inner]
    for tissue, shape in subject.shapes:
        if tissue in _ORGANS:
            lab[shape.rho(x, y, z) < 1] = LABELS[tissue]
    lab[subject.shapes[0][1].rho(x, y, z) >= 1] = 0
    return lab


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], coarse: int) -> np.ndarray:
    """A smooth zero-mean unit-sd random field (cubic upsampling of coarse noise)."""
    n = rng.standard_normal((coarse, coarse)).astype(np.float32)
    f = ndimage.zoom(n, (shape[0] / coarse, shape[1] / coarse), order=3, mode="reflect")[: shape[0], : shape[1]]
    f = f - f.mean()
    sd = f.std()
    return f / sd if sd > 0 else f


def render_slice(
    subject: Subject,
    z_mm: float,
    shape: tuple[int, int] = (256, 256),
    pixel_mm: tuple[float, float] = (1.5, 1.5),
    center_mm: tuple[float, float] = (0.0, 0.0),
    supersample: int = 2,
    texture_seed: int | None = None,
) -> Maps:
    """Evaluate the subject's maps on a 2D grid at height ``z_mm``.

    Partial volume: maps are evaluated at ``supersample``x the resolution, then PD is
    area-averaged and T1/T2 are averaged as PD-weighted relaxation rates (rates mix the
    way signals do at the short-TE/long-TR limit), which gives smooth edges.
    """
    h, w = shape
    ss = supersample
    hh, ww = h * ss, w * ss
    ry = (np.arange(hh, dtype=np.float32) - hh / 2 + 0.5) * pixel_mm[0] / ss + center_mm[1]
    rx = (np.arange(ww, dtype=np.float32) - ww / 2 + 0.5) * pixel_mm[1] / ss + center_mm[0]
    xx, yy = np.meshgrid(rx, ry)
    th = subject.rotation
    x = xx * np.cos(th) - yy * np.sin(th)
    y = xx * np.sin(th) + yy * np.cos(th)
    if subject.flip:
        x = -x
    lab = _paint(subject, x, y, z_mm)

    tseed = (subject.seed * 7919 + int(round(z_mm * 10))) % 2**63 if texture_seed is None else texture_seed
    trng = np.random.default_rng(tseed)
    fields = [_smooth_field(trng, (hh, ww), int(trng.integers(6, 20))) for _ in range(3)]
    pd = np.zeros((hh, ww), np.float32)
    r1 = np.zeros((hh, ww), np.float32)
    r2 = np.zeros((hh, ww), np.float32)
    for name, idx in LABELS.items():
        m = lab == idx
        if idx == 0 or not m.any():
            continue
        pdv, t1v, t2v = subject.values[name]
        if pdv == 0.0:
            continue
        tex = TEXTURE.get(name, (0.02, 0.02, 0.03))
        pd[m] = pdv * (1 + tex[0] * fields[0][m])
        r1[m] = 1.0 / (t1v * (1 + tex[1] * fields[1][m]))
        r2[m] = 1.0 / (t2v * (1 + tex[2] * fields[2][m]))
    pd = np.clip(pd, 0, None)
    if ss > 1:
        pd_l = pd.reshape(h, ss, w, ss).mean(axis=(1, 3))
        wsum = np.maximum(pd_l * ss * ss, 1e-12)
        r1_l = (pd * r1).reshape(h, ss, w, ss).sum(axis=(1, 3)) / wsum
        r2_l = (pd * r2).reshape(h, ss, w, ss).sum(axis=(1, 3)) / wsum
        lab_l = lab[ss // 2 :: ss, ss // 2 :: ss]
    else:
        pd_l, r1_l, r2_l, lab_l = pd, r1, r2, lab
    valid = pd_l > 1e-4
    t1 = np.where(valid, 1.0 / np.maximum(r1_l, 1e-9), 0.0).astype(np.float32)
    t2 = np.where(valid, 1.0 / np.maximum(r2_l, 1e-9), 0.0).astype(np.float32)
    pd_l = np.where(valid, pd_l, 0.0).astype(np.float32)
    return Maps(pd=pd_l, t1=t1, t2=t2, labels=lab_l.astype(np.uint8), pixel_spacing=pixel_mm, field_t=subject.field_t)


def random_slice(seed: int, shape: tuple[int, int] = (128, 128), field_t: float | None = None) -> Maps:
    """A slice of a random subject at a random level, field of view and resolution."""
    subj = make_subject(seed, field_t)
    rng = np.random.default_rng(seed + 1_000_003)
    z = float(rng.uniform(-45, 55))
    fov = rng.uniform(180, 480)  # mm along the larger matrix side: crops to whole-body views
    px = fov / max(shape)
    aniso = rng.uniform(0.9, 1.1)
    center = (float(rng.normal(0, 20)), float(rng.normal(0, 20)))
    return render_slice(subj, z, shape, (px * aniso, px), center)


def volume(
    seed: int,
    n_slices: int = 24,
    shape: tuple[int, int] = (256, 256),
    pixel_mm: float = 1.5,
    slice_mm: float = 4.0,
    field_t: float | None = None,
) -> tuple[Maps, np.ndarray]:
    """A 3D stack of ``n_slices`` axial slices centred on the prostate region.

    Returns the stacked maps (arrays [N,H,W]) and the z positions in mm.
    """
    subj = make_subject(seed, field_t)
    zs = (np.arange(n_slices) - (n_slices - 1) / 2) * slice_mm
    sl = [render_slice(subj, float(z), shape, (pixel_mm, pixel_mm)) for z in zs]
    maps = Maps(
        pd=np.stack([s.pd for s in sl]),
        t1=np.stack([s.t1 for s in sl]),
        t2=np.stack([s.t2 for s in sl]),
        labels=np.stack([s.labels for s in sl]),
        pixel_spacing=(pixel_mm, pixel_mm),
        field_t=subj.field_t,
    )
    return maps, zs


@dataclass
class Acquisition:
    """A simulated spin-echo acquisition of a phantom."""

    image: np.ndarray  # noisy magnitude image in scanner units (float32)
    clean: np.ndarray  # noise-free signal incl. bias and gain
    bias: np.ndarray  # receive-bias field (1 = none)
    gain: float
    sigma: float


def bias_field(rng: np.random.Generator, shape: tuple[int, ...], strength: float) -> np.ndarray:
    """A smooth multiplicative receive-bias field, exp(strength * smooth field)."""
    hw = shape[-2:]
    f = _smooth_field(rng, hw, int(rng.integers(2, 5)))
    b = np.exp(strength * f).astype(np.float32)
    return np.broadcast_to(b, shape).copy()


def acquire(
    maps: Maps,
    te: float,
    tr: float,
    rng: np.random.Generator,
    snr: float | None = None,
    bias_strength: float | None = None,
    gain: float | None = None,
) -> Acquisition:
    """Simulate a magnitude SE image: bias * gain * S(TE,TR) + Rician noise.

    ``snr`` is the ratio of the 99th percentile of the clean body signal to the noise sd.
    """
    snr = float(rng.uniform(20, 120)) if snr is None else snr
    bias_strength = float(rng.uniform(0.0, 0.25)) if bias_strength is None else bias_strength
    gain = float(np.exp(rng.uniform(np.log(50), np.log(5000)))) if gain is None else gain
    b = bias_field(rng, maps.pd.shape, bias_strength)
    clean = (gain * b * signal(maps.pd, te, tr, maps.t1, maps.t2)).astype(np.float32)
    body = clean[maps.pd > 0]
    peak = float(np.percentile(body, 99)) if body.size else 1.0
    sigma = peak / snr
    n1 = rng.standard_normal(clean.shape).astype(np.float32) * sigma
    n2 = rng.standard_normal(clean.shape).astype(np.float32) * sigma
    img = np.sqrt((clean + n1) ** 2 + n2**2).astype(np.float32)
    return Acquisition(image=img, clean=clean, bias=b, gain=gain, sigma=sigma)
