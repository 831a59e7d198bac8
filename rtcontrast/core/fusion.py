"""Fused maps of several series that re-render every input, whichever series is the target.

Why a module of its own: the 1.1 path ran the network with the target first, read the
gains from the network's T1/T2 and fitted with the network as a tight prior, so the maps
of one set of series depended on which series was the target (T1 45 % / T2 122 % with the
T2w first against 18 % / 3 % with the T1w first through the node).  Here:

1. the network runs on the inputs in a canonical order (TR, then TE), so its answer (the
   fit's start and weak tie-breaker) is the same whatever the target;
2. the gains come from DICOM when the caller knows them, else from the data and physics
   (:func:`rtcontrast.core.consistency.volume_gains`); the physics estimate always runs, so
   QA can compare the gains used with it;
3. every voxel is fitted with the prior rule of :func:`rtcontrast.core.consistency.prior_sigma_for`;
4. PD is expressed in the target's (first input's) stored-value units and the figures the
   fusion QA needs are attached (``QMaps.fusion``): per input the RMS misfit against the
   background noise and its shift against the target (:func:`body_shift_voxels`), the fraction of body voxels at the physical T1/T2 bounds, the
   network-fit disagreement, and the gains with their source.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from rtcontrast.core.consistency import Settings, refine, volume_gains
from rtcontrast.core.contract import series_scale
from rtcontrast.core.maps import QMaps

#: Relative distance to a physical bound that counts as "at the bound".
AT_BOUND_REL = 0.02


class _Model(Protocol):
    info: Any

    def predict_multi(self, inputs: list[tuple[np.ndarray, float, float]], batch_size: int = 8) -> QMaps: ...


def canonical_order(te_tr: list[tuple[float, float]]) -> list[int]:
    """Input indices sorted by (TR, TE, original index): the network's input order for any target."""
    return sorted(range(len(te_tr)), key=lambda i: (round(float(te_tr[i][1]), 3), round(float(te_tr[i][0]), 3), i))


def fused_consistent(model: _Model, inputs: list[tuple[np.ndarray, float, float]], batch_size: int,
                     settings: Settings, valid: list[np.ndarray | None] | None, field_t: float | None,
                     known_gains: tuple[list[float], str] | None) -> QMaps:
    """Maps of ``inputs`` (first = target, PD in its units) fitted to every input; see the module docstring."""
    k = len(inputs)
    shape = inputs[0][0].shape
    masks = [np.ones(shape, bool) if v is None else np.asarray(v, bool) for v in (valid or [None] * k)]
    if len(masks) != k or any(m.shape != shape for m in masks):
        raise ValueError(f"valid: one mask of shape {shape} (or None) per input expected")
    order = canonical_order([(te, tr) for _, te, tr in inputs])
    net = model.predict_multi([inputs[i] for i in order], batch_size)  # network only, canonical order
    scales = [series_scale(inputs[i][0], model.info.input_percentile) for i in order]
    tt = np.array([(inputs[i][1], inputs[i][2]) for i in order], np.float64)
    ok = np.stack([masks[i] for i in order])
    img = np.stack([inputs[i][0] * np.float32(1.0 / sc) for i, sc in zip(order, scales)])
    img = np.where(ok & np.isfinite(img), img, 0.0).astype(np.float32)
    pd_n = (net.pd / np.float32(net.scale)).astype(np.float32)  # canonical first input's scaled units
    est = volume_gains(img, tt, ok, pd_n, net.t1, net.t2, settings, field_t)
    pos0 = order.index(0)
    if known_gains is not None:  # stored value per common physical unit, per input: gain = factor / series scale
        f = np.asarray(known_gains[0], np.float64)
        if f.shape != (k,) or not np.all(np.isfinite(f) & (f > 0)):
            raise ValueError(f"known_gains: {k} positive factors expected, got {known_gains[0]!r}")
        gains = np.array([f[i] / sc for i, sc in zip(order, scales)])
        gains /= gains[0]
        source = known_gains[1]
    elif settings.shared_scale:
        gains = np.array([scales[0] / sc for sc in scales])
        source = "protocol: shared_scale (ratio of the series scales)"
    else:
        gains, source = est.gains, est.source
    pd = np.empty(shape, np.float32)
    t1 = np.empty_like(pd)
    t2 = np.empty_like(pd)
    for i in range(shape[0]):
        p, a, b, _ = refine(img[:, i], tt, pd_n[i], net.t1[i], net.t2[i], settings, gains=gains, valid=ok[:, i])
        pd[i], t1[i], t2[i] = p, a, b
    figures = _figures(img, ok, tt, gains, est, pd, t1, t2, net, settings, order, source)
    g0 = float(gains[pos0])
    scale0 = series_scale(inputs[0][0], model.info.input_percentile)
    # S_target = g_target * PD * E  ->  PD in the target's scaled units is g_target * PD; then its stored units
    pd *= np.float32(g0 * scale0)
    g_rel = [float(gains[order.index(j)] / g0) for j in range(k)]
    return QMaps(pd=pd, t1=t1, t2=t2, te_tr_pred=net.te_tr_pred, scale=scale0, input_gains=g_rel, fusion=figures)


