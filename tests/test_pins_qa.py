"""QA with the protocol's DEFAULT thresholds on realistic bad series: each check fires on the
case it exists for, and stays quiet on a good series.  Plus the model-range gate at both ends.

Bad cases (pelvis phantom, real model through onnxruntime):
- TE wrong in the header (a T2w acquired at TE 90 labelled TE 20, e.g. an echo of a
  multi-echo train mislabelled): the TE the model reads from the image disagrees;
- TR wrong in the header (acquired at TR 4000, labelled TR 600);
- a corrupted transfer (every other row lost: zeroed lines), which no PD/T1/T2 can render:
  the self-NRMSE check.
Each test names the check it guards (issue #17): deleting that check makes it fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from rtcontrast.core.inference import QMapModel
from rtcontrast.node.pipeline import check_range
from rtcontrast.node.qa import compute_qa, qa_violations
from rtcontrast.settings.protocol import ProtocolConfig
from tests.support import phantom_image

DEFAULTS = ProtocolConfig.model_validate({
    "version": "qa-defaults",
    "destinations": {"out": {"folder": {"path": "/nonexistent"}}},
    "recipes": [{"key": "T2w", "label": "T2w", "te_ms": 100, "tr_ms": 4000, "series_number": 901,
                 "destinations": ["out"]}],
})


def _qa(model: QMapModel, pixels: np.ndarray, te: float, tr: float) -> tuple[dict[str, Any], list[str]]:
    qa = compute_qa(model.predict(pixels, te, tr), pixels, te, tr)
    return qa, qa_violations(qa, DEFAULTS)


def test_defaults_are_the_documented_ones() -> None:
    """The thresholds these tests rely on, the same as the shipped config/protocol.yaml."""
    import yaml

    from tests.support import REPO

    shipped = yaml.safe_load((REPO / "config" / "protocol.yaml").read_text())["qa"]
    assert (shipped["max_self_nrmse"], shipped["max_te_error_frac"], shipped["max_tr_error_frac"]) == (0.15, 0.6, 0.6)
    assert (DEFAULTS.qa.max_self_nrmse, DEFAULTS.qa.max_te_error_frac, DEFAULTS.qa.max_tr_error_frac) == (0.15, 0.6, 0.6)


@pytest.mark.parametrize(("te", "tr"), [(90.0, 4000.0), (10.0, 500.0)])
def test_good_series_pass_default_qa(model: QMapModel, te: float, tr: float) -> None:
    """Guards against a check that always fires (then 'warn' flags every image and 'hold' sends nothing)."""
    qa, violations = _qa(model, phantom_image(4, 64, te, tr), te, tr)
    assert violations == [], qa
    assert qa["self_nrmse"] < 0.05


def test_wrong_te_in_header_is_a_te_violation(model: QMapModel) -> None:
    """Guards: the TE check (``max_te_error_frac``): image at TE 90, header TE 20."""
    qa, violations = _qa(model, phantom_image(4, 64, 90.0, 4000.0), 20.0, 4000.0)
    assert [v.split(" ")[0] for v in violations] == ["TE"], violations
    assert qa["te_error_frac"] > DEFAULTS.qa.max_te_error_frac
    assert "header 20 ms" in violations[0]


def test_wrong_tr_in_header_is_a_tr_violation(model: QMapModel) -> None:
    """Guards: the TR check (``max_tr_error_frac``): image at TR 4000, header TR 600."""
    qa, violations = _qa(model, phantom_image(4, 64, 90.0, 4000.0), 90.0, 600.0)
    assert [v.split(" ")[0] for v in violations] == ["TR"], violations
    assert qa["tr_error_frac"] > DEFAULTS.qa.max_tr_error_frac
    assert "header 600 ms" in violations[0]


def test_corrupted_rows_are_a_self_nrmse_violation(model: QMapModel) -> None:
    """Guards: the self-NRMSE check (``max_self_nrmse``): a series with every other row lost."""
    img = phantom_image(4, 64, 90.0, 4000.0).copy()
    img[:, ::2] = 0
    qa, violations = _qa(model, img, 90.0, 4000.0)
    assert qa["self_nrmse"] > DEFAULTS.qa.max_self_nrmse
    assert any(v.startswith("self NRMSE") for v in violations), violations


def test_qa_figures_are_what_they_say(model: QMapModel) -> None:
    """Guards the QA record an admin reads: header vs predicted timing, relative errors, scale."""
    img = phantom_image(4, 64, 90.0, 4000.0)
    maps = model.predict(img, 90.0, 4000.0)
    qa = compute_qa(maps, img, 90.0, 4000.0)
    te_pred, tr_pred = float(np.median(maps.te_tr_pred[:, 0])), float(np.median(maps.te_tr_pred[:, 1]))
    assert qa["te_pred_ms"] == pytest.approx(te_pred, abs=1e-3) and qa["tr_pred_ms"] == pytest.approx(tr_pred, abs=1e-3)
    assert qa["te_error_frac"] == pytest.approx(abs(te_pred - 90.0) / 90.0, abs=1e-4)
    assert qa["tr_error_frac"] == pytest.approx(abs(tr_pred - 4000.0) / 4000.0, abs=1e-4)
    assert qa["series_scale"] == pytest.approx(float(np.percentile(img[img > 0], 99.0)), rel=1e-4)
    assert qa["body_voxels"] == int((img > 0.05 * maps.scale).sum())
    p5, p50, p95 = (qa["t2_ms"][k] for k in ("p5", "p50", "p95"))
    assert p5 <= p50 <= p95 and 20.0 < p50 < 500.0  # ms, over the body


@pytest.mark.parametrize(("violated", "qa"), [
    ("self", {"self_nrmse": 0.151, "te_error_frac": 0.0, "tr_error_frac": 0.0}),
    ("TE", {"self_nrmse": 0.0, "te_error_frac": 0.61, "tr_error_frac": 0.0}),
    ("TR", {"self_nrmse": 0.0, "te_error_frac": 0.0, "tr_error_frac": 0.61}),
    (None, {"self_nrmse": 0.15, "te_error_frac": 0.6, "tr_error_frac": 0.6}),  # at the threshold: passes
])
def test_thresholds_are_strict_upper_bounds(violated: str | None, qa: dict[str, float]) -> None:
    """Guards: the comparison direction and the strictness of each threshold."""
    full = {**qa, "te_pred_ms": 1.0, "tr_pred_ms": 1.0, "te_header_ms": 1.0, "tr_header_ms": 1.0}
    got = [v.split(" ")[0] for v in qa_violations(full, DEFAULTS)]
    assert got == ([] if violated is None else [violated])


# ----------------------------------------------------------------------------- range gate


@pytest.mark.parametrize(("te", "tr", "problem"), [
    (8.0, 300.0, None), (150.0, 6000.0, None), (90.0, 4000.0, None),  # the range is inclusive
    (7.9, 4000.0, "TE 7.9 ms outside"), (2.0, 4000.0, "TE 2 ms outside"),  # lower TE bound
    (150.5, 4000.0, "TE 150.5 ms outside"),
    (90.0, 299.0, "TR 299 ms outside"), (90.0, 100.0, "TR 100 ms outside"),  # lower TR bound
    (90.0, 6001.0, "TR 6001 ms outside"),
    (None, 4000.0, "TE missing"), (90.0, None, "TR missing"),
])
def test_range_gate_at_both_ends(model: QMapModel, te: float | None, tr: float | None, problem: str | None) -> None:
    """Guards: the lower (and upper) bounds of the TE/TR range check: a TE 2 ms or TR 100 ms
    series is outside what the model was trained on and must not be rendered from."""
    assert model.info.te_range_ms == (8.0, 150.0) and model.info.tr_range_ms == (300.0, 6000.0)
    got = check_range(model, te, tr)
    if problem is None:
        assert got is None
    else:
        assert got is not None and got.startswith(problem), got


def test_both_out_of_range_are_both_reported(model: QMapModel) -> None:
    got = check_range(model, 5.0, 200.0)
    assert got is not None and "TE 5 ms outside" in got and "TR 200 ms outside" in got


def test_contract_range_helper_agrees(model: QMapModel) -> None:
    """Guards ``ModelInfo.te_tr_in_range`` (the same bounds, used by researchers' tools)."""
    info = model.info
    assert info.te_tr_in_range(8.0, 300.0) and info.te_tr_in_range(150.0, 6000.0)
    assert not info.te_tr_in_range(7.9, 4000.0) and not info.te_tr_in_range(90.0, 299.0)
    assert not info.te_tr_in_range(151.0, 4000.0) and not info.te_tr_in_range(90.0, 6001.0)


def test_hold_on_a_mislabelled_series_sends_nothing(tmp_path: Path, model: QMapModel) -> None:
    """Through the pipeline with default thresholds and action hold: the TE-mislabelled
    series is held with the TE reason, and nothing is queued."""
    from tests.dicomgen import make_series
    from tests.support import geometry, run_series_job

    protocol = ProtocolConfig.model_validate({**DEFAULTS.model_dump(mode="json", exclude_none=True),
                                              "qa": {"action": "hold"}})
    dss = make_series(phantom_image(6, 64, 90.0, 4000.0), te=20.0, tr=4000.0, geometry=geometry(64), uid_seed="qa-te")
    res, _, outbox, job_id = run_series_job(tmp_path, protocol, model, dss)
    assert res.state == "held" and res.reason is not None and res.reason.startswith("QA hold: TE identified"), res.reason
    assert outbox.items(job_id=job_id) == []


def test_flag_datasets_exact_text() -> None:
    """Guards the QA-warning marks a planner sees: ' QA!' appended once, within 64 characters,
    on a series without description too, and the ImageComments text (bounded to 10240)."""
    from pydicom.dataset import Dataset

    from rtcontrast.node.qa import flag_datasets

    plain, full, done, none = Dataset(), Dataset(), Dataset(), Dataset()
    plain.SeriesDescription = "SYNTH T2w TE100 TR4000"
    full.SeriesDescription = "S" * 64
    done.SeriesDescription = "SYNTH T1w QA!"
    flag_datasets([plain, full, done, none], "self NRMSE 0.200 > 0.15")
    assert plain.SeriesDescription == "SYNTH T2w TE100 TR4000 QA!"
    assert full.SeriesDescription == "S" * 60 + " QA!"
    assert done.SeriesDescription == "SYNTH T1w QA!"
    assert none.SeriesDescription == " QA!"
    assert plain.ImageComments == "QA WARNING: self NRMSE 0.200 > 0.15"
    long = Dataset()
    flag_datasets([long], "x" * 20000)
    assert len(long.ImageComments) == 10240 and long.ImageComments.startswith("QA WARNING: xxx")


def test_qa_map_statistics_are_over_the_body() -> None:
    """Guards: the QA percentiles of T1/T2/PD taken over the body (input above 5 % of the series
    scale), over every voxel when there is no body, and PD relative to the series scale."""
    from rtcontrast.core.maps import QMaps

    n = 2
    t1 = np.full((n, 4, 4), 3000.0, np.float32)
    t1[:, :2] = 800.0  # the body: the first two rows
    pixels = np.zeros((n, 4, 4), np.float32)
    pixels[:, :2] = 400.0
    maps = QMaps(pd=np.where(pixels > 0, 200.0, 0.0).astype(np.float32), t1=t1, t2=np.full_like(t1, 80.0),
                 te_tr_pred=np.tile(np.float32([90.0, 4000.0]), (n, 1)), scale=400.0)
    qa = compute_qa(maps, pixels, 90.0, 4000.0)
    assert qa["body_voxels"] == 16
    assert qa["t1_ms"] == {"p5": 800.0, "p50": 800.0, "p95": 800.0}
    assert qa["pd"] == {"p5": 0.5, "p50": 0.5, "p95": 0.5}
    empty = compute_qa(maps, np.zeros_like(pixels), 90.0, 4000.0)  # no body: every voxel counts
    assert empty["body_voxels"] == 0
    assert empty["t1_ms"]["p5"] == 800.0 and empty["t1_ms"]["p95"] == 3000.0 and empty["t1_ms"]["p50"] == 1900.0
