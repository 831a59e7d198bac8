"""The shipped qmap-pelvis comes with its weights: a fresh clone fine-tunes it and exports it again with parity.

``models/qmap-pelvis.pt`` is rebuilt from the ONNX file (rtcontrast.research.warmstart);
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

from rtcontrast.research.model import ModelConfig, QMapNet  # noqa: E402
from rtcontrast.research.train import TrainConfig, train  # noqa: E402
from rtcontrast.research.warmstart import calibration_batch  # noqa: E402
from tests.realdata import build_real_like_dataset  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PT = REPO / "models" / "qmap-pelvis.pt"
ONNX = REPO / "models" / "qmap-pelvis.onnx"


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
