"""Data consistency for fused maps: make PD/T1/T2 reproduce every input series.

Why: a network that sees a T1w and a T2w series proposes maps from learned anatomy, but
nothing forces those maps to *re-render the inputs*: the fused 1.0 model rendered the
T2w input's own contrast at SSIM 0.87 from T1w + T2w.  Two or more SE images are data
about every voxel that the textbook fit uses exactly; this step combines the two:

    minimise over (log PD, log T1, log T2) per voxel
        sum_k ((g_k * PD * E(TE_k, TR_k, T1, T2) - S_k) / sigma)^2          (every input)
      + ((log T1 - log T1_net)^2 + (log T2 - log T2_net)^2) / sigma_prior^2   (the network)

i.e. a maximum-a-posteriori fit whose prior is the network's answer.  With three or more
distinct contrasts the data determine the maps (given the gains) and the fit reaches least-squares accuracy
without its failure modes (no grid search, no wild voxels where the data are flat); with
two contrasts the data pin two of the three unknowns per voxel (a curve of exact
solutions, see :mod:`rtcontrast.core.lsq`) and the prior picks the point on that curve nearest
to the network's answer; with one input it changes nothing and is skipped.

``S_k`` are the inputs each divided by its own series scale (as the model sees them) and
``g_k`` the gain between input k and the first input's units.  Series of one session rarely
share a stored-value scale, and with three contrasts the gains cannot be read from the data,
so they come from DICOM, the protocol (``shared_scale``) or physics: :func:`volume_gains`
(reference tissues and bounds, :mod:`rtcontrast.core.gains`).  :func:`input_gains` (the 1.1
estimate from the network's T1/T2) is kept only as the search's starting point.

The prior's width follows :func:`prior_sigma_for`: with three or more distinct contrasts it
is wide (the data decide wherever the voxel is well conditioned), with two it is the
network's typical error.  Bounds are physical (T1 <= 5 s, T2 <= 3 s: free water).

Vectorised numpy (batched 3x3 normal equations, Levenberg-Marquardt damping), on the
node's CPU after onnxruntime: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from rtcontrast.core.gains import (
    PHYS_T1_MS,
    PHYS_T2_MS,
    GainResult,
    background_sigma,
    distinct_contrasts,
    estimate_gains,
)

#: Noise of an input relative to its series scale (99th percentile): SNR ~ 50.
DATA_SIGMA = 0.02
#: Spread of the network's log T1 / log T2 around the truth (its held-out errors are ~10-30 %).
PRIOR_SIGMA = 0.25
#: Voxels with every input below this fraction of its series scale are background (left as they are).
BACKGROUND_FRAC = 0.03
#: Sensitivity below which voxels weigh alike in the gain estimate (d log S / d log T1,T2).
SENS_FLOOR = 0.1
#: Voxels per chunk (bounds memory to ~chunk * K * 12 floats).
_CHUNK = 1 << 18


@dataclass(frozen=True)
class Settings:
    """Weights of the two terms and the iteration count.

    prior_sigma 0.25 and 0.5 gave about the same maps on tuning phantoms (held-out seeds
    HELDOUT_SEED_BASE + 200.., not the reported split); 0.25 was kept.
    """

    data_sigma: float = DATA_SIGMA
    prior_sigma: float = PRIOR_SIGMA
    n_iter: int = 12
    background_frac: float = BACKGROUND_FRAC
    #: the series are stored in one intensity scale (gains = ratios of the series scales) instead of
    #: gains estimated from the maps; true for some scanners' exports, not in general
    shared_scale: bool = False
    #: prior width where >= 3 distinct contrasts determine the voxel (see :func:`prior_sigma_for`)
    prior_sigma_determined: float = 2.0
    #: physical bounds of the fit (free water: T1 <= ~4.5 s, T2 <= ~2.5 s at body temperature)
    t1_bounds_ms: tuple[float, float] = PHYS_T1_MS
    t2_bounds_ms: tuple[float, float] = PHYS_T2_MS


def input_gains(images: np.ndarray, te_tr: np.ndarray, t1: np.ndarray, t2: np.ndarray, tissue: np.ndarray,
                valid: np.ndarray | None = None) -> np.ndarray:
    """Gain g_k per input [K] relative to the first input (g_0 = 1: PD is in its units).

    From the signal equation, S_k / S_0 = g_k * E_k / E_0 wherever both inputs see the
    same PD, so g_k is read voxel by voxel as (S_k / S_0) * (E_0 / E_k) with the
    network's T1/T2, and summarised by a weighted median over ``tissue``.  The weights
    favour voxels where log(E_k / E_0) hardly depends on T1 and T2 (computed from locally
    median-filtered maps, so that voxel noise does not select itself), because there an
    error of the network's maps barely moves the estimate (for a T1w/T2w pair: fluid); the
    estimate still carries the maps' bias where no such voxels exist.  Why it matters: the gains are
    not identifiable from the data (with three contrasts any gains admit exact per-voxel
    solutions), so they can only come from the prior, read where it is safest.
    ``valid`` [K, ...]: where each input is a measurement (a resampled partner's field of
    view).  1.0 where undetermined (< 16 usable voxels).
    """
    k_in = images.shape[0]
    gains = np.ones(k_in, np.float64)
    if not tissue.any() or k_in < 2:
        return gains
    size = [1] * (t1.ndim - 2) + [5, 5] if t1.ndim >= 2 else [5]
    f1 = np.maximum(ndimage.median_filter(t1, size=size)[tissue].astype(np.float64), 1e-6)
    f2 = np.maximum(ndimage.median_filter(t2, size=size)[tissue].astype(np.float64), 1e-6)
    a1 = np.maximum(t1[tissue].astype(np.float64), 1e-6)
    a2 = np.maximum(t2[tissue].astype(np.float64), 1e-6)
    s0 = images[0][tissue].astype(np.float64)
    te0, tr0 = float(te_tr[0][0]), float(te_tr[0][1])

    def log_e(te: float, tr: float, x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
        return np.log(np.maximum(1.0 - np.exp(-tr / x1), 1e-12)) - te / x2

    def dlog_a(tr: float, x1: np.ndarray) -> np.ndarray:  # d log(1 - exp(-TR/T1)) / d log T1
        r = np.exp(-tr / x1)
        return r * (tr / x1) / np.maximum(1.0 - r, 1e-9)

    for k in range(1, k_in):
        te, tr = float(te_tr[k][0]), float(te_tr[k][1])
        sk = images[k][tissue].astype(np.float64)
        ok = (sk > 0) & (s0 > 0)
        if valid is not None:
            ok &= valid[k][tissue] & valid[0][tissue]
        if ok.sum() < 16:
            continue
        ratio = np.log(sk[ok] / s0[ok]) - (log_e(te, tr, a1[ok], a2[ok]) - log_e(te0, tr0, a1[ok], a2[ok]))
        sens = np.hypot(dlog_a(tr, f1[ok]) - dlog_a(tr0, f1[ok]), (te - te0) / f2[ok])
        w = 1.0 / (sens * sens + SENS_FLOOR ** 2)
        gains[k] = float(np.exp(_weighted_median(ratio, w)))
    return gains


def gain_tissue(images: np.ndarray, valid: np.ndarray, pd: np.ndarray, t1: np.ndarray, t2: np.ndarray,
                cfg: Settings) -> np.ndarray:
    """Voxels to read the gains from: maps defined, the first input measured, every measured input clearly above
    background (ratios of near-background voxels are noise)."""
    fine = (t1 > 0) & (t2 > 0) & (pd > 0)
    return fine & valid[0] & np.all(~valid | (images > 2 * cfg.background_frac), axis=0)


def volume_gains(images: np.ndarray, te_tr: np.ndarray, valid: np.ndarray, pd: np.ndarray, t1: np.ndarray,
                 t2: np.ndarray, cfg: Settings, field_t: float | None = None) -> GainResult:
    """Gains of the inputs from the data and physics (:func:`rtcontrast.core.gains.estimate_gains`), once per volume.

    ``images`` [K, ...] each divided by its series scale, ``valid`` [K, ...] bool, maps = the
    network's (start and weak tie-breaker only).  ``detail`` of the result also carries the
    background noise per input (``sigma``), which the fusion QA uses.
    """
    tt = np.asarray(te_tr, np.float64)
    sigma = background_sigma(images, valid, cfg.background_frac)
    tissue = gain_tissue(images, valid, pd, t1, t2, cfg)
    start = input_gains(images, tt, t1, t2, tissue, valid)
    te32, tr32 = tt[:, 0].astype(np.float32), tt[:, 1].astype(np.float32)
    ps = prior_sigma_for(tt, cfg)

    def fit_voxels(s: np.ndarray, g: np.ndarray, p: np.ndarray, a: np.ndarray, b: np.ndarray, wk: np.ndarray,
                   sig: np.ndarray) -> tuple[np.ndarray, ...]:
        return _fit(s, te32, tr32, g, p, a, b, replace(cfg, n_iter=8), wk, ps, sig)

    res = estimate_gains(images, tt, valid, tissue, pd, t1, t2, start, field_t, fit_voxels, sigma)
    res.detail["network_gains"] = [round(float(v), 4) for v in start]
    res.detail["sigma"] = [None if not np.isfinite(v) else float(v) for v in sigma]
    return res


def _weighted_median(x: np.ndarray, w: np.ndarray) -> float:
    order = np.argsort(x)
    c = np.cumsum(w[order])
    return float(x[order][np.searchsorted(c, 0.5 * c[-1])])


def prior_sigma_for(te_tr: np.ndarray, cfg: Settings) -> float:
    """The prior's width for this design: the rule of "data over prior where the data decide".

    Three or more distinct contrasts determine (PD, T1, T2) per voxel: the prior then only
    regularises directions the data leave flat (``prior_sigma_determined``, a factor of ~7:
    against the data's information in a tissue voxel, (d S / d log T1 / sigma)^2 ~ 10^2-10^3,
    its weight 1/sigma_p^2 = 0.25 is negligible, so well-conditioned voxels are the data's
    fit and the answer does not depend on the network or on the order of the inputs).
    With two contrasts the data pin a curve of exact solutions and the prior
    (``prior_sigma``, the network's typical error) chooses the point on it.
    """
    return cfg.prior_sigma_determined if distinct_contrasts(te_tr) >= 3 else cfg.prior_sigma


def _fit(s: np.ndarray, te: np.ndarray, tr: np.ndarray, g: np.ndarray, pd: np.ndarray, t1: np.ndarray,
         t2: np.ndarray, cfg: Settings, wk: np.ndarray, prior_sigma: float | None = None,
         sigma: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Batched Levenberg-Marquardt on (log PD, log T1, log T2) for voxels s [V,K] (wk [V,K]: 1 = measured).

    ``sigma`` [K]: noise per input (default ``cfg.data_sigma``).  Returns PD, T1, T2 and the
    data chi^2 per voxel (sum over inputs of (misfit / sigma)^2).
    """
    lo = np.log([1e-6, cfg.t1_bounds_ms[0], cfg.t2_bounds_ms[0]]).astype(s.dtype)
    hi = np.log([1e6, cfg.t1_bounds_ms[1], cfg.t2_bounds_ms[1]]).astype(s.dtype)
    prior = np.clip(np.stack([np.log(t1), np.log(t2)], axis=1), lo[1:], hi[1:])  # [V,2]
    u = np.stack([np.log(np.maximum(pd, 1e-6)), prior[:, 0], prior[:, 1]], axis=1)
    inv_d = (1.0 / (np.full(s.shape[1], cfg.data_sigma) if sigma is None else np.asarray(sigma))).astype(s.dtype)[None, :]
    inv_p = s.dtype.type(1.0 / (cfg.prior_sigma if prior_sigma is None else prior_sigma))

    def residual(u: np.ndarray) -> tuple[np.ndarray, ...]:
        p, a1, a2 = np.exp(u[:, 0:1]), np.exp(u[:, 1:2]), np.exp(u[:, 2:3])
        r = np.exp(-tr[None, :] / a1)
        b = np.exp(-te[None, :] / a2)
        model = g[None, :] * p * (1.0 - r) * b  # [V,K]
        rd = (model - s) * (inv_d * wk)
        rp = (u[:, 1:] - prior) * inv_p
        cost = np.einsum("vk,vk->v", rd, rd) + np.einsum("vk,vk->v", rp, rp)
        return rd, rp, cost, model, r, b, p, a1, a2

    rd, rp, cost, model, r, b, p, a1, a2 = residual(u)
    lam = np.full(s.shape[0], 1e-2, s.dtype)
    pp = inv_p * inv_p
    for _ in range(cfg.n_iter):
        # d model / d log PD = model; / d log T1 = -g PD B R TR/T1; / d log T2 = model TE/T2
        j0 = model * (inv_d * wk)
        j1 = -g[None, :] * p * b * r * tr[None, :] / a1 * (inv_d * wk)
        j2 = model * te[None, :] / a2 * (inv_d * wk)
        # normal equations (symmetric 3x3 per voxel) + the prior on log T1, log T2
        h00, h01, h02 = (j0 * j0).sum(1), (j0 * j1).sum(1), (j0 * j2).sum(1)
        h11, h12, h22 = (j1 * j1).sum(1) + pp, (j1 * j2).sum(1), (j2 * j2).sum(1) + pp
        g0 = -(j0 * rd).sum(1)
        g1 = -((j1 * rd).sum(1) + rp[:, 0] * inv_p)
        g2 = -((j2 * rd).sum(1) + rp[:, 1] * inv_p)
        d = 1.0 + lam
        step = _solve3(h00 * d + 1e-12, h01, h02, h11 * d, h12, h22 * d, g0, g1, g2)
        u_n = np.clip(u + step, lo, hi)
        out_n = residual(u_n)
        ok = out_n[2] < cost
        lam = np.where(ok, np.maximum(lam / 3.0, 1e-9), np.minimum(lam * 4.0, 1e9))
        u = np.where(ok[:, None], u_n, u)
        okc = ok[:, None]
        rd, rp = np.where(okc, out_n[0], rd), np.where(okc, out_n[1], rp)
        cost = np.where(ok, out_n[2], cost)
        model, r, b = np.where(okc, out_n[3], model), np.where(okc, out_n[4], r), np.where(okc, out_n[5], b)
        p, a1, a2 = np.where(okc, out_n[6], p), np.where(okc, out_n[7], a1), np.where(okc, out_n[8], a2)
    return np.exp(u[:, 0]), np.exp(u[:, 1]), np.exp(u[:, 2]), np.einsum("vk,vk->v", rd, rd)


def _solve3(a: np.ndarray, b: np.ndarray, c: np.ndarray, d: np.ndarray, e: np.ndarray, f: np.ndarray,
            x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Solve [[a b c] [b d e] [c e f]] @ v = [x y z] per voxel (Cramer's rule; the matrix is SPD)."""
    c00, c01, c02 = d * f - e * e, c * e - b * f, b * e - c * d
    det = a * c00 + b * c01 + c * c02
    det = np.where(np.abs(det) < 1e-30, np.float32(1e-30), det)
    c11, c12, c22 = a * f - c * c, b * c - a * e, a * d - b * b
    return np.stack([(c00 * x + c01 * y + c02 * z) / det, (c01 * x + c11 * y + c12 * z) / det,
                     (c02 * x + c12 * y + c22 * z) / det], axis=1)


def refine(images: np.ndarray, te_tr: np.ndarray, pd: np.ndarray, t1: np.ndarray, t2: np.ndarray,
           settings: Settings | None = None, gains: np.ndarray | None = None,
           valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Maps consistent with every input, starting from (and regularised by) the network's maps.

    ``images`` [K, ...]: the inputs divided by their own series scale, first = PD's units;
    ``te_tr`` [K, 2] ms; ``pd``/``t1``/``t2``: the network's maps (shape ``images.shape[1:]``).
    ``gains`` [K]: input k's scale relative to the first when known (series stored in one
    scale, or estimated once per volume by the caller); else :func:`input_gains` here.
    ``valid`` [K, ...] bool: where each input is a measurement (False outside a resampled
    partner's field of view: those residuals are dropped).
    Returns refined (pd, t1, t2) as float32 and the gains [K].  Background voxels (every
    input below ``background_frac``) and voxels the network gave no T1/T2 keep the
    network's values; with one input the maps come back unchanged.
    """
    cfg = settings or Settings()
    img = np.asarray(images, dtype=np.float32)
    tt = np.asarray(te_tr, dtype=np.float64)
    if img.ndim < 2 or tt.shape != (img.shape[0], 2):
        raise ValueError(f"images [K, ...] and te_tr [K, 2] expected, got {img.shape} and {tt.shape}")
    if img.shape[1:] != pd.shape or pd.shape != t1.shape or t1.shape != t2.shape:
        raise ValueError(f"maps {pd.shape}/{t1.shape}/{t2.shape} do not match the inputs {img.shape[1:]}")
    if valid is not None and np.shape(valid) != img.shape:
        raise ValueError(f"valid must have the inputs' shape {img.shape}, got {np.shape(valid)}")
    out_pd, out_t1, out_t2 = (np.asarray(a, np.float32).copy() for a in (pd, t1, t2))
    if img.shape[0] < 2:
        return out_pd, out_t1, out_t2, np.ones(img.shape[0])
    ok_in = np.isfinite(img) if valid is None else (np.asarray(valid, bool) & np.isfinite(img))
    img = np.where(ok_in, img, 0.0).astype(np.float32)
    fine = (t1 > 0) & (t2 > 0) & (pd > 0)
    sel = fine & np.any(ok_in & (img > cfg.background_frac), axis=0)
    if gains is None:
        gains = volume_gains(img, tt, ok_in, pd, t1, t2, cfg).gains
    elif np.shape(gains) != (img.shape[0],):
        raise ValueError(f"gains must be [K] = [{img.shape[0]}], got shape {np.shape(gains)}")
    gains = np.asarray(gains, np.float64)
    if not sel.any():
        return out_pd, out_t1, out_t2, gains
    # float32 in the fit: twice as fast, and far more precise than the data
    s = img[:, sel].T  # [V,K]
    wk = ok_in[:, sel].T.astype(np.float32)
    p0, a0, b0 = out_pd[sel], out_t1[sel], out_t2[sel]
    res = [np.empty(len(p0), np.float32) for _ in range(3)]
    te32, tr32, g32 = tt[:, 0].astype(np.float32), tt[:, 1].astype(np.float32), gains.astype(np.float32)
    ps = prior_sigma_for(tt, cfg)
    for i in range(0, len(p0), _CHUNK):
        j = slice(i, i + _CHUNK)
        for dst, v in zip(res, _fit(s[j], te32, tr32, g32, p0[j], a0[j], b0[j], cfg, wk[j], ps)[:3]):
            dst[j] = v
    out_pd[sel], out_t1[sel], out_t2[sel] = res[0], res[1], res[2]
    return out_pd, out_t1, out_t2, gains


__all__ = ["DATA_SIGMA", "PRIOR_SIGMA", "Settings", "gain_tissue", "input_gains", "prior_sigma_for", "refine", "volume_gains"]
