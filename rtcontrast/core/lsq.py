"""Classical voxel-wise least-squares PD/T1/T2 fit: the reference the learned model is judged against.

Why it exists: a physicist who gets maps from the network asks "what would the textbook
fit give on the same images?"  This module answers it from K co-registered spin-echo
images with known TE/TR, using the same signal equation as everything else
(:func:`rtcontrast.core.physics.signal`)::

    S_k = PD * (1 - exp(-TR_k / T1)) * exp(-TE_k / T2)

Method (numpy only, vectorised over voxels):

1. a coarse log-spaced grid over (T1, T2); PD enters linearly, so for each grid point the
   best PD is ``<S,E>/<E,E>`` in closed form and the residual is ``|S|^2 - <S,E>^2/<E,E>``;
   the best grid point per voxel is the start (this avoids the local minima a cold start
   falls into);
2. Levenberg-Marquardt on (PD, log T1, log T2), all voxels at once (batched 3x3 normal
   equations), with per-voxel damping; T1 and T2 are clipped to their bounds after each
   step and PD to >= 0.

Identifiability: T1 needs two distinct TR, T2 two distinct TE, and three unknowns need at
least three distinct (TE, TR) contrasts.  Two images (e.g. one T1w and one T2w) give a
one-parameter family of exact solutions (any T1 in a wide range, with a matching PD and
T2, reproduces both signals), so :func:`fit` refuses them instead of returning an
arbitrary member of that family.
"""

from __future__ import annotations

import numpy as np

#: Bounds of the fit (ms).
T1_BOUNDS_MS = (1.0, 10000.0)
T2_BOUNDS_MS = (1.0, 5000.0)
#: Coarse grid size per axis of the initialisation.
GRID_POINTS = 48
#: Voxels per chunk in the grid search (bounds memory to ~chunk * grid^2 floats).
_CHUNK = 4096


