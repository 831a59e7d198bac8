"""Gains between the series of one session: from DICOM and physics, not from the network's anatomy.

Why: each series of a session is stored in its own intensity scale (receiver gain, vendor
scaling), so fusing them needs the gain g_k of every input relative to the first:
S_k = g_k * PD * E(TE_k, TR_k, T1, T2).  Reading g_k from the network's T1/T2 (the 1.1
behaviour) makes every map as wrong as the network wherever the network is wrong (62 % T1
error on a brain, and a different answer depending on which series is first).  Here the
gains come, in this order of precedence, from:

1. **DICOM** when the headers say the series share units (the caller passes them as
   ``known``: identical rescale with a shared-scale protocol, real-world value mapping,
   Philips' private scale slope); the physics estimate below still runs for QA.
2. **The data**, with four or more distinct contrasts: three unknowns per voxel plus K-1
   gains for the whole body are over-determined, so the gains that minimise the fit
   residual over the body are the answer (the residual term below dominates).
3. **Physics**, with three contrasts: three contrasts fit every voxel exactly for
   *any* gains (a gain change is absorbed voxel by voxel by T1/T2, see
   ``tests/test_gains.py``), so the gains are fixed by what no learned anatomy decides:

   * reference tissues the fit recognises itself: **fat** (the brightest voxels of the
     shortest-TR input; recognised when their fitted T2 is fat-like) must have the
     literature fat T1 at the series' field strength; **free fluid** (urine, CSF: the
     brightest voxels of the longest-TE input; recognised when their fitted T1 is long) must
     have a fluid-like T2.  Fluid's T2 is extremely sensitive to the TE pair's gain (a 1 %
     gain error moves 1/T2 by 0.01/dTE), so a loose fluid T2 (+-35 %) pins that gain to
     ~1 %; fat's T1 (+-8 %) pins the TR pair's gain to a few per cent;
   * physical bounds no voxel may leave (T2 of free water <= 3 s, T1 <= 5 s): voxels the
     gains push beyond them add their misfit;
   * the network only as a weak tie-breaker (its mean log T1/T2 disagreement with the fit,
     sigma 3 in log units: it only breaks ties), as the starting point, and as a second opinion
     that the fat voxels are the body's shortest T1 (by its T1 *contrast*, never its values).

With **two** contrasts the fit has a curve of exact solutions in every voxel and cannot
recognise tissues, so the gain is read directly from fat's signal ratio between the inputs
with the literature fat T1 and T2 (:func:`_two_contrast_gains`; ~9 % on the gain).

The objective is symmetric in the inputs (no input is special except as the unit of the
gains), so permuting the inputs permutes the gains and leaves T1/T2 unchanged.
The search is a coarse grid then Nelder-Mead over the K-1 log gains, each evaluation a
batched fit of a fixed voxel sample (:func:`rtcontrast.core.consistency.fit_voxels`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import product

import numpy as np
from scipy.optimize import minimize

#: Physical bounds of tissue relaxation at 1.5-3 T without contrast agent (ms): free water's
#: T1 is ~4-4.5 s and its T2 ~2-2.5 s at body temperature.
PHYS_T1_MS = (50.0, 5000.0)
PHYS_T2_MS = (5.0, 3000.0)
#: Subcutaneous fat T1 (ms) at 1.5 and 3 T (de Bazelaire 2004: 343 +- 37 at 1.5 T, 382 +- 13 at 3 T;
#: Gold 2004: 371 at 3 T); log-interpolated in field strength.  Relative spread used: 8 %.
FAT_T1_MS = {1.5: 330.0, 3.0: 380.0}
FAT_T1_SIGMA_LOG = 0.08
#: Fat T2 (ms, spin echo) at 1.5 and 3 T, used with two contrasts only (fat's signal ratio).
FAT_T2_MS = {1.5: 75.0, 3.0: 68.0}
#: Free fluid (urine, CSF) T2 (ms) and its log spread: 1.2-2.5 s across studies and fields.
FLUID_T2_MS = 1700.0
FLUID_T2_SIGMA_LOG = 0.35
#: Weight of the network's mean log T1/T2 disagreement with the fit (a tie-breaker only).
NETWORK_SIGMA_LOG = 3.0
#: Fraction of the sample taken as fat / fluid candidates (the brightest of one input).
FAT_FRACTION = 0.03
FLUID_FRACTION = 0.02
#: Log-ratio margins that keep the purest candidates (see :func:`_reference_set`).
FAT_MARGIN_LOG = 0.15
FLUID_MARGIN_LOG = 0.15
#: Recognition: the body's 90th-percentile T1 is at least this many times fat's, its 75th-percentile T2 this many times below fluid's.
FAT_CONTRAST = 1.8
FLUID_CONTRAST = 4.0
#: Smallest noise sd (scaled units) the misfit term assumes.
SIGMA_FLOOR = 0.002
#: Voxels in the gain search (a fixed, deterministic sample of the body).
SAMPLE_VOXELS = 4000
#: How many voxels the residual term counts as independent (texture and bias correlate neighbours).
EFFECTIVE_VOXELS = 300.0


@dataclass
class GainResult:
    """The gains [K] relative to input 0, which source decided, and the figures behind it."""

    gains: np.ndarray
    source: str
    detail: dict = field(default_factory=dict)


def fat_t1_ms(field_t: float | None) -> float:
    """Literature fat T1 at ``field_t`` (1.5 T when unknown: the shorter, more common value)."""
    b = 1.5 if not field_t or field_t <= 0 else float(field_t)
    t = np.log(b / 1.5) / np.log(2.0)
    return float(FAT_T1_MS[1.5] * (FAT_T1_MS[3.0] / FAT_T1_MS[1.5]) ** t)


def distinct_contrasts(te_tr: np.ndarray, rtol: float = 0.05) -> int:
    """Number of distinct (TE, TR) pairs (within ``rtol``): what the data can determine."""
    seen: list[tuple[float, float]] = []
    for te, tr in np.asarray(te_tr, float):
        if not any(abs(te - a) <= rtol * a and abs(tr - b) <= rtol * b for a, b in seen):
            seen.append((te, tr))
    return len(seen)


def background_sigma(images: np.ndarray, valid: np.ndarray, background_frac: float) -> np.ndarray:
    """Noise sd per input [K] from the background (every input below ``background_frac``).

    Magnitude noise in air is Rayleigh: E[S^2] = 2 sigma^2.  NaN for an input with fewer than
    100 background voxels (no noise estimate: its QA residual is then not reported).
    """
    k = images.shape[0]
    bg = np.all(~valid | (images < background_frac), axis=0)
    out = np.full(k, np.nan)
    for j in range(k):
        m = bg & valid[j]
        if m.sum() >= 100:
            v = images[j][m].astype(np.float64)
            out[j] = float(np.sqrt(np.mean(v * v) / 2.0))
    return out


def _candidates(values: np.ndarray, frac: float) -> np.ndarray:
    """Indices of the brightest ``frac`` of ``values`` (at least 20 when there are that many)."""
    n = max(20, round(frac * values.size))
    if values.size < 40:
        return np.zeros(0, int)
    return np.argpartition(values, values.size - n)[values.size - n:]


def _reference_set(s: np.ndarray, bright: int, den: int, frac: float, margin: float) -> np.ndarray:
    """Voxels of one reference tissue: a band of log(s[bright] / s[den]) around the brightest voxels' value.

    Why this shape: the brightest ``frac`` of input ``bright`` are mostly the reference tissue
    (fat on the shortest TR, fluid on the longest TE), and among them the highest ratios are
    the purest (marrow and white matter, prostate and blood have ratios lower by far more than
    the noise).  Taking those alone would select the voxels whose *noise* raised the ratio
    (a 7 % short fat T1 on phantoms), so the tissue is the symmetric band +-``margin``
    around that ratio, over every voxel at least 0.6 x as bright: noise then cancels in the
    median.  A gain shifts every ratio alike, so the set does not depend on the gains.
    """
    cand = _candidates(s[:, bright], frac)
    if cand.size == 0 or bright == den:
        return cand
    r_all = np.log(np.maximum(s[:, bright], 1e-6) / np.maximum(s[:, den], 1e-6))
    rc = r_all[cand]
    centre = float(np.median(rc[rc >= np.percentile(rc, 90) - margin]))
    floor = 0.6 * float(np.median(s[cand, bright]))
    keep = np.zeros(0, int)
    for _ in range(2):  # re-centre once on the band itself
        keep = np.flatnonzero((s[:, bright] >= floor) & (np.abs(r_all - centre) <= margin))
        if keep.size < 10:
            return np.zeros(0, int)
        centre = float(np.median(r_all[keep]))
    return keep


def fat_t2_ms(field_t: float | None) -> float:
    """Literature fat T2 (spin echo) at ``field_t``: ~75 ms at 1.5 T, ~68 ms at 3 T (log-interpolated)."""
    b = 1.5 if not field_t or field_t <= 0 else float(field_t)
    t = np.log(b / 1.5) / np.log(2.0)
    return float(FAT_T2_MS[1.5] * (FAT_T2_MS[3.0] / FAT_T2_MS[1.5]) ** t)


def _two_contrast_gains(s: np.ndarray, te: np.ndarray, tr: np.ndarray, fat: np.ndarray, net_t1: np.ndarray,
                        start: np.ndarray, field_t: float | None) -> GainResult:
    """Two contrasts: the fit cannot recognise tissues (every voxel has a curve of exact solutions), so fat's
    *signal ratio* between the inputs is read directly: S_k / S_0 = g_k * E_k(fat) / E_0(fat) with fat's
    literature T1 and T2 (+-8 %, +-10 %: about 9 % on the gain).  Fat is recognised by the ratio band and the
    network's T1 contrast (its values never enter); without fat the network's gains stay, and the source says so.
    """
    k_in = s.shape[1]
    if fat.size < 10 or float(np.median(net_t1[fat])) * FAT_CONTRAST > float(np.percentile(net_t1, 90)):
        return GainResult(np.asarray(start, float), "network (two contrasts, no fat recognised)",
                          {"distinct_contrasts": int(distinct_contrasts(np.stack([te, tr], 1))), "anchors": []})
    f1, f2 = fat_t1_ms(field_t), fat_t2_ms(field_t)
    log_e = np.log(1.0 - np.exp(-tr / f1)) - te / f2
    gains = np.ones(k_in)
    for k in range(1, k_in):
        r = np.log(np.maximum(s[fat, k], 1e-9) / np.maximum(s[fat, 0], 1e-9))
        gains[k] = float(np.exp(np.median(r) - (log_e[k] - log_e[0])))
    return GainResult(gains, "physics: fat signal ratio (two contrasts)",
                      {"distinct_contrasts": 2, "anchors": ["fat"], "fat_voxels": int(fat.size),
                       "fat_t1_reference_ms": round(f1, 1), "fat_t2_reference_ms": round(f2, 1), "field_t": field_t,
                       "dropped": []})


def estimate_gains(images: np.ndarray, te_tr: np.ndarray, valid: np.ndarray, body: np.ndarray,
                   net_pd: np.ndarray, net_t1: np.ndarray, net_t2: np.ndarray, start: np.ndarray,
                   field_t: float | None, fit_voxels: Callable[..., tuple[np.ndarray, ...]],
                   sigma: np.ndarray) -> GainResult:
    """Gains [K] relative to input 0 from the data and physics (see the module docstring).

    ``images`` [K, ...] each divided by its own series scale; ``valid`` [K, ...] where each
    input is a measurement; ``body`` [...] voxels to learn from; ``net_*`` the network's maps
    (start and tie-breaker); ``start`` [K] starting gains (e.g. the network's); ``sigma`` [K]
    noise per input (scaled units); ``fit_voxels(s [V,K], g [K], pd, t1, t2, wk [V,K], sigma [K])``
    -> (pd, t1, t2, chi2 [V]): the voxel fit under physical bounds (a callable, so that this module
    needs no fitting code of its own: :func:`rtcontrast.core.consistency.volume_gains` passes its fit).
    """
    k_in = images.shape[0]
    gains = np.ones(k_in)
    if k_in < 2:
        return GainResult(gains, "single input")
    sel = body & np.all(valid, axis=0)
    idx = np.flatnonzero(sel)
    if idx.size < 200:
        return GainResult(np.asarray(start, float), "network (too few body voxels measured by every input)",
                          {"body_voxels": int(idx.size)})
    if idx.size > SAMPLE_VOXELS:
        idx = idx[np.linspace(0, idx.size - 1, SAMPLE_VOXELS).astype(int)]
    flat = images.reshape(k_in, -1)
    s = flat[:, idx].T.astype(np.float32)  # [V,K]
    wk = np.ones_like(s)
    p0 = net_pd.reshape(-1)[idx].astype(np.float32)
    a0 = net_t1.reshape(-1)[idx].astype(np.float32)
    b0 = net_t2.reshape(-1)[idx].astype(np.float32)
    te, tr = np.asarray(te_tr, float)[:, 0], np.asarray(te_tr, float)[:, 1]
    n_distinct = distinct_contrasts(te_tr)
    # reference-tissue candidates from intensity alone (not from the fit: its noise would select itself)
    k_fat = int(np.argmin(tr)) if tr.max() > 1.5 * tr.min() else None
    k_fluid = int(np.argmax(te)) if te.max() - te.min() >= 30.0 else None
    # fat: brightest on the shortest TR, and among those the highest short/long-TR ratio (marrow, WM are lower);
    # fluid: brightest on the longest TE, and among those the highest long/short-TE ratio (T2 far above tissue's)
    fat = _reference_set(s, k_fat, int(np.argmax(tr)), FAT_FRACTION, FAT_MARGIN_LOG) \
        if k_fat is not None else np.zeros(0, int)
    fluid = _reference_set(s, k_fluid, int(np.argmin(te)), FLUID_FRACTION, FLUID_MARGIN_LOG) \
        if k_fluid is not None else np.zeros(0, int)
    fat_ref = fat_t1_ms(field_t)
    use = {"fat": fat.size > 0, "fluid": fluid.size > 0}
    # noise per input, floored at SNR 500 (noise-free or denoised series would make every misfit infinite)
    sig = np.maximum(np.where(np.isfinite(sigma) & (sigma > 0), sigma, 0.02), SIGMA_FLOOR)

    is_fat = np.zeros(s.shape[0], bool)
    is_fat[fat] = True
    is_fluid = np.zeros(s.shape[0], bool)
    is_fluid[fluid] = True

    warm: dict = {}  # best fit so far on the whole sample: the next evaluation's start (nearby gains, few steps)

    def terms(theta: np.ndarray, sub: np.ndarray | None = None) -> tuple[float, dict]:
        g = np.exp(np.concatenate([[0.0], theta])).astype(np.float32)
        j = np.arange(s.shape[0]) if sub is None else sub
        start_maps = warm["maps"] if sub is None and "maps" in warm else (p0[j], a0[j], b0[j])
        pd, t1, t2, chi2 = fit_voxels(s[j], g, *start_maps, wk[j], sig)
        out: dict = {}
        total = 0.0
        if n_distinct >= 3:  # >= 4: the gains' evidence; 3: exact solutions exist, only voxels pushed out of physics misfit
            total += EFFECTIVE_VOXELS * float(np.mean(np.log1p(chi2)))
            out["mean_chi2"] = float(np.mean(chi2))
        m = is_fat[j]
        if use["fat"] and m.any():
            lt = float(np.median(np.log(t1[m])))
            total += ((lt - np.log(fat_ref)) / FAT_T1_SIGMA_LOG) ** 2
            out["fat_t1_ms"], out["fat_t2_ms"] = float(np.exp(lt)), float(np.median(t2[m]))
        m = is_fluid[j]
        if use["fluid"] and m.any():
            t2f = 1.0 / max(float(np.median(1.0 / t2[m])), 1e-9)
            total += ((np.log(t2f) - np.log(FLUID_T2_MS)) / FLUID_T2_SIGMA_LOG) ** 2
            out["fluid_t2_ms"], out["fluid_t1_ms"] = t2f, float(np.median(t1[m]))
        dn = np.array([np.mean(np.log(t1 / a0[j])), np.mean(np.log(t2 / b0[j]))])
        total += float(np.sum((dn / NETWORK_SIGMA_LOG) ** 2))
        out["network_log_disagreement"] = [round(float(x), 4) for x in dn]
        out["body_t1_p90_ms"], out["body_t2_p75_ms"] = float(np.percentile(t1, 90)), float(np.percentile(t2, 75))
        if sub is None and total < warm.get("total", np.inf):
            warm.update(total=total, maps=(pd, t1, t2))
        return total, out

    if n_distinct < 3:
        return _two_contrast_gains(s, te, tr, fat, a0, start, field_t)
    theta0 = np.log(np.maximum(np.asarray(start, float)[1:], 1e-6))
    source = "data" if n_distinct >= 4 else "physics"
    coarse = np.union1d(np.arange(s.shape[0])[:: max(1, s.shape[0] // 1000)],
                        np.concatenate([fat[:: max(1, fat.size // 300)], fluid[:: max(1, fluid.size // 300)]]))

    def search(best: np.ndarray | None = None) -> np.ndarray:
        if best is None and k_in - 1 <= 2:  # a coarse grid first: the network's start can be far off
            steps = np.linspace(-0.6, 0.6, 7)
            vals = []
            for d in product(steps, repeat=k_in - 1):
                th = theta0 + np.array(d)
                vals.append((terms(th, coarse)[0], tuple(th)))
            best = np.array(min(vals)[1])
        elif best is None:
            best = theta0.copy()
        warm.clear()
        res = minimize(lambda th: terms(th)[0], best, method="Nelder-Mead",
                       options={"xatol": 3e-3, "fatol": 1e-2, "maxfev": 25 * (k_in - 1),
                                "initial_simplex": np.vstack([best] + [best + 0.1 * e for e in np.eye(k_in - 1)])})
        return np.asarray(res.x)

    theta = search()
    _, info = terms(theta)
    # recognition: an anchor whose tissue does not look like that tissue at the answer is dropped
    # (fat: fat-like T2 and clearly the shortest T1 in the body, by the fit and by the network's contrast -
    # a classifier only, its values never enter; fluid: long T1 and far the longest T2 by the fit; the network
    # is not asked there: off its training anatomy it misjudges CSF, and the fit's check already fails for tissue)
    dropped = []
    net_fat = bool(fat.size) and float(np.median(a0[fat])) * FAT_CONTRAST <= float(np.percentile(a0, 90))
    info["network_recognises_fat"] = net_fat
    if use["fat"] and not (25.0 <= info.get("fat_t2_ms", 0.0) <= 200.0 and net_fat
                           and info["body_t1_p90_ms"] >= FAT_CONTRAST * info.get("fat_t1_ms", np.inf)):
        use["fat"] = False
        dropped.append(f"fat (candidates' T2 {info.get('fat_t2_ms', 0.0):.0f} ms, body T1 p90 "
                       f"{info['body_t1_p90_ms']:.0f} ms: not a short-T1 fat cluster)")
    if use["fluid"] and not (info.get("fluid_t1_ms", 0.0) >= 2000.0
                             and info["body_t2_p75_ms"] * FLUID_CONTRAST <= info.get("fluid_t2_ms", 0.0)):
        use["fluid"] = False
        dropped.append(f"fluid (candidates' T1 {info.get('fluid_t1_ms', 0.0):.0f} ms, body T2 p75 "
                       f"{info['body_t2_p75_ms']:.0f} ms: not a long-T2 fluid cluster)")
    if dropped:
        theta = search(theta)
        _, info = terms(theta)
    anchors = [a for a in ("fat", "fluid") if use[a]]
    if source == "physics":
        source = ("physics: " + " + ".join(f"{a} reference" for a in anchors)) if anchors else \
            "network (no reference tissue recognised)"
    info.update({"distinct_contrasts": n_distinct, "anchors": anchors, "dropped": dropped,
                 "fat_t1_reference_ms": round(fat_ref, 1), "field_t": field_t})
    return GainResult(np.exp(np.concatenate([[0.0], theta])), source, info)


__all__ = [
    "PHYS_T1_MS",
    "PHYS_T2_MS",
    "GainResult",
    "background_sigma",
    "distinct_contrasts",
    "estimate_gains",
    "fat_t1_ms",
]
