"""The shipped models come with their weights: a fresh clone fine-tunes them and exports them again with parity.

``models/qmap-pelvis.pt`` and ``models/qmap-pelvis-fusion.pt`` are rebuilt from the ONNX file (rtcontrast.research.warmstart);
these tests hold it to the card's sha256, to the ONNX model's outputs, and to the
researcher's path: ``--init models/qmap-pelvis.pt`` on imported DICOM series, then
``export_onnx.py`` (which checks ONNX against torch).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from rtcontrast.research.model import ModelConfig, QMapFusionNet, QMapNet  # noqa: E402
from rtcontrast.research.train import TrainConfig, train  # noqa: E402
from rtcontrast.research.warmstart import calibration_batch, fusion_calibration_batch, scope_module_name  # noqa: E402
from tests.realdata import build_real_like_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PT = REPO / "models" / "qmap-pelvis.pt"
ONNX = REPO / "models" / "qmap-pelvis.onnx"
FUSION_PT = REPO / "models" / "qmap-pelvis-fusion.pt"
FUSION_ONNX = REPO / "models" / "qmap-pelvis-fusion.onnx"


def test_weights_match_the_card_and_the_onnx_model() -> None:
    card = json.loads(ONNX.with_suffix(".json").read_text())
    assert card["weights"]["sha256"] == hashlib.sha256(PT.read_bytes()).hexdigest()
    ck = torch.load(PT, map_location="cpu", weights_only=True)
    assert ck["contract"] == "qmap/1" and ck["model_config"] == card["architecture"]["model_config"]
    net = QMapNet(ModelConfig(**ck["model_config"]))
    net.load_state_dict(ck["model"])
    net.eval()
    img, tt = calibration_batch(n=4, size=64, seed=777)  # slices the weights were not calibrated on
    sess = ort.InferenceSession(str(ONNX), providers=["CPUExecutionProvider"])
    ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": img.numpy(), "te_tr": tt.numpy()})))
    with torch.no_grad():
        pd, t1, t2, _ = (t.numpy() for t in net(img, tt))
    for got, want in ((t1, ref["t1"]), (t2, ref["t2"]), (pd, ref["pd"])):
        assert float(np.percentile(np.abs(got - want) / (np.abs(want) + 1.0), 99.9)) < 1e-3


def test_fresh_clone_fine_tunes_the_shipped_weights_on_dicom_and_exports(tmp_path: Path) -> None:
    data = tmp_path / "export"
    build_real_like_dataset(data)
    cfg = TrainConfig(name="qmap-site", version="0.0.1-test", steps=2, batch_size=2, patch=32, n_train_subjects=8,
                      n_val=2, lr=1e-4, warmup=1, val_every=2, ckpt_every=2, threads=2,
                      cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "ft"),
                      model={"widths": [4, 4], "id_hidden": 4}, w_phantom=0.5, w_unpaired=0.0, w_paired=1.0,
                      data_dir=str(data), real_batch_size=2)
    train(cfg, init=str(PT))
    ck = torch.load(tmp_path / "ft" / "last.pt", map_location="cpu", weights_only=False)
    assert ck["model_config"]["widths"] == [16, 32, 64, 96, 128] and ck["step"] == 2  # the shipped architecture
    out = tmp_path / "site.onnx"
    r = subprocess.run([sys.executable, str(REPO / "export_onnx.py"), str(tmp_path / "ft" / "last.pt"), "--out",
                        str(out), "--eval-subjects", "0"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["parity"]["ok"] and card["parity"]["p999_relative_error"] <= card["parity"]["tolerance"], card["parity"]


def test_scope_names_resolve_to_torch_module_paths() -> None:
    assert scope_module_name("/single/enc.0/enc.0.0/Conv") == "single.enc.0.0"
    assert scope_module_name("/enc.3/enc.3.3/Conv") == "enc.3.3"
    assert scope_module_name("/fuse.2/fuse.2.0/Conv") == "fuse.2.0"
    assert scope_module_name("/single/head/Conv") == "single.head"
    assert scope_module_name("/head/Conv") == "head"
    assert scope_module_name("Conv_12") is None


def test_fusion_weights_match_the_card_and_the_onnx_model_for_one_and_several_inputs() -> None:
    """The gated network's two branches are written in another order than torch lists them: a wrong pairing fails here."""
    card = json.loads(FUSION_ONNX.with_suffix(".json").read_text())
    assert card["weights"]["sha256"] == hashlib.sha256(FUSION_PT.read_bytes()).hexdigest()
    ck = torch.load(FUSION_PT, map_location="cpu", weights_only=True)
    assert ck["contract"] == "qmap/2" and ck["model_config"] == card["architecture"]["model_config"]
    k = int(card["metadata"]["max_inputs"])
    assert ck["max_inputs"] == k and ck["fusion_options"] == card["architecture"]["fusion_options"]
    net = QMapFusionNet(ModelConfig(**ck["model_config"]), max_inputs=k, **ck["fusion_options"])
    net.load_state_dict(ck["model"])
    net.eval()
    img, tt, present = fusion_calibration_batch(k, n=2 * k, size=64, seed=778)  # 1..k inputs present
    assert set(present.sum(dim=1).tolist()) == set(float(m) for m in range(1, k + 1))
    sess = ort.InferenceSession(str(FUSION_ONNX), providers=["CPUExecutionProvider"])
    feeds = {"image": img.numpy(), "te_tr": tt.numpy(), "present": present.numpy()}
    ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    with torch.no_grad():
        pd, t1, t2, _ = (t.numpy() for t in net(img, tt, present))
    for got, want in ((t1, ref["t1"]), (t2, ref["t2"]), (pd, ref["pd"])):
        assert float(np.percentile(np.abs(got - want) / (np.abs(want) + 1.0), 99.9)) < 1e-3


def test_fresh_clone_fine_tunes_the_shipped_fusion_weights_and_exports(tmp_path: Path) -> None:
    cfg = TrainConfig(name="qmap-site-fusion", version="0.0.1-test", contract="qmap/2", steps=1, batch_size=2,
                      patch=32, n_train_subjects=4, n_val=2, lr=1e-5, warmup=1, val_every=1, ckpt_every=1,
                      threads=2, cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "ft"),
                      model={"widths": [4, 4], "id_hidden": 4}, w_ident=0.0)
    train(cfg, init=str(FUSION_PT))
    ck = torch.load(tmp_path / "ft" / "last.pt", map_location="cpu", weights_only=False)
    assert ck["step"] == 1 and ck["model_config"]["widths"] == [16, 32, 64, 96, 128]
    assert ck["max_inputs"] == 3 and ck["fusion_options"]["gated"] is True
    out = tmp_path / "site-fusion.onnx"
    r = subprocess.run([sys.executable, str(REPO / "export_onnx.py"), str(tmp_path / "ft" / "last.pt"), "--out",
                        str(out), "--eval-subjects", "0"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["contract"] == "qmap/2" and card["metadata"]["max_inputs"] == "3"
    assert card["parity"]["ok"] and card["parity"]["p999_relative_error"] <= card["parity"]["tolerance"], card["parity"]
