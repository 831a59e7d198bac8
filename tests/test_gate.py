"""QA on a sample of slices, then inference slab by slab while the outputs stream (#13 time to first image).

Real model (the shipped qmap/1 and qmap-se through onnxruntime), real SQLite, the pipeline's
own run_job.  What must hold: derived pixels equal whole-series inference; the first slab is
queued before the whole series is inferred; a sample that the model cannot read still holds
the series with nothing sent; and a series whose sample passes but whose whole would have
been held stops what is not yet delivered and says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from rtcontrast.core.inference import QMapModel
from rtcontrast.node import stream
from rtcontrast.node.dispatch.destinations import FolderDestination
from rtcontrast.node.dispatch.sender import RetryPolicy, Sender
from rtcontrast.node.gate import NonFiniteSlab, SeriesInference, sample_slices
from rtcontrast.node.pipeline import run_job
from rtcontrast.node.qa import percent
from rtcontrast.node.review import data as review_data
from rtcontrast.research import phantom
from rtcontrast.research.eval_phantoms import brain
from rtcontrast.settings.protocol import ProtocolConfig
from tests.dicomgen import Geometry, Scanner, make_series
from tests.support import REPO, phantom_series, run_series_job
from tests.test_pipeline import Env, small_protocol

SLAB = 2 * 64 * 64  # two slices of the 64x64 phantom


@pytest.fixture
def small_slabs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "SLAB_VOXELS", SLAB)
    monkeypatch.setattr(stream, "FIRST_SLAB_VOXELS", SLAB)


@pytest.mark.parametrize(("n", "count", "want"), [
    (100, 16, "16"), (32, 16, None), (33, 16, "16"), (8, 2, [0, 4, 7]), (9, 2, [0, 4, 8]), (7, 3, [0, 3, 6]),
    (50, 0, None),
])
def test_sample_slices(n: int, count: int, want: Any) -> None:
    got = sample_slices(n, count)
    if want is None:
        assert got is None
        return
    assert got is not None and n // 2 in got and np.all(np.diff(got) > 0) and got[0] == 0
    if want == "16":  # 16 evenly spaced from first to last, and the middle one when it is not among them
        assert got.size in (16, 17) and got[-1] == n - 1 and np.all(np.diff(got) <= -(-(n - 1) // 15))
    else:
        assert got.tolist() == want


def test_a_long_series_is_sampled_by_default() -> None:
    got = sample_slices(100, ProtocolConfig.model_validate(
        {"version": "d", "destinations": {"o": {"folder": {"path": "/x"}}}, "recipes": [
            {"key": "a", "label": "a", "te_ms": 90, "tr_ms": 4000, "series_number": 901, "destinations": ["o"]}],
         }).qa.sample_slices)
    assert got is not None and got.size == 17 and 50 in got  # every 6-7th slice, and the middle one


def test_slices_inferred_in_any_order_are_the_whole_series_maps(tmp_path: Path, model: QMapModel) -> None:
    pixels = np.stack([ds.pixel_array for ds in phantom_series(n=8)]).astype(np.float32)
    whole = model.predict(pixels, 90.0, 4000.0)
    run = SeriesInference(model, pixels, 90.0, 4000.0, 1.5, lambda name, shape: np.zeros(shape, np.float32))
    assert run.scale == whole.scale
    run.infer(np.array([0, 4]))
    slab = run.slab(2, 6)  # slice 4 read back, 2, 3 and 5 inferred now
    for name in ("pd", "t1", "t2"):
        np.testing.assert_allclose(getattr(slab, name), getattr(whole, name)[2:6], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(run.maps.te_tr_pred[[0, 2, 3, 4, 5]], whole.te_tr_pred[[0, 2, 3, 4, 5]], rtol=1e-5)
    assert run.done.tolist() == [True, False, True, True, True, True, False, False]


def test_a_slab_with_non_finite_maps_is_refused(model: QMapModel) -> None:
    """The guard the stream relies on: a slab's maps are checked before anything of it is rendered."""
    pixels = np.stack([ds.pixel_array for ds in phantom_series(n=8)]).astype(np.float32)
    run = SeriesInference(model, pixels, 90.0, 4000.0, 1.5, lambda name, shape: np.zeros(shape, np.float32))
    run.infer(np.array([0, 4, 7]))
    assert run.slab(0, 2).t1.shape == (2, 64, 64)
    run.pixels = pixels.copy()
    run.pixels[5, 10:20, 10:20] = np.nan  # e.g. a decoder fault after the scale was taken
    with pytest.raises(NonFiniteSlab, match=r"non-finite data in slices 4-5: PD map has \d+ non-finite"):
        run.slab(4, 6)


def _queued_pixels(env: Env, job_id: int) -> dict[str, np.ndarray]:
    return {str(ds.SOPInstanceUID): ds.pixel_array for ds in env.queued_datasets(job_id)}


