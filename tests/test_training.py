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

from rtcontrast.core.contract import CONTRACT, ContractError  # noqa: E402
from rtcontrast.core.inference import QMapModel  # noqa: E402
from rtcontrast.research.train import TrainConfig, train  # noqa: E402

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


def test_fusion_model_from_single_trains_and_exports(trained: tuple[Path, TrainConfig], tmp_path: Path) -> None:
    """qmap/2: starts as the trained qmap/1 network, trains, exports, and runs 1..K inputs in the node path."""
    from rtcontrast.research.model import ModelConfig, QMapNet, fusion_from_single

    best, cfg = trained
    ck = torch.load(best, weights_only=False)
    single = QMapNet(ModelConfig(**ck["model_config"])).eval()
    single.load_state_dict(ck["model"])
    fused = fusion_from_single(ck["model"], ModelConfig(**ck["model_config"]), 3).eval()
    x = torch.rand(2, 1, 32, 48)
    tt = torch.tensor([[80.0, 3000.0], [10.0, 500.0]])
    xs = torch.zeros(2, 3, 32, 48)
    xs[:, :1] = x
    tts = torch.zeros(2, 3, 2)
    tts[:, 0] = tt
    with torch.no_grad():
        for a, b in zip(single(x, tt), fused(xs, tts, torch.tensor([[1.0, 0, 0], [1.0, 0, 0]]))):
            torch.testing.assert_close(a, b)
    fcfg = replace(cfg, contract="qmap/2", max_inputs=3, p_inputs=[0.3, 0.4, 0.3], init_single=str(best), steps=4,
                   val_every=4, ckpt_every=4, out_dir=str(tmp_path / "fusion"))
    fbest = train(fcfg)
    out = tmp_path / "fusion.onnx"
    r = subprocess.run([sys.executable, str(ROOT / "export_onnx.py"), str(fbest), "--out", str(out),
                        "--eval-subjects", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = QMapModel(out, provider="cpu")
    assert m.info.fusion and m.info.max_inputs == 3
    vol = np.random.default_rng(1).uniform(0, 1000, (2, 40, 44)).astype(np.float32)
    one = m.predict(vol, 80, 3000)
    two = m.predict_multi([(vol, 80, 3000), (vol * 0.5, 10, 500)])
    assert one.pd.shape == two.pd.shape == (2, 40, 44)
    with pytest.raises(ValueError, match="at most 3"):
        m.predict_multi([(vol, 80, 3000)] * 4)
    # --single-branch gates an ungated fusion checkpoint at export: single input = the qmap/1 model, fused unchanged
    gated_out = tmp_path / "fusion_gated.onnx"
    single_out = tmp_path / "single.onnx"
    for args in ([str(fbest), "--out", str(gated_out), "--single-branch", str(best)], [str(best), "--out", str(single_out)]):
        r = subprocess.run([sys.executable, str(ROOT / "export_onnx.py"), *args, "--eval-subjects", "0"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    g, s1 = QMapModel(gated_out, provider="cpu"), QMapModel(single_out, provider="cpu")
    np.testing.assert_allclose(g.predict(vol, 80, 3000).t1, s1.predict(vol, 80, 3000).t1, rtol=2e-3)
    np.testing.assert_allclose(g.predict_multi([(vol, 80, 3000), (vol * 0.5, 10, 500)]).t1, two.t1, rtol=1e-4)


def test_gated_fusion_single_input_is_the_single_model(trained: tuple[Path, TrainConfig], tmp_path: Path) -> None:
    """Gated qmap/2: training moves the fused branch only; one input present gives the qmap/1 answer exactly,
    in torch and after export through onnxruntime; two inputs give a different (fused) answer."""
    from rtcontrast.research.model import ModelConfig, QMapNet

    best, cfg = trained
    ck = torch.load(best, weights_only=False)
    fcfg = replace(cfg, contract="qmap/2", max_inputs=2, p_inputs=[0.0, 1.0], p_complementary=0.5,
                   init_single=str(best), fusion_gated=True, fusion_log_input=True, steps=4, val_every=4,
                   ckpt_every=4, out_dir=str(tmp_path / "gated"))
    fbest = train(fcfg)
    fck = torch.load(fbest, weights_only=False)
    assert fck["fusion_options"] == {"gated": True, "log_input": True}
    for k, v in ck["model"].items():  # the frozen branch did not move (weights nor BatchNorm statistics)
        torch.testing.assert_close(fck["model"]["single." + k], v, rtol=0, atol=0)
    from rtcontrast.research.model import QMapFusionNet

    params = {n for n, _ in QMapFusionNet(ModelConfig(**ck["model_config"]), 2, gated=True,
                                           log_input=True).named_parameters()}
    moved = [k for k in params if not k.startswith("single.") and k in ck["model"]
             and fck["model"][k].shape == ck["model"][k].shape and not torch.equal(fck["model"][k], ck["model"][k])]
    assert moved, "training did not change the fused branch's weights"
    out = tmp_path / "gated.onnx"
    r = subprocess.run([sys.executable, str(ROOT / "export_onnx.py"), str(fbest), "--out", str(out),
                        "--eval-subjects", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    single = QMapNet(ModelConfig(**ck["model_config"])).eval()
    single.load_state_dict(ck["model"])
    x = np.random.default_rng(2).uniform(0, 1, (2, 1, 32, 48)).astype(np.float32)
    tt = np.array([[80.0, 3000.0], [10.0, 500.0]], np.float32)
    with torch.no_grad():
        ref = single(torch.from_numpy(x), torch.from_numpy(tt))
    m = QMapModel(out, provider="cpu")
    xs = np.concatenate([x, np.zeros_like(x)], axis=1)
    tts = np.stack([tt, np.zeros_like(tt)], axis=1)
    o1 = m.session.run(None, {"image": xs, "te_tr": tts, "present": np.array([[1, 0], [1, 0]], np.float32)})
    for a, b in zip(ref, o1):
        np.testing.assert_allclose(b, a.numpy(), rtol=2e-3, atol=1e-4)
    xs2 = np.concatenate([x, np.random.default_rng(3).uniform(0, 1, x.shape).astype(np.float32)], axis=1)
    tts2 = np.stack([tt, tt[::-1]], axis=1)
    o2 = m.session.run(None, {"image": xs2, "te_tr": tts2, "present": np.ones((2, 2), np.float32)})
    assert not np.allclose(o2[1], o1[1])
    # --single-branch: another qmap/1 checkpoint becomes the single-input case; the fused case is unchanged
    other = dict(ck)
    other["model"] = {k: (v * 1.05 if k == "head.bias" else v) for k, v in ck["model"].items()}
    torch.save(other, tmp_path / "other.pt")
    single.load_state_dict(other["model"])
    with torch.no_grad():
        ref2 = single(torch.from_numpy(x), torch.from_numpy(tt))
    out2 = tmp_path / "gated2.onnx"
    r = subprocess.run([sys.executable, str(ROOT / "export_onnx.py"), str(fbest), "--out", str(out2),
                        "--eval-subjects", "0", "--single-branch", str(tmp_path / "other.pt")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(out2.with_suffix(".json").read_text())["training"]["single_branch"]["checkpoint"].endswith("other.pt")
    m2 = QMapModel(out2, provider="cpu")
    o1b = m2.session.run(None, {"image": xs, "te_tr": tts, "present": np.array([[1, 0], [1, 0]], np.float32)})
    np.testing.assert_allclose(o1b[1], ref2[1].numpy(), rtol=2e-3, atol=1e-4)
    assert not np.allclose(o1b[1], o1[1])
    o2b = m2.session.run(None, {"image": xs2, "te_tr": tts2, "present": np.ones((2, 2), np.float32)})
    np.testing.assert_allclose(o2b[1], o2[1], rtol=1e-5)


def test_time_budget_stops_with_a_decayed_schedule(tmp_path: Path) -> None:
    """time_budget_s: the run ends by the clock (validated and checkpointed) with the learning rate decayed."""
    import csv

    from rtcontrast.research.train import lr_at

    cfg = replace(tiny(tmp_path, 10_000), out_dir=str(tmp_path / "tb"), time_budget_s=4.0, val_every=10_000)
    best = train(cfg)
    ck = torch.load(Path(cfg.out_dir) / "last.pt", weights_only=False)
    assert 0 < ck["step"] < 10_000 and ck["elapsed_total_s"] >= 4.0
    assert best.exists() and ck["history"][-1]["step"] == ck["step"]  # validated where it stopped
    rows = list(csv.DictReader((Path(cfg.out_dir) / "metrics.csv").open()))
    # cosine ran out with the clock, not with the steps: the last step started at most about one step before the
    # budget ended, so its rate is at most the schedule's there (robust to slow steps on a loaded machine)
    ends = [0.0] + [float(r["elapsed_s"]) for r in rows]
    slack = 2 * max(b - a for a, b in zip(ends, ends[1:]))
    last = int(rows[-1]["step"])
    assert last < 10_000
    assert float(rows[-1]["lr"]) <= lr_at(last - 1, cfg, elapsed_s=max(0.0, cfg.time_budget_s - slack)) * 1.0001
    assert lr_at(last - 1, cfg, elapsed_s=cfg.time_budget_s) <= 0.03 * cfg.lr  # at the budget: fully decayed
    assert lr_at(100, cfg, elapsed_s=2.0) < lr_at(100, cfg, elapsed_s=0.0)
