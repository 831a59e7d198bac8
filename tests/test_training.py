"""A short real training run lowers the loss; resume continues exactly; export keeps parity."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from rtcontrast.contract import CONTRACT, ContractError  # noqa: E402
from rtcontrast.qmap import QMapModel  # noqa: E402
from rtcontrast.train import TrainConfig, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def tiny(tmp: Path, steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=4, patch=64, n_train_subjects=16, n_val=4, lr=3e-3, warmup=2,
                       val_every=steps, ckpt_every=5, threads=2, cache_dir=str(tmp / "cache"), out_dir=str(tmp / "run"),
                       model={"widths": [8, 16, 16], "id_hidden": 8})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainConfig]:
    tmp = tmp_path_factory.mktemp("train")
    cfg = tiny(tmp, 30)
    best = train(cfg)
    return best, cfg


def test_short_training_lowers_validation_loss(trained: tuple[Path, TrainConfig]) -> None:
    best, cfg = trained
    ck = torch.load(Path(cfg.out_dir) / "last.pt", weights_only=False)
    hist = ck["history"]
    assert hist[0]["step"] == 0 and hist[-1]["step"] == 30
    assert hist[-1]["total"] < 0.9 * hist[0]["total"], hist


def test_resume_continues_exactly(tmp_path: Path) -> None:
    straight = train(replace(tiny(tmp_path / "a", 10), out_dir=str(tmp_path / "a")))
    cfg_b = replace(tiny(tmp_path / "b", 10), out_dir=str(tmp_path / "b"))
    train(cfg_b, stop_after=5)
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=False)["step"] == 5
    train(cfg_b, resume=str(tmp_path / "b" / "last.pt"))
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    assert straight.exists()


def test_export_parity_and_contract(trained: tuple[Path, TrainConfig], tmp_path: Path) -> None:
    best, _ = trained
    out = tmp_path / "tiny.onnx"
    r = subprocess.run([sys.executable, str(ROOT / "export_onnx.py"), str(best), "--out", str(out),
                        "--eval-subjects", "0", "--version", "0.0.1-test"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "parity" in r.stdout
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["parity"]["ok"] and card["version"] == "0.0.1-test"
    m = QMapModel(out, provider="cpu")
    assert card["sha256"] == m.sha256
    assert m.info.spatial_multiple == 4
    # dynamic N, H, W (multiples of the spatial multiple), non-square
    x = np.random.default_rng(0).uniform(0, 1, (3, 1, 48, 80)).astype(np.float32)
    o = m.run_normalised(x, np.array([[80, 3000]] * 3, np.float32))
    assert o["pd"].shape == (3, 1, 48, 80) and o["te_tr_pred"].shape == (3, 2)
    # a model declaring another contract is refused with a message that says so
    bad = onnx.load(str(out))
    for p in bad.metadata_props:
        if p.key == "rtcontrast.contract":
            p.value = "qmap/99"
    onnx.save(bad, str(tmp_path / "bad.onnx"))
    with pytest.raises(ContractError, match=f"qmap/99.*{CONTRACT}"):
        QMapModel(tmp_path / "bad.onnx", provider="cpu")
