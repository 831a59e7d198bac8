"""Phantom training data: a bank of ground-truth map slices plus on-the-fly acquisitions.

Rendering a phantom slice costs ~0.1-0.2 s, an acquisition (bias, gain, Rician noise at
a random contrast) ~1 ms.  So the maps are generated once per seed range (in parallel,
cached as .npz under the cache folder keyed by the generator settings), and every batch
re-acquires them at fresh contrasts, noise and bias: the network never sees the same
image twice.

Seeds: training uses [0, n_train); validation and evaluation use seeds from
``HELDOUT_SEED_BASE`` upwards, never used in training.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rtcontrast.research import phantom
from rtcontrast.core.contract import series_scale
from rtcontrast.core.physics import SEED_CONTRASTS

HELDOUT_SEED_BASE = 1_000_000
TE_RANGE_MS = (8.0, 150.0)
TR_RANGE_MS = (300.0, 6000.0)
FIELD_STRENGTHS_T = (1.5, 3.0)
INPUT_PERCENTILE = 99.0


@dataclass
class Bank:
    """Stacked ground-truth maps [N,H,W] (float32; labels uint8)."""

    pd: np.ndarray
    t1: np.ndarray
    t2: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.pd.shape[0])

    def maps(self, i: int) -> phantom.Maps:
        return phantom.Maps(self.pd[i], self.t1[i], self.t2[i], self.labels[i], (1.0, 1.0), 0.0)


def _one(args: tuple[int, int]) -> tuple[np.ndarray, ...]:
    seed, size = args
    m = phantom.random_slice(seed, (size, size))
    return m.pd, m.t1, m.t2, m.labels


def build_bank(seeds: range, size: int, cache_dir: Path | None = None, workers: int = 2) -> Bank:
    """Generate (or load from cache) the maps of ``random_slice(seed)`` for every seed."""
    # The cache key includes the generator's source, so editing phantom.py invalidates it.
    src = hashlib.sha256(Path(phantom.__file__).read_bytes()).hexdigest()
    key = hashlib.sha256(json.dumps([seeds.start, seeds.stop, size, src]).encode()).hexdigest()[:16]
    path = cache_dir / f"bank_{seeds.start}_{seeds.stop}_{size}_{key}.npz" if cache_dir else None
    if path is not None and path.exists():
        z = np.load(path)
        return Bank(z["pd"], z["t1"], z["t2"], z["labels"])
    out: list[tuple[np.ndarray, ...]] = []
    jobs = [(s, size) for s in seeds]
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            for r in tqdm(ex.map(_one, jobs, chunksize=8), total=len(jobs), desc="phantoms", leave=False):
                out.append(r)
    else:
        out = [_one(j) for j in tqdm(jobs, desc="phantoms", leave=False)]
    bank = Bank(*(np.stack([o[k] for o in out]) for k in range(4)))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, pd=bank.pd, t1=bank.t1, t2=bank.t2, labels=bank.labels)
        tmp.replace(path)
    return bank


def random_contrast(rng: np.random.Generator, p_seed: float = 0.5) -> tuple[float, float]:
    """One of the seed's five contrasts with probability ``p_seed``, else random TE/TR."""
    if rng.random() < p_seed:
        te, tr = SEED_CONTRASTS[int(rng.integers(len(SEED_CONTRASTS)))]
        return float(te), float(tr)
    te = float(rng.uniform(*TE_RANGE_MS))
    tr = float(np.exp(rng.uniform(np.log(TR_RANGE_MS[0]), np.log(TR_RANGE_MS[1]))))
    return te, tr


#: The acquisitions a pelvic RT protocol pairs: a T1-weighted and a T2-weighted (T)SE series.
T1W_TE_MS, T1W_TR_MS = (8.0, 20.0), (350.0, 800.0)
T2W_TE_MS, T2W_TR_MS = (70.0, 140.0), (2500.0, 6000.0)


def complementary_pair(rng: np.random.Generator) -> list[tuple[float, float]]:
    """A random T1w and a random T2w contrast, in random order.

    Why: independent random contrasts are often two similar weightings, which carry little
    more than one; the protocol that fusion serves acquires one of each.
    """
    def draw(te_r: tuple[float, float], tr_r: tuple[float, float]) -> tuple[float, float]:
        te = float(rng.uniform(*te_r))
        return te, float(np.exp(rng.uniform(np.log(tr_r[0]), np.log(tr_r[1]))))

    pair = [draw(T1W_TE_MS, T1W_TR_MS), draw(T2W_TE_MS, T2W_TR_MS)]
    return pair if rng.random() < 0.5 else pair[::-1]


