"""qmap/3 end to end: train a tiny model, export it, run it in the node's onnxruntime path with and without
uncertainty outputs; the contract parser; qmap/1 models unchanged by the field argument."""

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

from rtcontrast.core.contract import (  # noqa: E402
    CONTRACT_SE,
    DEFAULT_FIELD_T,
    UNCERTAINTY_OUTPUT_NAMES,
    ContractError,
    parse_metadata,
)
from rtcontrast.core.inference import QMapModel  # noqa: E402
from rtcontrast.research.train import TrainConfig, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
META = {"rtcontrast.contract": CONTRACT_SE, "name": "x", "version": "1", "input_percentile": "99",
        "spatial_multiple": "4", "te_range_ms": "8,150", "tr_range_ms": "300,6000", "field_strengths_t": "1.5,3.0"}


def tiny_se(tmp: Path, steps: int) -> TrainConfig:
    return TrainConfig(contract="qmap/3", steps=steps, batch_size=4, patch=64, n_val=4, lr=3e-3, warmup=2,
                       val_every=steps, ckpt_every=steps, threads=2, cache_dir=str(tmp / "cache"),
                       out_dir=str(tmp / "run"), model={"widths": [8, 16, 16], "id_hidden": 8},
                       se_sources={"pelvis": 6, "random": 6, "abdomen": 4},
                       se_val_sources={"pelvis": 2, "random": 2, "abdomen": 1})


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("se")
    best = train(tiny_se(tmp, 8))
    out = tmp / "se.onnx"
    r = subprocess.run([sys.executable, str(ROOT / "export_onnx.py"), str(best), "--out", str(out), "--eval-subjects",
                        "0", "--save-weights"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr + r.stdout
    return out, best


def test_contract_accepts_qmap3_and_rejects_malformed() -> None:
    info = parse_metadata(META)
    assert info.takes_field and not info.fusion and info.field_strengths_t == (1.5, 3.0)
    for bad in ("0", "-1.5,3", "1.5,abc"):
        with pytest.raises(ContractError, match="field_strengths_t|malformed"):
            parse_metadata({**META, "field_strengths_t": bad})
    with pytest.raises(ContractError, match="qmap/9"):
        parse_metadata({**META, "rtcontrast.contract": "qmap/9"})


def test_qmap3_metadata_on_a_model_without_field_input_is_refused(tmp_path: Path) -> None:
    m = onnx.load(str(ROOT / "models" / "qmap-pelvis.onnx"))
    for p in m.metadata_props:
        if p.key == "rtcontrast.contract":
            p.value = CONTRACT_SE
    onnx.save(m, str(tmp_path / "bad.onnx"))
    with pytest.raises(ContractError, match="field_t"):
        QMapModel(tmp_path / "bad.onnx", provider="cpu")


def test_export_parity_card_and_weights(exported: tuple[Path, Path]) -> None:
    out, best = exported
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["contract"] == CONTRACT_SE and card["parity"]["ok"]
    assert set(UNCERTAINTY_OUTPUT_NAMES) <= set(card["io"]["outputs"]) and "field_t" in card["io"]["inputs"]
    pt = out.with_suffix(".pt")
    import hashlib

    assert card["weights"]["sha256"] == hashlib.sha256(pt.read_bytes()).hexdigest()
    w = torch.load(pt, weights_only=True)  # plain tensors + config: loadable without pickled code
    assert w["contract"] == CONTRACT_SE
    ck = torch.load(best, weights_only=False)
    for k, v in ck["model"].items():
        torch.testing.assert_close(w["model"][k], v)


def test_fine_tune_from_exported_weights(exported: tuple[Path, Path], tmp_path: Path) -> None:
    out, _ = exported
    cfg = replace(tiny_se(tmp_path, 2), out_dir=str(tmp_path / "ft"), cache_dir=str(out.parent / "cache"))
    best = train(cfg, init=str(out.with_suffix(".pt")))
    assert best.exists()


def _strip_uncertainty(src: Path, dst: Path) -> None:
    m = onnx.load(str(src))
    keep = [o for o in m.graph.output if o.name not in UNCERTAINTY_OUTPUT_NAMES]
    del m.graph.output[:]
    m.graph.output.extend(keep)
    onnx.save(m, str(dst))


def test_node_runs_with_and_without_uncertainty_outputs(exported: tuple[Path, Path], tmp_path: Path) -> None:
    out, _ = exported
    vol = np.random.default_rng(0).uniform(0, 800, (3, 37, 41)).astype(np.float32)
    full = QMapModel(out, provider="cpu")
    assert full.uncertainty_outputs == UNCERTAINTY_OUTPUT_NAMES
    q3 = full.predict(vol, 80.0, 3000.0, field_t=3.0)
    assert q3.field_t == 3.0 and not q3.field_t_assumed
    for a in (q3.t1_log_sd, q3.t2_log_sd, q3.pd_sd):
        assert a is not None and a.shape == vol.shape and np.isfinite(a).all() and (a >= 0).all()
    q15 = full.predict(vol, 80.0, 3000.0, field_t=1.5)
    assert not np.allclose(q15.t1, q3.t1)  # the field reaches the model
    qd = full.predict(vol, 80.0, 3000.0)  # header without MagneticFieldStrength
    assert qd.field_t == DEFAULT_FIELD_T and qd.field_t_assumed
    np.testing.assert_allclose(qd.t1, q15.t1, rtol=1e-5)
    # pd_sd is in stored-value units like pd: scaling the series scales both
    q3x = full.predict(vol * 4, 80.0, 3000.0, field_t=3.0)
    np.testing.assert_allclose(q3x.pd_sd, q3.pd_sd * 4, rtol=2e-3, atol=1e-3)
    _strip_uncertainty(out, tmp_path / "plain.onnx")
    plain = QMapModel(tmp_path / "plain.onnx", provider="cpu")
    assert plain.uncertainty_outputs == ()
    qp = plain.predict(vol, 80.0, 3000.0, field_t=3.0)
    assert qp.t1_log_sd is None and qp.pd_sd is None
    np.testing.assert_allclose(qp.t1, q3.t1, rtol=1e-5)


def test_qmap1_models_ignore_the_field_argument() -> None:
    m = QMapModel(ROOT / "models" / "qmap-pelvis.onnx", provider="cpu")
    vol = np.random.default_rng(1).uniform(0, 800, (1, 48, 48)).astype(np.float32)
    a, b = m.predict(vol, 80.0, 3000.0), m.predict(vol, 80.0, 3000.0, field_t=3.0)
    np.testing.assert_array_equal(a.t1, b.t1)
    assert a.field_t is None and a.t1_log_sd is None
