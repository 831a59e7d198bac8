"""Training data of the ``qmap/3`` model: pelvis + upper abdomen + random-geometry phantoms, with field strength.

Why a mix: pelvis slices keep the in-domain quality, random-geometry slices
(:mod:`rtcontrast.research.random_phantom`) make anatomy useless as a cue so the network must read
relaxation from intensity, TE/TR and field, and the abdomen adds a second real-looking
anatomy.  The maps are generated once per seed range and cached (like
:mod:`rtcontrast.research.dataset`); every batch re-acquires them with
:func:`rtcontrast.research.acquisition.acquire_se` (fast-spin-echo blurring, resolution, bias,
gain, Rician noise) at a fresh contrast.  The evaluation-only phantoms
(:mod:`rtcontrast.research.eval_phantoms`) are never imported here.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from rtcontrast.research import abdomen_phantom
from rtcontrast.research import acquisition
from rtcontrast.research import phantom
from rtcontrast.research import random_phantom
from rtcontrast.research import tissue_prior
from rtcontrast.core.contract import series_scale
from rtcontrast.research.dataset import INPUT_PERCENTILE, Sample

SOURCES: tuple[str, ...] = ("pelvis", "random", "abdomen")
#: Seeds of each source are offset so that the sources never share a seed stream.
SOURCE_OFFSET = {"pelvis": 0, "random": 10_000_000, "abdomen": 20_000_000}


@dataclass
class MixedBank:
    """Stacked maps [N,H,W] of all sources, their field strengths [N] and source index [N]."""

    pd: np.ndarray
    t1: np.ndarray
    t2: np.ndarray
    labels: np.ndarray
    field_t: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return int(self.pd.shape[0])

    def maps(self, i: int) -> phantom.Maps:
        return phantom.Maps(self.pd[i], self.t1[i], self.t2[i], self.labels[i], (1.0, 1.0), float(self.field_t[i]))


def _one(args: tuple[str, int, int]) -> tuple[np.ndarray, ...]:
    source, seed, size = args
    if source == "pelvis":
        m = phantom.random_slice(seed, (size, size))
    elif source == "random":
        m = random_phantom.random_maps(seed + SOURCE_OFFSET["random"], (size, size))
    elif source == "abdomen":
        m = abdomen_phantom.abdomen_maps(seed + SOURCE_OFFSET["abdomen"], (size, size))
    else:
        raise ValueError(f"unknown source {source!r}")
    return m.pd, m.t1, m.t2, m.labels, np.float32(m.field_t)


def build_mixed_bank(counts: dict[str, tuple[int, int]], size: int, cache_dir: Path | None = None,
                     workers: int = 2) -> MixedBank:
    """Maps for ``counts`` = {source: (first seed, stop seed)}, cached by generator source code."""
    mods = (phantom, random_phantom, abdomen_phantom, tissue_prior)
    src = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in mods)).hexdigest()
    key = hashlib.sha256(json.dumps([sorted(counts.items()), size, src]).encode()).hexdigest()[:16]
    path = cache_dir / f"mixed_{size}_{key}.npz" if cache_dir else None
    if path is not None and path.exists():
        z = np.load(path)
        return MixedBank(z["pd"], z["t1"], z["t2"], z["labels"], z["field_t"], z["source"])
    jobs = [(s, seed, size) for s in SOURCES if s in counts for seed in range(*counts[s])]
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            out = list(tqdm(ex.map(_one, jobs, chunksize=8), total=len(jobs), desc="phantoms", leave=False))
    else:
        out = [_one(j) for j in tqdm(jobs, desc="phantoms", leave=False)]
    bank = MixedBank(*(np.stack([o[k] for o in out]) for k in range(5)),
                     source=np.array([SOURCES.index(j[0]) for j in jobs], np.uint8))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, pd=bank.pd, t1=bank.t1, t2=bank.t2, labels=bank.labels, field_t=bank.field_t, source=bank.source)
        tmp.replace(path)
    return bank


@dataclass
class FieldSample(Sample):
    """A :class:`rtcontrast.research.dataset.Sample` with the acquisition's field strength (T)."""

    field_t: float = 1.5


def make_sample(maps: phantom.Maps, te: float, tr: float, rng: np.random.Generator,
                scale_jitter: float = 0.0) -> FieldSample:
    """Acquire ``maps`` with the non-ideal SE model and normalise per the contract (series scale)."""
    acq = acquisition.acquire_se(maps, te, tr, rng)
    s = series_scale(acq.image, INPUT_PERCENTILE)
    if scale_jitter:
        s *= float(np.exp(rng.uniform(-scale_jitter, scale_jitter)))
    return FieldSample(image=acq.image / s, clean=acq.clean / s,
                       pd_img=(maps.pd * acq.gain * acq.bias / s).astype(np.float32), t1=maps.t1, t2=maps.t2,
                       labels=maps.labels, te=te, tr=tr, field_t=float(maps.field_t))
