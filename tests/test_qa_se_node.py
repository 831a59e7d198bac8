"""The shipped qmap-se through the node with the default protocol: a pelvis series is sent, a head is held.

Issue #12 ("the node uses it"): out-of-distribution series are held by default, with a reason a
physicist understands, by the model's own uncertainty against the limits calibrated into the
model (``rtcontrast.qa_limits``).  The pelvis series here are new seeds (not training, not the
calibration split); the head phantoms come from the evaluation-only generator that no training
code imports.  Real model, real onnxruntime, real SQLite, the pipeline's own run_job.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rtcontrast.core.inference import QMapModel
from rtcontrast.research import phantom
from rtcontrast.research.eval_phantoms import brain
from rtcontrast.settings.protocol import ProtocolConfig
from tests.dicomgen import Geometry, Scanner, make_series
from tests.support import REPO, run_series_job

SE = REPO / "models" / "qmap-se.onnx"
PROTOCOL = ProtocolConfig.model_validate({
    "version": "qa-se-defaults",
    "destinations": {"out": {"folder": {"path": "/nonexistent"}}},
    "recipes": [{"key": "T2w", "label": "T2w", "te_ms": 100, "tr_ms": 4000, "series_number": 901,
                 "destinations": ["out"]}],
})  # every QA key at its default: uncertainty limits from the model, uncertainty_action hold


@pytest.fixture(scope="module")
def model() -> QMapModel:
    m = QMapModel(SE, provider="cpu")
    assert m.info.qa_limits, "the shipped qmap-se carries its calibrated QA limits"
    return m


def _run(tmp_path: Path, model: QMapModel, image: np.ndarray, te: float, tr: float, field_t: float,
         pixel_mm: float, tag: str) -> tuple[str, str | None, dict]:
    geo = Geometry(pixel_spacing=(pixel_mm, pixel_mm), slice_spacing=6.0, slice_thickness=6.0)
    dss = make_series(image, te=te, tr=tr, geometry=geo, uid_seed=tag, scanner=Scanner(field_strength_t=field_t))
    res, jobs, _, job_id = run_series_job(tmp_path, PROTOCOL, model, dss)
    job = jobs.job(job_id)
    assert job is not None and job.qa is not None
    return str(res.state), res.reason, job.qa


@pytest.mark.parametrize(("te", "tr", "field_t"), [(90.0, 4000.0, 3.0), (12.0, 500.0, 1.5)])
def test_a_pelvis_series_passes_and_is_queued(tmp_path: Path, model: QMapModel, te: float, tr: float,
                                              field_t: float) -> None:
    maps, _ = phantom.volume(2_000_123, n_slices=3, shape=(256, 256), pixel_mm=1.6, slice_mm=6.0, field_t=field_t)
    img = phantom.acquire(maps, te, tr, np.random.default_rng(5), snr=60).image
    state, reason, qa = _run(tmp_path, model, img, te, tr, field_t, 1.6, f"se-pelvis-{te}")
    assert state == "queued", (reason, qa.get("uncertainty"), qa.get("uncertainty_limits"))
    assert qa["uncertainty_limits"] == model.info.qa_limits


@pytest.mark.parametrize(("te", "tr", "field_t"), [(90.0, 4000.0, 3.0), (12.0, 500.0, 1.5)])
def test_a_head_series_is_held_with_the_models_reason(tmp_path: Path, model: QMapModel, te: float, tr: float,
                                                      field_t: float) -> None:
    h = brain.head_volume(7_000_001, n_slices=3, field_t=field_t)
    img = phantom.acquire(h, te, tr, np.random.default_rng(6), snr=60).image  # type: ignore[arg-type]
    state, reason, qa = _run(tmp_path, model, img, te, tr, field_t, 0.9, f"se-head-{te}")
    assert state == "held", (reason, qa.get("uncertainty"), qa.get("uncertainty_limits"))
    assert reason is not None and "model uncertain" in reason and "calibrated limit" in reason, reason