def test_a_sampled_job_sends_the_pixels_of_whole_series_inference(tmp_path: Path, model: QMapModel,
                                                                   small_slabs: None) -> None:
    """Every derived pixel (3 recipes... here 2 recipes and the classic maps) equals the job inferred whole first."""
    src = phantom_series(n=8)
    got: dict[str, Any] = {}
    for count in (2, 0):
        env = Env(tmp_path / f"s{count}", model, small_protocol(qa={"sample_slices": count},
                                                                maps={"classic": True, "destinations": ["out"]}))
        job_id = env.ingest(src)
        res = run_job(env.ctx, job_id)
        assert res.state == "queued", res.reason
        got[str(count)] = (_queued_pixels(env, job_id), env.jobs.job(job_id).qa)  # type: ignore[union-attr]
    (sampled, qa), (whole, qa0) = got["2"], got["0"]
    assert qa["gate"] == {"sample_slices": 3, "series_slices": 8} and "gate" not in qa0
    assert set(sampled) == set(whole) and len(sampled) == 8 * 5  # same deterministic UIDs
    diff = max(int(np.abs(sampled[k].astype(np.int32) - whole[k].astype(np.int32)).max()) for k in whole)
    assert diff <= 1, diff  # float32 inference in other batches: at most one stored unit after rounding
    # the whole series' QA is recorded beside the sample's that decided; the figures agree
    ws = qa["whole_series"]
    assert ws["action"] == "none" and ws["violations"] == []
    assert ws["self_nrmse"] == pytest.approx(qa0["self_nrmse"], abs=1e-4)
    assert abs(qa["t2_ms"]["p50"] - ws["t2_ms"]["p50"]) < 0.25 * ws["t2_ms"]["p50"]


def test_the_first_slab_is_queued_before_the_series_is_inferred(tmp_path: Path, model: QMapModel,
                                                                small_slabs: None) -> None:
    env = Env(tmp_path, model, small_protocol(qa={"sample_slices": 2}))
    inferred: list[int] = []
    real_predict = model.predict

    def counting_predict(pixels: np.ndarray, *args: Any, **kw: Any) -> Any:
        inferred.append(int(pixels.shape[0]))
        return real_predict(pixels, *args, **kw)

    seen: list[int] = []
    env.ctx.on_enqueued = lambda: seen.append(sum(inferred))
    env.ctx.model = model
    try:
        model.predict = counting_predict  # type: ignore[method-assign]
        job_id = env.ingest(phantom_series(n=8))
        assert run_job(env.ctx, job_id).state == "queued"
    finally:
        del model.predict
    # slab 1 (slices 0-1) went out after the sample {0, 4, 7} and slice 1: 4 of 8 slices inferred
    assert seen[0] == 4 and seen[-1] == 8 and len(seen) == 4, seen
    assert sum(inferred) == 8  # no slice inferred twice


# ----------------------------------------------------------------------------- qmap-se: the sample holds, or the whole does

SE = REPO / "models" / "qmap-se.onnx"


@pytest.fixture(scope="module")
def se_model() -> QMapModel:
    return QMapModel(SE, provider="cpu")


def _se_protocol(**qa: Any) -> ProtocolConfig:
    return ProtocolConfig.model_validate({
        "version": "gate-se",
        "destinations": {"out": {"folder": {"path": "/nonexistent"}}},
        "recipes": [{"key": "T2w", "label": "T2w", "te_ms": 100, "tr_ms": 4000, "series_number": 901,
                     "destinations": ["out"]}],
        "qa": {"sample_slices": 2, **qa},  # other QA keys at their defaults: the model's calibrated limits
    })


def _series(image: np.ndarray, tag: str) -> list[pydicom.Dataset]:
    geo = Geometry(pixel_spacing=(1.6, 1.6), slice_spacing=6.0, slice_thickness=6.0)
    return make_series(image, te=90.0, tr=4000.0, geometry=geo, uid_seed=tag, scanner=Scanner(field_strength_t=3.0))


def _mixed_timing(n: int) -> np.ndarray:
    """A pelvis series whose header says TE/TR 90/4000: true for the sampled slices, while the others were
    acquired at 12/500 (a series put together from two acquisitions).  The sample passes QA; over the
    whole series the image's TE/TR is off by ~87 % (limit 60 %)."""
    maps, _ = phantom.volume(2_000_321, n_slices=n, shape=(256, 256), pixel_mm=1.6, slice_mm=6.0, field_t=3.0)
    t2w = phantom.acquire(maps, 90.0, 4000.0, np.random.default_rng(7), snr=60).image
    image = phantom.acquire(maps, 12.0, 500.0, np.random.default_rng(7), snr=60).image
    for z in sample_slices(n, 2):  # type: ignore[union-attr]
        image[z] = t2w[z]
    return image


