"""A less ideal spin-echo acquisition for training: k-space resolution, fast-spin-echo T2 blurring, Rician noise.

Why: :func:`rtcontrast.research.phantom.acquire` is an ideal SE image (signal equation per voxel +
noise).  Scanners acquire turbo/fast spin echo: the k-space lines of one image are read
at different echo times of an echo train, so each tissue's high spatial frequencies are
T2-weighted at other TEs than its contrast (the effective TE at the k-space centre) -
edges of short-T2 tissue blur, fluid does not.  They also acquire fewer k-space samples
than the displayed matrix (interpolated, smoother images).  A network trained on ideal
images alone meets both as unknown texture.

Model (per slice): S_j = gain * bias * PD * (1 - exp(-TR/T1)) * exp(-TE_j/T2) for each
echo j of the train; 2D FFT; phase-encode line ky takes its value from echo
j(ky) = j0 + floor(ky * ETL / N) (linear ordering, the k-space centre at the effective
TE); a centred low-pass window (fraction of k-space acquired, Tukey edge); inverse FFT;
complex Gaussian noise; magnitude.  numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rtcontrast.research.phantom import Acquisition, Maps, bias_field
from rtcontrast.core.physics import weighting


@dataclass(frozen=True)
class Nuisance:
    """The acquisition's random settings (recorded for tests and debugging)."""

    etl: int  # echo train length (1 = conventional SE)
    echo_spacing_ms: float
    phase_axis: int
    k_fraction: float  # fraction of k-space acquired along each axis (1 = full resolution)
    snr: float
    bias_strength: float
    gain: float


def draw_nuisance(rng: np.random.Generator, te: float, p_fse: float = 0.6, p_lowres: float = 0.5) -> Nuisance:
    """Random acquisition settings; FSE trains longer for long-TE (T2w) contrasts, as on scanners."""
    etl = 1
    es = float(rng.uniform(6.0, 14.0))
    if rng.random() < p_fse:
        etl = int(rng.integers(2, 6)) if te < 30 else int(rng.integers(4, 25))
    kf = float(rng.uniform(0.5, 1.0)) if rng.random() < p_lowres else 1.0
    snr = float(np.exp(rng.uniform(np.log(10.0), np.log(150.0))))
    return Nuisance(etl=etl, echo_spacing_ms=es, phase_axis=int(rng.integers(2)), k_fraction=kf, snr=snr,
                    bias_strength=float(rng.uniform(0.0, 0.35)),
                    gain=float(np.exp(rng.uniform(np.log(50), np.log(5000)))))


def _window(n: int, frac: float) -> np.ndarray:
    """Centred k-space window (FFT order): 1 inside ``frac`` of k-space with a cosine edge, 0 outside."""
    k = np.abs(np.fft.fftfreq(n)) * 2.0  # 0 .. 1
    if frac >= 1.0:
        return np.ones(n, np.float32)
    edge = 0.15 * frac
    w = np.clip((frac - k) / edge, 0.0, 1.0)
    return (0.5 - 0.5 * np.cos(np.pi * w)).astype(np.float32)


def echo_index(n: int, etl: int, j0: int) -> np.ndarray:
    """Echo number of every phase-encode line (FFT order), linear ordering with the centre at echo ``j0``."""
    ky = np.fft.fftfreq(n) * n  # -n/2 .. n/2-1, 0 first
    j = j0 + np.floor(ky * etl / n + 0.5).astype(int)
    return np.clip(j, 0, etl - 1)


def acquire_se(maps: Maps, te: float, tr: float, rng: np.random.Generator, nuisance: Nuisance | None = None) -> Acquisition:
    """Simulate a magnitude (fast) spin-echo image of ``maps`` at effective ``te`` and ``tr``."""
    nu = nuisance or draw_nuisance(rng, te)
    b = bias_field(rng, maps.pd.shape, nu.bias_strength)
    base = (nu.gain * b * maps.pd).astype(np.float32)
    h, w = maps.pd.shape
    if nu.etl > 1:
        # echo times around the effective TE: j0 echoes before it, the rest after (all > 0)
        j0 = int(min(max(round(te / nu.echo_spacing_ms) - 1, 0), nu.etl // 2))
        tes = te + nu.echo_spacing_ms * (np.arange(nu.etl) - j0)
        tes = np.maximum(tes, 0.5 * nu.echo_spacing_ms)
        n_pe = h if nu.phase_axis == 0 else w
        lines = echo_index(n_pe, nu.etl, j0)
        k = np.zeros((h, w), np.complex64)
        for j in np.unique(lines):
            kj = np.fft.fft2(base * weighting(float(tes[j]), tr, maps.t1, maps.t2))
            sel = lines == j
            if nu.phase_axis == 0:
                k[sel, :] = kj[sel, :]
            else:
                k[:, sel] = kj[:, sel]
    else:
        k = np.fft.fft2(base * weighting(te, tr, maps.t1, maps.t2)).astype(np.complex64)
    if nu.k_fraction < 1.0:
        k *= _window(h, nu.k_fraction)[:, None] * _window(w, nu.k_fraction)[None, :]
    clean_c = np.fft.ifft2(k)
    clean = np.abs(clean_c).astype(np.float32)
    body = clean[maps.pd > 0]
    peak = float(np.percentile(body, 99)) if body.size else 1.0
    sigma = peak / nu.snr
    noisy = clean_c + sigma * (rng.standard_normal((h, w)) + 1j * rng.standard_normal((h, w)))
    return Acquisition(image=np.abs(noisy).astype(np.float32), clean=clean, bias=b, gain=nu.gain, sigma=sigma)
