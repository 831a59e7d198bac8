"""The researchers' loop: real-like DICOM folder -> train (unpaired + paired) -> export + report -> node runs it.

Tiny widths and patches, a few steps: these tests check that the loop works end to end
(and that torchrun with two CPU processes produces the same kind of checkpoint), not
model quality.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml

torch = pytest.importorskip("torch")

from rtcontrast.settings.node import NodeConfig  # noqa: E402
from rtcontrast.core.contract import ContractError  # noqa: E402
from rtcontrast.node.cli import cmd_models  # noqa: E402
from rtcontrast.node.service import Node  # noqa: E402
from rtcontrast.settings.protocol import ProtocolConfig  # noqa: E402
from rtcontrast.core.inference import QMapModel  # noqa: E402
from rtcontrast.research.realdata_source import RealDataSource  # noqa: E402
from rtcontrast.research.train import TrainConfig, train  # noqa: E402
from tests.conftest import dcmtk, free_port  # noqa: E402
from tests.realdata import build_real_like_dataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def tiny_real(tmp: Path, data: Path, out: str = "run", steps: int = STEPS, threads: int = 2) -> TrainConfig:
    return TrainConfig(name="qmap-site-test", version="0.0.1-test", steps=steps, batch_size=2, patch=32,
                       n_train_subjects=8, n_val=2, lr=3e-3, warmup=1, val_every=steps, ckpt_every=2, threads=threads,
                       cache_dir=str(tmp / "cache"), out_dir=str(tmp / out),
                       model={"widths": [8, 16, 16], "id_hidden": 8}, w_phantom=0.5, w_unpaired=1.0, w_paired=1.0,
                       data_dir=str(data), real_batch_size=4, disc={"widths": [8, 16], "dropout": 0.2})


@pytest.fixture(scope="module")
def realdata(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("export")
    return root, build_real_like_dataset(root)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, realdata: tuple[Path, dict[str, Any]]) -> TrainConfig:
    tmp = tmp_path_factory.mktemp("train")
    cfg = tiny_real(tmp, realdata[0])
    train(cfg)
    return cfg


def test_real_source_normalises_pairs_and_crops(realdata: tuple[Path, dict[str, Any]]) -> None:
    root, info = realdata
    src = RealDataSource.from_folder(root, patch=48)  # larger than the 32x32 series: zero padded
    assert len(src.series) == len(info["eligible"]) == 4
    for s in src.series:  # qmap/1 normalisation: the 99th percentile of voxels > 0 is 1
        assert abs(float(np.percentile(s.pixels[s.pixels > 0], 99)) - 1) < 1e-4
    assert len(src.pairs) == 2  # patient A: T1w -> T2w and T2w -> T1w
    rng = np.random.default_rng(0)
    b = src.paired_batch(rng, 3)
    assert b["image"].shape == b["target"].shape == (3, 1, 48, 48)
    assert {tuple(t) for t in b["te_tr"].tolist()} <= {(8.0, 500.0), (90.0, 4000.0)}
    assert (b["te_tr"] != b["target_te_tr"]).any(axis=1).all()
    u = src.unpaired_batch(rng, 5)
    assert u["image"].shape == (5, 1, 48, 48) and u["te_tr"].shape == (5, 2)


def test_training_on_real_folder_logs_and_checkpoints(trained: TrainConfig) -> None:
    out = Path(trained.out_dir)
    ck = torch.load(out / "last.pt", weights_only=False)
    assert ck["step"] == STEPS and "disc" in ck and "disc_optimizer" in ck and "real_rng" in ck
    assert ck["real_data"]["series"] == 4 and ck["real_data"]["paired_directions"] == 2
    assert ck["real_data"]["patients"] == 3
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    for key in ("total", "render", "u_self", "u_id_real", "u_id_render", "u_adv", "d_loss", "p_cross", "lr"):
        assert all(math.isfinite(float(r[key])) for r in rows), key
    assert rows[-1]["val_real_cross"] and rows[-1]["val_render"]
    assert (out / "best.pt").exists()


def test_export_report_and_node_runs_the_model(trained: TrainConfig, realdata: tuple[Path, dict[str, Any]],
                                                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, info = realdata
    models = tmp_path / "models"
    onnx_path = models / "qmap-site-test.onnx"
    r = subprocess.run([sys.executable, str(ROOT / "export_onnx.py"), str(Path(trained.out_dir) / "best.pt"), "--out",
                        str(onnx_path), "--eval-subjects", "0", "--report", "--report-data", str(root),
                        "--report-subjects", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    card = json.loads(onnx_path.with_suffix(".json").read_text())
    assert card["data"]["real"]["series"] == 4 and card["report"] == "qmap-site-test.report/report.md"
    rep_dir = models / "qmap-site-test.report"
    md = (rep_dir / "report.md").read_text()
    for fig in ("bland_altman_T2w_75.png", "phantom_example_T2w_75.png", "real_identification_selfconsistency.png"):
        assert (rep_dir / fig).stat().st_size > 1000 and fig in md
    assert "## Real data" in md and "Paired series" in md
    everything = md + (rep_dir / "report.json").read_text()
    for secret in info["sensitive"]:
        assert secret not in everything

    # the node: pinned by name and sha256, receives patient A's T2w from storescu, derives with the model named
    model = QMapModel(onnx_path, "cpu")
    var = tmp_path / "var"
    config = NodeConfig.model_validate({
        "bind_host": "127.0.0.1", "port": free_port(), "var_dir": str(var), "series_idle_timeout_s": 1.5,
        "release_grace_s": 0.3, "model_path": str(onnx_path), "limits": {"min_free_disk_bytes": 0},
        "delivery": {"max_attempts": 5, "base_delay_s": 0.3, "max_delay_s": 1.0, "poll_interval_s": 0.2}})
    export = tmp_path / "out"
    proto = {"version": "site", "destinations": {"out": {"folder": {"path": str(export)}}},
             "qa": {"max_self_nrmse": 10.0, "max_te_error_frac": 100.0, "max_tr_error_frac": 100.0, "action": "warn"},
             "recipes": [{"key": "T1w", "label": "T1w", "te_ms": 10, "tr_ms": 500, "series_number": 901,
                          "destinations": ["out"]}],
             "model": {"name": "qmap-site-test", "sha256": model.sha256}}
    node = Node(config, ProtocolConfig.model_validate(proto))
    assert node.model.sha256 == model.sha256
    node.start()
    try:
        files = sorted((root / "DOE_JANE_RTC-A-1001" / "S4_T2").rglob("*.dcm"))
        assert files
        sent = subprocess.run([dcmtk("storescu"), "-aet", "SCANNER", "-aec", "RTCONTRAST", "-to", "10", "-ta", "10",
                               "-td", "20", "127.0.0.1", str(node.port), *map(str, files)],
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        deadline = time.monotonic() + 60
        out_files: list[Path] = []
        while time.monotonic() < deadline:
            out_files = list(export.rglob("*.dcm")) if export.exists() else []
            if len(out_files) >= len(files) and node.idle():
                break
            time.sleep(0.2)
        assert len(out_files) == len(files), "derived series not delivered"
    finally:
        node.stop(timeout_s=10)
    ds = pydicom.dcmread(out_files[0])
    assert "qmap-site-test 0.0.1-test" in str(ds.SoftwareVersions)
    assert model.sha256[:12] in str(ds.DerivationDescription)
    conn = sqlite3.connect(config.db_file)
    try:
        row = conn.execute("SELECT model_name, model_version, model_sha256 FROM jobs").fetchone()
    finally:
        conn.close()
    assert row == ("qmap-site-test", "0.0.1-test", model.sha256)

    # a pin that names another file is refused before anything listens, with a message that says why
    bad = {**proto, "model": {"name": "qmap-site-test", "sha256": "0" * 64}}
    with pytest.raises(ContractError, match="pins model 'qmap-site-test'.*differs"):
        Node(config, ProtocolConfig.model_validate(bad))
    with pytest.raises(ContractError, match="no model of that name"):
        Node(config, ProtocolConfig.model_validate({**proto, "model": {"name": "other", "sha256": model.sha256}}))
    # node.py models: lists the card and marks the model in use
    (tmp_path / "node.yaml").write_text(yaml.safe_dump({"model_path": str(onnx_path)}))
    assert cmd_models(tmp_path / "node.yaml", None) == 0
    listed = capsys.readouterr().out
    assert f"* qmap-site-test.onnx: qmap-site-test 0.0.1-test [qmap/1] sha256 {model.sha256[:12]}" in listed
    assert "fine-tuned on 4 real series of 3 patient(s)" in listed


def test_torchrun_two_cpu_processes(trained: TrainConfig, realdata: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    cfg = replace(tiny_real(tmp_path, realdata[0], "ddp", steps=3, threads=1), cache_dir=trained.cache_dir)
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(asdict(cfg)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "rtcontrast.research.train", "--config", str(tmp_path / "ddp.yaml")],
                       capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)
    one = torch.load(Path(trained.out_dir) / "last.pt", weights_only=False)
    assert sorted(ddp) == sorted(one) and ddp["step"] == 3
    assert sorted(ddp["model"]) == sorted(one["model"])  # no DDP "module." prefix
    rows = list(csv.DictReader((tmp_path / "ddp" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]  # rank 0 only writes


def test_finetune_init_unpaired_only_and_onnx_refused(trained: TrainConfig, realdata: tuple[Path, dict[str, Any]],
                                                     tmp_path: Path) -> None:
    best = Path(trained.out_dir) / "best.pt"
    cfg = replace(tiny_real(tmp_path, realdata[0], "ft", steps=2), w_phantom=0.0, w_paired=0.0,
                  model={"widths": [4, 4], "id_hidden": 4}, cache_dir=trained.cache_dir)
    train(cfg, init=str(best))
    ck = torch.load(tmp_path / "ft" / "last.pt", weights_only=False)
    assert ck["model_config"]["widths"] == [8, 16, 16]  # the init checkpoint's architecture
    assert ck["train_config"]["init"] == str(best) and ck["step"] == 2
    with pytest.raises(SystemExit, match="ONNX model cannot be fine-tuned"):
        train(replace(cfg, out_dir=str(tmp_path / "ft2")), init=str(tmp_path / "x.onnx"))
    with pytest.raises(SystemExit, match="need data_dir"):
        train(replace(cfg, data_dir=None))
