"""A qmap/3 model's own uncertainty QA limits: calibrated on in-domain series, carried in its metadata.

The node reads them through the contract (``rtcontrast.qa_limits``); a malformed entry is a
contract error with the reason, not a silently ignored limit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from rtcontrast.core.contract import ContractError, parse_metadata
from rtcontrast.core.inference import QMapModel
from rtcontrast.research import qa_calibration

REPO = Path(__file__).resolve().parents[1]
SE = REPO / "models" / "qmap-se.onnx"

META = {"rtcontrast.contract": "qmap/3", "name": "m", "version": "1", "input_percentile": "99",
        "spatial_multiple": "16", "te_range_ms": "8,150", "tr_range_ms": "300,6000", "field_strengths_t": "1.5,3"}


def test_limits_parse_from_metadata_and_bad_entries_are_refused() -> None:
    assert parse_metadata(META).qa_limits == {}
    info = parse_metadata({**META, "rtcontrast.qa_limits": '{"t1_rel_sd": 0.8, "t2_rel_sd": 0.9}'})
    assert info.qa_limits == {"t1_rel_sd": 0.8, "t2_rel_sd": 0.9}
    for bad in ("0.8", "{not json", '{"t3_rel_sd": 0.5}', '{"t1_rel_sd": -1}', '{"t1_rel_sd": "high"}'):
        with pytest.raises(ContractError, match="qa_limits"):
            parse_metadata({**META, "rtcontrast.qa_limits": bad})


def test_limit_is_the_largest_in_domain_figure_with_headroom() -> None:
    rows = [{"t1_rel_sd": 0.2, "t2_rel_sd": 0.5}, {"t1_rel_sd": 0.4, "t2_rel_sd": 0.3}]
    lim = qa_calibration.limits_from(rows, margin=1.5)
    assert lim == {"t1_rel_sd": 0.6, "t2_rel_sd": 0.75}  # no PD figures: no PD limit


def test_limits_written_to_the_model_reach_the_node_and_the_card(tmp_path: Path) -> None:
    onnx_path = tmp_path / "qmap-se.onnx"
    shutil.copy(SE, onnx_path)
    shutil.copy(SE.with_suffix(".json"), onnx_path.with_suffix(".json"))
    model = QMapModel(onnx_path, provider="cpu")
    rows = qa_calibration.calibration_figures(model, n_subjects=1, n_slices=1)
    assert len(rows) == 5 and all(0 < r["t1_rel_sd"] < 10 and 0 < r["t2_rel_sd"] < 10 for r in rows)
    lim = qa_calibration.limits_from(rows)
    sha = qa_calibration.write_limits(onnx_path, lim, rows)
    assert QMapModel(onnx_path, provider="cpu").info.qa_limits == lim
    card = json.loads(onnx_path.with_suffix(".json").read_text())
    assert card["sha256"] == sha == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    assert card["qa_calibration"]["limits"] == lim and len(card["qa_calibration"]["figures"]) == 5


def test_generalisation_judges_series_with_the_models_limits_as_the_node_does(tmp_path: Path) -> None:
    """The card's QA rows use the model's own limits (from its metadata), as the node does: limits no series can
    meet hold every series of both splits, and the rows say which limits they used."""
    from rtcontrast.research.evaluate_se import generalisation

    onnx_path = tmp_path / "qmap-se.onnx"
    shutil.copy(SE, onnx_path)
    qa_calibration.write_metadata(onnx_path, {"t1_rel_sd": 0.01, "t2_rel_sd": 0.01, "pd_rel_sd": 0.01})
    tight = generalisation(onnx_path, n_subjects=1, n_slices=1)
    for split in tight["splits"].values():
        assert split["summary"]["qa_held"] == "5/5" and split["summary"]["qa_passed"] == "0/5"
        assert all(r["qa_limits"]["t1_rel_sd"] == 0.01 for r in split["inputs"].values())