def test_a_head_series_is_held_by_its_sample_and_nothing_is_queued(tmp_path: Path, se_model: QMapModel) -> None:
    h = brain.head_volume(7_000_011, n_slices=6, field_t=3.0)
    head = phantom.acquire(h, 90.0, 4000.0, np.random.default_rng(8), snr=60).image  # type: ignore[arg-type]
    res, jobs, outbox, job_id = run_series_job(tmp_path, _se_protocol(), se_model, _series(head, "gate-head"))
    assert res.state == "held", res.reason
    assert res.reason is not None and "model uncertain" in res.reason and "whole series" not in res.reason
    qa = jobs.job(job_id).qa
    assert qa["gate"] == {"sample_slices": 3, "series_slices": 6} and "whole_series" not in qa
    assert outbox.items(job_id=job_id) == []


def test_a_series_whose_sample_passes_but_whose_whole_would_be_held_stops(tmp_path: Path, se_model: QMapModel) -> None:
    """The stream had queued every slab by then; nothing was delivered (no sender ran), so all of it is
    withdrawn, and the reason says the series was judged on a sample first."""
    res, jobs, outbox, job_id = run_series_job(tmp_path, _se_protocol(action="hold"), se_model,
                                               _series(_mixed_timing(8), "gate-mixed"))
    qa = jobs.job(job_id).qa
    assert res.state == "held", (res.reason, qa.get("te_error_frac"), qa.get("whole_series", {}).get("te_error_frac"))
    assert qa["action"] == "none" and qa["whole_series"]["action"] == "hold"
    reason = res.reason or ""
    assert "QA hold on the whole series (judged first on 3 of 8 slices, which passed)" in reason, reason
    assert "TE identified" in reason and "8 instance(s) were queued" in reason, reason
    assert "8 not yet delivered were withdrawn" in reason, reason
    assert outbox.job_counts(job_id) == {"pending": 0, "delivered": 0, "dead_letter": 0}
    assert "withdrawn" in [e.event for e in jobs.audit_events(job_id)]
    # the review page tells the physicist what happened, not "passed" from the sample's figures
    verdict, shown = review_data._verdict(qa)
    assert verdict == "failed on the whole series after a passed sample: held, part may have been sent", verdict
    assert shown and shown[0].startswith("whole series: TE identified")
    figures = dict(review_data._figures(qa)[0])
    assert figures["QA decided on"].startswith("3 of 8 slices") and "TE identified" in figures["QA decided on"]
    assert figures["model uncertainty T2 (median relative sd over the body)"].endswith(
        f"model's limit ±{percent(se_model.info.qa_limits['t2_rel_sd'])} %")


def test_what_was_delivered_before_a_late_hold_stays_and_the_rest_is_withdrawn(tmp_path: Path,
                                                                             se_model: QMapModel,
                                                                             small_slabs: None) -> None:
    env = Env(tmp_path, se_model, _se_protocol(action="hold"))
    export = tmp_path / "export"
    sender = Sender(env.outbox, {"out": FolderDestination("out", export)}, RetryPolicy(base_delay_s=0.01))
    first = [0]

    def wake() -> None:  # the first slab reaches the TPS; later slabs are still pending at the late hold
        if not first[0]:
            first[0] = sender.run_once()

    env.ctx.on_enqueued = wake
    job_id = env.ingest(_series(_mixed_timing(8), "gate-mixed-2"))
    res = run_job(env.ctx, job_id)
    assert res.state == "held", res.reason
    assert first[0] == 1 and len(list(export.rglob("*.dcm"))) == 1  # 256x256 slices: one per slab here
    assert env.outbox.job_counts(job_id) == {"pending": 0, "delivered": 1, "dead_letter": 0}
    assert "7 not yet delivered were withdrawn" in (res.reason or "")


def test_a_whole_series_warning_after_a_passed_sample_is_logged_and_kept_in_the_reason(
    tmp_path: Path, se_model: QMapModel, caplog: pytest.LogCaptureFixture,
) -> None:
    """With ``qa.action: warn`` (the default) the whole series' TE/TR finding does not stop the job: its
    instances went out as "QA passed" on the sample's figures, so the job's reason and the log say what
    the whole series showed."""
    with caplog.at_level("WARNING", logger="rtcontrast.node.pipeline"):
        res, jobs, _, job_id = run_series_job(tmp_path, _se_protocol(), se_model,
                                              _series(_mixed_timing(8), "gate-mixed-warn"))
    assert res.state == "queued", res.reason
    assert (res.reason or "").startswith("QA warning on the whole series, after it was sent as passed on a sample: "
                                         "TE identified"), res.reason
    assert any("QA over the whole series, after sending" in r.getMessage() for r in caplog.records)
    assert jobs.job(job_id).qa["whole_series"]["action"] == "warn"