@dataclass
class Sample:
    """One network input with everything its losses need, in input units (divided by s)."""

    image: np.ndarray  # [H,W] acquired / s
    clean: np.ndarray  # noise-free acquired / s
    pd_img: np.ndarray  # truth PD in input units: PD * gain * bias / s
    t1: np.ndarray
    t2: np.ndarray
    labels: np.ndarray
    te: float
    tr: float


def make_sample(maps: phantom.Maps, te: float, tr: float, rng: np.random.Generator, scale_jitter: float = 0.0) -> Sample:
    """Acquire ``maps`` at TE/TR with random bias/gain/noise and normalise per ``qmap/1``."""
    acq = phantom.acquire(maps, te, tr, rng)
    s = series_scale(acq.image, INPUT_PERCENTILE)
    if scale_jitter:
        s *= float(np.exp(rng.uniform(-scale_jitter, scale_jitter)))
    return Sample(
        image=acq.image / s,
        clean=acq.clean / s,
        pd_img=(maps.pd * acq.gain * acq.bias / s).astype(np.float32),
        t1=maps.t1,
        t2=maps.t2,
        labels=maps.labels,
        te=te,
        tr=tr,
    )


@dataclass
class MultiSample:
    """``qmap/2`` input: K slots, some present, each divided by its own series scale.

    Truth (``clean``, ``pd_img``) is in the units of the first present input, like the
    model's PD.  All inputs share one receive-bias field (same coil, same session) but
    have their own gain and noise (the scanner scales each series on its own).
    """

    image: np.ndarray  # [K,H,W]
    te_tr: np.ndarray  # [K,2]
    present: np.ndarray  # [K]
    clean: np.ndarray  # [H,W] first present input, noise-free
    pd_img: np.ndarray
    t1: np.ndarray
    t2: np.ndarray
    labels: np.ndarray
    te: float  # first present input's TE/TR
    tr: float


def make_multi_sample(maps: phantom.Maps, contrasts: list[tuple[float, float]], slots: list[int], k: int,
                      rng: np.random.Generator, scale_jitter: float = 0.0) -> MultiSample:
    """Acquire ``maps`` at each contrast into ``slots`` of ``k`` (others absent, zero)."""
    h, w = maps.pd.shape
    image = np.zeros((k, h, w), np.float32)
    te_tr = np.zeros((k, 2), np.float32)
    present = np.zeros(k, np.float32)
    bias_strength = float(rng.uniform(0.0, 0.25))
    bias = phantom.bias_field(rng, maps.pd.shape, bias_strength)
    first = min(slots)
    truth: tuple[np.ndarray, np.ndarray] | None = None
    for (te, tr), slot in zip(contrasts, slots):
        acq = phantom.acquire(maps, te, tr, rng, bias_strength=0.0)
        gain_b = bias  # shared coil sensitivity
        img = acq.image * gain_b
        s = series_scale(img, INPUT_PERCENTILE)
        if scale_jitter:
            s *= float(np.exp(rng.uniform(-scale_jitter, scale_jitter)))
        image[slot] = img / s
        te_tr[slot] = (te, tr)
        present[slot] = 1.0
        if slot == first:
            truth = ((acq.clean * gain_b / s).astype(np.float32), (maps.pd * acq.gain * gain_b / s).astype(np.float32))
    assert truth is not None
    return MultiSample(image=image, te_tr=te_tr, present=present, clean=truth[0], pd_img=truth[1], t1=maps.t1,
                       t2=maps.t2, labels=maps.labels, te=float(te_tr[first, 0]), tr=float(te_tr[first, 1]))


def stack(samples: list[Sample] | list[MultiSample]) -> dict[str, np.ndarray]:
    """Batch samples: image [N,1|K,H,W], te_tr [N,2] (qmap/1) or [N,K,2] + present [N,K] (qmap/2).

    ``te_tr0`` [N,2] is always the (first present) input's TE/TR and ``clean``/``pd_img``
    are in its units, so the losses do not depend on the contract.
    """
    out = {k: np.stack([getattr(s, k) for s in samples])[:, None].astype(np.float32)
           for k in ("clean", "pd_img", "t1", "t2")}
    out["labels"] = np.stack([s.labels for s in samples])[:, None]
    out["te_tr0"] = np.array([[s.te, s.tr] for s in samples], dtype=np.float32)
    if isinstance(samples[0], MultiSample):
        out["image"] = np.stack([s.image for s in samples]).astype(np.float32)
        out["te_tr"] = np.stack([s.te_tr for s in samples]).astype(np.float32)
        out["present"] = np.stack([s.present for s in samples]).astype(np.float32)
    else:
        out["image"] = np.stack([s.image for s in samples])[:, None].astype(np.float32)
        out["te_tr"] = out["te_tr0"].copy()
    return out
