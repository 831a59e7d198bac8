"""Warm start from an exported ONNX model: the torch network computes what the ONNX model computes."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export_onnx import export  # noqa: E402
from rtcontrast.research.model import ModelConfig, QMapNet  # noqa: E402
from rtcontrast.research.model_se import QMapSENet  # noqa: E402
from rtcontrast.core.inference import QMapModel  # noqa: E402
from rtcontrast.research.warmstart import load_from_onnx  # noqa: E402

META = {"rtcontrast.contract": "qmap/1", "name": "t", "version": "0", "input_percentile": "99.0",
        "spatial_multiple": "4", "te_range_ms": "8.0,150.0", "tr_range_ms": "300.0,6000.0",
        "field_strengths_t": "1.5,3.0"}


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, QMapNet]:
    torch.manual_seed(3)
    cfg = ModelConfig(widths=[8, 16, 16], id_hidden=8)
    net = QMapNet(cfg)
    with torch.no_grad():  # a "trained" network: non-trivial head and BatchNorm statistics
        net.head.weight.normal_(0, 0.3)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    net.eval()
    out = tmp_path_factory.mktemp("ws") / "src.onnx"
    export(net, out, META)
    return out, net


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(6, 1, 32, 32, generator=g), torch.tensor([[80.0, 3000.0], [10.0, 500.0], [15.0, 4000.0]] * 2)


def test_same_architecture_reproduces_the_onnx_model(source: tuple[Path, QMapNet]) -> None:
    path, _ = source
    img, tt = _batch()
    net = QMapNet(ModelConfig(widths=[8, 16, 16], id_hidden=8))
    info = load_from_onnx(net, path, (img, tt))
    assert info == {"convolutions": 11, "matched_by": "scope name", "widened": 0, "linear_tensors": 4, "batchnorms": 10}
    ref = QMapModel(path, provider="cpu").run_normalised(img.numpy(), tt.numpy())
    for mode in ("eval", "train"):  # train mode (batch statistics) too: that is where fine-tuning starts
        getattr(net, mode)()
        with torch.no_grad():
            got = net(img, tt)
        for name, g in zip(("pd", "t1", "t2", "te_tr_pred"), got):
            np.testing.assert_allclose(g.numpy(), ref[name], rtol=1e-3, atol=1e-4)


def test_qmap3_network_starts_as_the_qmap1_model(source: tuple[Path, QMapNet]) -> None:
    path, _ = source
    img, tt = _batch()
    net = QMapSENet(ModelConfig(widths=[8, 16, 16], id_hidden=8))
    info = load_from_onnx(net, path, (img, tt, torch.full((6, 1), 3.0)))
    assert info["widened"] == 3  # two decoder convs (+ field channel) and the head (+ 3 uncertainty channels)
    ref = QMapModel(path, provider="cpu").run_normalised(img.numpy(), tt.numpy())
    net.eval()
    with torch.no_grad():
        got = net(img, tt, torch.full((6, 1), 1.5))
    for name, g in zip(("pd", "t1", "t2", "te_tr_pred"), got[:4]):
        np.testing.assert_allclose(g.numpy(), ref[name], rtol=1e-3, atol=1e-4)
    assert float(got[4].mean()) == pytest.approx(0.3, rel=1e-3)  # uncertainty channels keep their own start


def test_other_widths_are_refused(source: tuple[Path, QMapNet]) -> None:
    path, _ = source
    img, tt = _batch()
    with pytest.raises(ValueError, match="does not fit|convolutions"):
        load_from_onnx(QMapNet(ModelConfig(widths=[4, 8, 8], id_hidden=8)), path, (img, tt))