def _check_design(te_tr: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Validate the acquisition table; ValueError says exactly what is missing."""
    tt = np.asarray(te_tr, dtype=np.float64)
    if tt.ndim != 2 or tt.shape[1] != 2:
        raise ValueError(f"te_tr must be [K, 2] (TE, TR in ms), got shape {tt.shape}")
    if tt.shape[0] != k:
        raise ValueError(f"{k} images but {tt.shape[0]} (TE, TR) rows")
    if not np.all(np.isfinite(tt)) or np.any(tt <= 0):
        raise ValueError(f"TE and TR must be finite and positive, got {tt.tolist()}")
    te, tr = tt[:, 0], tt[:, 1]
    problems = []
    n_tr = len(np.unique(np.round(tr, 6)))
    n_te = len(np.unique(np.round(te, 6)))
    if n_tr < 2:
        problems.append(f"T1 needs >= 2 distinct TR (all images have TR {tr[0]:g} ms)")
    if n_te < 2:
        problems.append(f"T2 needs >= 2 distinct TE (all images have TE {te[0]:g} ms)")
    if problems:
        raise ValueError("; ".join(problems))
    n_pairs = len({(round(float(a), 6), round(float(b), 6)) for a, b in tt})
    if n_pairs < 3:
        raise ValueError(
            f"PD, T1 and T2 need >= 3 distinct (TE, TR) contrasts, got {n_pairs}: "
            "with two contrasts every T1 in a wide range fits exactly (with a matching PD and T2)"
        )
    return te, tr


def _weights(te: np.ndarray, tr: np.ndarray, t1: np.ndarray, t2: np.ndarray) -> tuple[np.ndarray, ...]:
    """E [V,K] and its factors A = 1 - exp(-TR/T1), B = exp(-TE/T2), R = exp(-TR/T1)."""
    r = np.exp(-tr[None, :] / t1[:, None])
    a = 1.0 - r
    b = np.exp(-te[None, :] / t2[:, None])
    return a * b, a, b, r


def _grid_init(s: np.ndarray, te: np.ndarray, tr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best (PD, T1, T2) per voxel on a log grid, PD in closed form."""
    g1 = np.geomspace(*T1_BOUNDS_MS, GRID_POINTS)
    g2 = np.geomspace(*T2_BOUNDS_MS, GRID_POINTS)
    t1g, t2g = (x.ravel() for x in np.meshgrid(g1, g2, indexing="ij"))
    e = (1.0 - np.exp(-tr[None, :] / t1g[:, None])) * np.exp(-te[None, :] / t2g[:, None])  # [G,K]
    ee = np.einsum("gk,gk->g", e, e)
    v = s.shape[0]
    best = np.empty(v, dtype=np.intp)
    for i in range(0, v, _CHUNK):
        se = s[i : i + _CHUNK] @ e.T  # [c,G]
        # residual = |S|^2 - <S,E>^2/<E,E>; only PD >= 0 (se >= 0) solutions are allowed
        score = np.where(se > 0, se * se / ee[None, :], 0.0)
        best[i : i + _CHUNK] = np.argmax(score, axis=1)
    t1, t2 = t1g[best], t2g[best]
    eb = e[best]
    pd = np.maximum(np.einsum("vk,vk->v", s, eb) / ee[best], 0.0)
    return pd, t1, t2


def _lm(
    s: np.ndarray, te: np.ndarray, tr: np.ndarray, pd: np.ndarray, t1: np.ndarray, t2: np.ndarray, n_iter: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Batched Levenberg-Marquardt on (PD, log T1, log T2)."""
    lo1, hi1 = np.log(T1_BOUNDS_MS[0]), np.log(T1_BOUNDS_MS[1])
    lo2, hi2 = np.log(T2_BOUNDS_MS[0]), np.log(T2_BOUNDS_MS[1])
    u, w = np.log(t1), np.log(t2)
    lam = np.full(s.shape[0], 1e-3)
    e, a, b, r = _weights(te, tr, t1, t2)
    res = s - pd[:, None] * e
    cost = np.einsum("vk,vk->v", res, res)
    eye = np.eye(3)
    for _ in range(n_iter):
        t1, t2 = np.exp(u), np.exp(w)
        # dS/dPD = E; dS/dlogT1 = -PD*B*R*TR/T1; dS/dlogT2 = PD*E*TE/T2
        j = np.stack(
            [e, -pd[:, None] * b * r * tr[None, :] / t1[:, None], pd[:, None] * e * te[None, :] / t2[:, None]],
            axis=2,
        )  # [V,K,3]
        jtj = np.einsum("vki,vkj->vij", j, j)
        jtr = np.einsum("vki,vk->vi", j, res)
        diag = np.einsum("vii->vi", jtj)
        h = jtj + (lam[:, None] * np.maximum(diag, 1e-12))[:, :, None] * eye[None]
        try:
            step = np.linalg.solve(h, jtr[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:  # a singular voxel: fall back to per-voxel least squares
            step = np.stack([np.linalg.lstsq(hh, g, rcond=None)[0] for hh, g in zip(h, jtr)])
        pd_n = np.maximum(pd + step[:, 0], 0.0)
        u_n = np.clip(u + step[:, 1], lo1, hi1)
        w_n = np.clip(w + step[:, 2], lo2, hi2)
        e_n, a_n, b_n, r_n = _weights(te, tr, np.exp(u_n), np.exp(w_n))
        res_n = s - pd_n[:, None] * e_n
        cost_n = np.einsum("vk,vk->v", res_n, res_n)
        ok = cost_n < cost
        lam = np.where(ok, np.maximum(lam / 3.0, 1e-9), np.minimum(lam * 4.0, 1e9))
        pd = np.where(ok, pd_n, pd)
        u = np.where(ok, u_n, u)
        w = np.where(ok, w_n, w)
        okc = ok[:, None]
        e, b, r = np.where(okc, e_n, e), np.where(okc, b_n, b), np.where(okc, r_n, r)
        res = np.where(okc, res_n, res)
        cost = np.where(ok, cost_n, cost)
    return pd, np.exp(u), np.exp(w)


def background_mask(images: np.ndarray, frac: float = 0.02) -> np.ndarray:
    """Voxels where every image is below ``frac`` x the 99th percentile of the brightest image.

    Why: air and background hold only noise; fitting them gives random T1/T2 that look like
    tissue.  They are returned as zeros, as the model and the phantoms do.
    """
    peak = float(np.percentile(images.max(axis=0), 99)) if images.size else 0.0
    return np.all(images <= frac * peak, axis=0)


def fit(
    images: np.ndarray,
    te_tr: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    background_frac: float = 0.02,
    n_iter: int = 25,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-wise non-linear least-squares fit of (PD, T1, T2) from K SE images.

    ``images`` [K, ...] are co-registered magnitude images in one intensity scale (PD comes
    out in that scale); ``te_tr`` [K, 2] is (TE, TR) in ms per image.  ``mask`` (shape
    ``images.shape[1:]``) selects the voxels to fit; without it, voxels where every image is
    below ``background_frac`` of the brightest signal are background.  Voxels not fitted,
    and voxels whose fitted PD is 0 (no signal: T1/T2 undetermined), are 0 in all three maps.  Returns float32 arrays of shape ``images.shape[1:]``.

    Raises ValueError when the design cannot determine the parameters: fewer than two
    distinct TR (T1), fewer than two distinct TE (T2), or fewer than three distinct contrasts.
    """
    img = np.asarray(images, dtype=np.float64)
    if img.ndim < 2:
        raise ValueError(f"images must be [K, ...] with K >= 2, got shape {img.shape}")
    te, tr = _check_design(te_tr, img.shape[0])
    if not np.all(np.isfinite(img)):
        raise ValueError("images contain NaN or inf")
    spatial = img.shape[1:]
    if mask is None:
        sel = ~background_mask(img, background_frac)
    else:
        sel = np.asarray(mask, dtype=bool)
        if sel.shape != spatial:
            raise ValueError(f"mask shape {sel.shape} does not match image shape {spatial}")
    pd_o = np.zeros(spatial, np.float32)
    t1_o = np.zeros(spatial, np.float32)
    t2_o = np.zeros(spatial, np.float32)
    if not sel.any():
        return pd_o, t1_o, t2_o
    s = img[:, sel].T  # [V,K]
    pd, t1, t2 = _grid_init(s, te, tr)
    pd, t1, t2 = _lm(s, te, tr, pd, t1, t2, n_iter)
    nosignal = pd <= 0  # no signal: T1/T2 undetermined, reported as 0 like background
    t1[nosignal] = 0.0
    t2[nosignal] = 0.0
    pd_o[sel], t1_o[sel], t2_o[sel] = pd, t1, t2
    return pd_o, t1_o, t2_o


__all__ = ["T1_BOUNDS_MS", "T2_BOUNDS_MS", "background_mask", "fit"]
