"""Phantom batches made ahead of the training step by worker processes (``data_workers`` in the training config).

Why: every batch re-acquires its phantoms with the non-ideal SE simulator (an FFT per echo of the train, bias, noise,
on the CPU): about 0.12 s for twelve 128x128 slices.  On two CPU cores that is a tenth of a step; on a GPU, where the
step itself takes milliseconds, it is nearly all of it, and the accelerator would wait on one CPU core.  Forked
workers (sharing the phantom bank copy-on-write) make the batches of the next steps while the current one trains.

Every step's batch and its render targets come from generators seeded by (seed, rank, step) alone, so a run is the
same for any number of workers and whatever order they finish in, and ``--resume`` continues exactly without a
generator state.  (With ``data_workers: 0`` training draws from one sequential generator, as it always has.)
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np

from rtcontrast.research.train_config import TrainConfig
from rtcontrast.research.train_losses import make_batch

#: Generator streams of one step.
BATCH_STREAM, TARGET_STREAM = 0, 1

_bank: Any = None
_cfg: TrainConfig | None = None
_rank = 0


def step_rng(cfg: TrainConfig, rank: int, step: int, stream: int) -> np.random.Generator:
    """The generator of one step's ``stream`` (batch or render targets) on one rank."""
    return np.random.default_rng([cfg.seed, rank, step, stream])


def batch_for_step(bank: Any, cfg: TrainConfig, rank: int, step: int) -> dict[str, np.ndarray]:
    """The phantom batch of ``step`` on ``rank`` (slices and acquisition drawn from the step's own generator)."""
    rng = step_rng(cfg, rank, step, BATCH_STREAM)
    idx = rng.integers(0, len(bank), cfg.batch_size)
    return make_batch(bank, idx, rng, cfg)


def _init(bank: Any, cfg: TrainConfig, rank: int) -> None:
    global _bank, _cfg, _rank
    _bank, _cfg, _rank = bank, cfg, rank


def _work(step: int) -> dict[str, np.ndarray]:
    assert _cfg is not None
    return batch_for_step(_bank, _cfg, _rank, step)


class Prefetcher:
    """Keeps ``workers * cfg.prefetch_per_worker`` future batches in flight; :meth:`get` returns one step's batch."""

    def __init__(self, bank: Any, cfg: TrainConfig, rank: int, first_step: int, workers: int) -> None:
        # fork: the bank is shared, not pickled; the workers only run numpy (never torch or CUDA)
        self._ex = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init,
                                       initargs=(bank, cfg, rank))
        self._depth = max(1, workers * cfg.prefetch_per_worker)
        self._next = first_step
        self._pending: dict[int, Future[dict[str, np.ndarray]]] = {}

    def get(self, step: int) -> dict[str, np.ndarray]:
        if step not in self._pending and step >= self._next:
            self._next = step
        while self._next < step + self._depth:
            self._pending[self._next] = self._ex.submit(_work, self._next)
            self._next += 1
        fut = self._pending.pop(step, None)
        return fut.result() if fut is not None else self._ex.submit(_work, step).result()

    def close(self) -> None:
        self._ex.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