def _figures(img: np.ndarray, ok: np.ndarray, tt: np.ndarray, gains: np.ndarray, est: Any, pd: np.ndarray,
             t1: np.ndarray, t2: np.ndarray, net: QMaps, settings: Settings, order: list[int],
             source: str) -> dict[str, Any]:
    """QA figures of a fused fit, per input in the caller's order (JSON-serialisable)."""
    k = img.shape[0]
    body = (pd > 0) & (t1 > 0) & np.all(ok, axis=0) & np.all(img > 2 * settings.background_frac, axis=0)
    sigma = np.asarray([np.nan if v is None else v for v in est.detail.get("sigma", [None] * k)], float)
    per_input: list[dict[str, Any]] = [{} for _ in range(k)]
    if body.any():
        e1 = 1.0 - np.exp(-tt[:, 1][:, None] / t1[body][None, :])
        model = gains[:, None] * pd[body][None, :] * e1 * np.exp(-tt[:, 0][:, None] / t2[body][None, :])
        rms = np.sqrt(np.mean((model - img[:, body]) ** 2, axis=1))
        for c in range(k):
            shift = (0.0, 0.0) if order[c] == 0 else body_shift_voxels(img[order.index(0)], img[c])
            per_input[order[c]] = {
                "shift_voxels": round(float(np.hypot(*shift)), 2),
                "te_ms": float(tt[c, 0]), "tr_ms": float(tt[c, 1]),
                "gain": round(float(gains[c] / gains[order.index(0)]), 4),
                "noise_sigma": None if not np.isfinite(sigma[c]) else round(float(sigma[c]), 5),
                "residual_rms": round(float(rms[c]), 5),
                "residual_over_noise": (None if not np.isfinite(sigma[c]) or sigma[c] <= 0
                                        else round(float(rms[c] / sigma[c]), 3)),
            }
        lo1, hi1 = settings.t1_bounds_ms
        lo2, hi2 = settings.t2_bounds_ms
        b1, b2 = t1[body], t2[body]
        at = ((b1 <= lo1 * (1 + AT_BOUND_REL)) | (b1 >= hi1 * (1 - AT_BOUND_REL))
              | (b2 <= lo2 * (1 + AT_BOUND_REL)) | (b2 >= hi2 * (1 - AT_BOUND_REL)))
        n1 = np.maximum(net.t1[body], 1e-3)
        n2 = np.maximum(net.t2[body], 1e-3)
        at_bounds = float(at.mean())
        dis_t1 = float(np.median(np.abs(np.log(b1 / n1))))
        dis_t2 = float(np.median(np.abs(np.log(b2 / n2))))
    else:
        at_bounds, dis_t1, dis_t2 = 0.0, 0.0, 0.0
    g_phys = est.gains / est.gains[order.index(0)]
    g_used = gains / gains[order.index(0)]
    gain_vs_physics = float(np.max(np.abs(np.log(g_used / g_phys))))
    detail = {kk: v for kk, v in est.detail.items() if kk not in ("sigma",)}
    return {
        "gain_source": source,
        "physics_gains": [round(float(g_phys[order.index(j)]), 4) for j in range(k)],
        "physics_source": est.source,
        "gain_vs_physics_log": round(gain_vs_physics, 4),
        "gain_detail": _jsonable(detail),
        "network_order": order,
        "inputs": per_input,
        "body_voxels": int(body.sum()),
        "at_bounds_frac": round(at_bounds, 4),
        "network_fit_log_disagreement": {"t1": round(dis_t1, 4), "t2": round(dis_t2, 4)},
    }


def body_shift_voxels(target: np.ndarray, partner: np.ndarray, frac: float = 0.1) -> tuple[float, float]:
    """In-plane shift (rows, columns; voxels) of ``partner``'s body outline against ``target``'s.

    Why: a partner that moved (patient motion between series, a wrong geometry) cannot be
    fitted with the target voxel by voxel, and with three contrasts the fit absorbs it into
    wild T1/T2 without a misfit.  The body outline (every voxel above ``frac`` of the series'
    99th percentile, averaged over slices) is the same in every contrast, so the peak of its
    circular cross-correlation (FFT; parabolic sub-voxel refinement) says how far the partner
    moved.
    """
    def mask(v: np.ndarray) -> np.ndarray:
        m = (v > frac * max(float(np.percentile(v, 99)), 1e-12)).mean(axis=0).astype(np.float64)
        return m - m.mean()

    a, b = mask(target), mask(partner)
    xc = np.real(np.fft.ifft2(np.fft.fft2(b) * np.conj(np.fft.fft2(a))))
    peak = np.unravel_index(int(np.argmax(xc)), xc.shape)
    out = []
    for ax, p in enumerate(peak):
        n = xc.shape[ax]
        idx = [list(peak), list(peak)]
        idx[0][ax], idx[1][ax] = (p - 1) % n, (p + 1) % n
        ym, y0, yp = xc[tuple(idx[0])], xc[peak], xc[tuple(idx[1])]
        den = ym - 2 * y0 + yp
        sub = 0.5 * (ym - yp) / den if den < 0 else 0.0
        s = p + sub
        out.append(float(s - n if s > n / 2 else s))
    return out[0], out[1]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(a): _jsonable(b) for a, b in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return round(float(x), 4)
    if isinstance(x, (np.integer,)):
        return int(x)
    return x


__all__ = ["body_shift_voxels", "canonical_order", "fused_consistent"]
