"""Phantom batches made ahead by worker processes (rtcontrast.research.prefetch, ``data_workers``): the same batches
as in-process, the same run for any number of workers, exact resume."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from rtcontrast.research import prefetch  # noqa: E402
from rtcontrast.research.train import TrainConfig, train, training_bank  # noqa: E402
from tests.test_training import tiny  # noqa: E402


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "last.pt", weights_only=False)["model"]


def test_workers_make_the_batches_each_step_defines(tmp_path: Path) -> None:
    """Batches from two forked workers, asked for out of order, equal the step's batch made in this process; two
    steps differ."""
    cfg = replace(tiny(tmp_path, 10), data_workers=2)
    bank = training_bank(cfg)
    with prefetch.Prefetcher(bank, cfg, 0, 3, 2) as pf:
        got = {s: pf.get(s) for s in (3, 4, 6, 5, 9)}
    for s, b in got.items():
        want = prefetch.batch_for_step(bank, cfg, 0, s)
        assert b.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(b[k], want[k], err_msg=f"step {s} {k}")
    assert not np.array_equal(got[3]["image"], got[4]["image"])


def test_a_run_does_not_depend_on_the_worker_count_and_resumes_exactly(tmp_path: Path) -> None:
    one = replace(tiny(tmp_path / "one", 8), data_workers=1, out_dir=str(tmp_path / "one"))
    two = replace(tiny(tmp_path / "two", 8), data_workers=2, out_dir=str(tmp_path / "two"))
    cut = replace(tiny(tmp_path / "cut", 8), data_workers=2, out_dir=str(tmp_path / "cut"))
    train(one)
    train(two)
    train(cut, stop_after=4)
    train(cut, resume=str(tmp_path / "cut" / "last.pt"))
    a, b, c = _weights(tmp_path / "one"), _weights(tmp_path / "two"), _weights(tmp_path / "cut")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a[k], c[k], rtol=1e-4, atol=1e-5)
    hist = torch.load(tmp_path / "two" / "last.pt", weights_only=False)["history"]
    assert hist[-1]["step"] == 8 and np.isfinite(hist[-1]["total"])


@pytest.mark.parametrize("bad", [{"data_workers": -1}, {"data_workers": 2, "prefetch_per_worker": 0},
                                 {"data_workers": 2, "w_phantom": 0.5, "w_unpaired": 1.0, "data_dir": "x"}])
def test_inconsistent_worker_settings_are_refused(bad: dict) -> None:
    with pytest.raises(SystemExit, match="data_workers"):
        TrainConfig(**bad).check()
