"""The pipelined job (#13): outputs stream slab by slab to the outbox, with the old guarantees.

Real model, real SQLite outbox, the real Sender to a folder destination.  Slabs are made
small (2 slices of the 64x64 phantom) so that a 6-slice series streams in 3 slabs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from rtcontrast.core.inference import QMapModel
from rtcontrast.core.render import (
    percentiles_from_histogram,
    render,
    to_uint16,
    u16_histogram,
    window_from_histogram,
    window_from_percentiles,
)
from rtcontrast.dicom.derive import RecipeInfo, derive_contrast_series
from rtcontrast.dicom.map_series import body_mask, derive_map_images, map_window
from rtcontrast.dicom.volume import assemble
from rtcontrast.node import stream
from rtcontrast.node.dispatch.destinations import FolderDestination
from rtcontrast.node.dispatch.outbox import Outbox
from rtcontrast.node.dispatch.sender import RetryPolicy, Sender
from rtcontrast.node.pipeline import run_job
from tests.support import phantom_series
from tests.test_pipeline import Env, small_protocol

SLAB = 2 * 64 * 64  # two slices of the phantom


@pytest.fixture
def small_slabs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "SLAB_VOXELS", SLAB)
    monkeypatch.setattr(stream, "FIRST_SLAB_VOXELS", SLAB)


def _maps_protocol() -> Any:
    return small_protocol(maps={"classic": True, "destinations": ["out"]})


# ----------------------------------------------------------------------------- windows


@pytest.mark.parametrize("seed", range(40))
def test_histogram_percentiles_are_numpys(seed: int) -> None:
    rng = np.random.default_rng(seed)
    hi = [3, 300, 65536][seed % 3]
    v = rng.integers(0, hi, size=int(rng.integers(1, 4000))).astype(np.uint16)
    h = u16_histogram(v[: len(v) // 2]) + u16_histogram(v[len(v) // 2:])  # slabs add up
    nz = v[v > 0]
    got = percentiles_from_histogram(h, [1.0, 99.0, 99.5])
    assert got is None if nz.size == 0 else got == [float(x) for x in np.percentile(nz, [1.0, 99.0, 99.5])]
    assert window_from_histogram(h) == window_from_percentiles(v)


def test_slabs_cover_the_volume_once_with_a_small_first_slab() -> None:
    assert list(stream.slabs(7, 64, 64, SLAB, first=SLAB)) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert list(stream.slabs(7, 64, 64, SLAB, first=64 * 64)) == [(0, 1), (1, 3), (3, 5), (5, 7)]
    assert list(stream.slabs(3, 2048, 2048, SLAB)) == [(0, 1), (1, 2), (2, 3)]  # at least one slice
    assert list(stream.slabs(100, 256, 256))[:3] == [(0, 2), (2, 18), (18, 34)]  # the node's defaults
    assert list(stream.slabs(0, 64, 64)) == []


# ----------------------------------------------------------------------------- the streamed job


def _by_sop(datasets: list[pydicom.Dataset]) -> dict[str, pydicom.Dataset]:
    return {str(ds.SOPInstanceUID): ds for ds in datasets}


def test_streamed_outputs_equal_the_whole_volume_writers(tmp_path: Path, model: QMapModel, small_slabs: None) -> None:
    """Same UIDs, pixels, windows and text as deriving the whole volume at once (what the node did before)."""
    env = Env(tmp_path, model, _maps_protocol())
    src = phantom_series()
    job_id = env.ingest(src)
    res = run_job(env.ctx, job_id)
    assert res.state == "queued", res.reason
    assert env.woken == 3 and (env.jobs.job(job_id).qa or {})["slabs"] == 3  # type: ignore[union-attr]
    got = _by_sop(env.queued_datasets(job_id))
    assert len(got) == 6 * 5

    volume = assemble([Path(it.path) for it in env.jobs.job_instances(job_id)])
    maps = model.predict(volume.pixels, 90.0, 4000.0)
    node, mid = env.ctx.node, env.ctx.model_identity
    want: list[pydicom.Dataset] = []
    for r in env.ctx.protocol.recipes:
        u16 = to_uint16(render(maps, r.te_ms, r.tr_ms))
        win = window_from_percentiles(u16)
        info = RecipeInfo(key=r.key, te_ms=r.te_ms, tr_ms=r.tr_ms, series_number=r.series_number,
                          series_description=r.series_description)
        want += derive_contrast_series(volume, u16, info, node, mid, win, qa_note="QA passed")
    mask = body_mask(volume.pixels, maps.scale)
    nums = env.ctx.protocol.maps.classic_series_numbers
    for q, values in (("T1", maps.t1), ("T2", maps.t2), ("PD", maps.pd / np.float32(maps.scale))):
        want += derive_map_images(volume, values, q, getattr(nums, q), node, mid, mask=mask, qa_note="QA passed")
    want_by = _by_sop(want)
    assert set(got) == set(want_by)
    for uid, w in want_by.items():
        g = got[uid]
        for kw in ("SeriesInstanceUID", "InstanceNumber", "SeriesDescription", "ImageComments",
                   "DerivationDescription", "WindowCenter", "WindowWidth", "ImagePositionPatient"):
            assert g.get(kw) == w.get(kw), (kw, g.get(kw), w.get(kw))
        assert np.array_equal(g.pixel_array, w.pixel_array)


def test_the_tps_gets_instances_before_the_job_is_complete(tmp_path: Path, model: QMapModel,
                                                            small_slabs: None) -> None:
    """The sender delivers slab 1 while the job is still deriving; the job is queued only after its last slab."""
    env = Env(tmp_path, model, small_protocol())
    sender = Sender(env.outbox, {"out": FolderDestination("out", tmp_path / "export")}, RetryPolicy(base_delay_s=0.01))
    seen: list[tuple[str, int]] = []

    def wake() -> None:  # the node's sender thread, run in line so the order is deterministic
        job = env.jobs.job(job_id)
        assert job is not None
        seen.append((str(job.state), sender.run_once()))

    env.ctx.on_enqueued = wake
    job_id = env.ingest(phantom_series())
    assert run_job(env.ctx, job_id).state == "queued"
    assert seen == [("deriving", 4), ("deriving", 4), ("deriving", 4)]
    assert env.outbox.job_counts(job_id) == {"pending": 0, "delivered": 12, "dead_letter": 0}
    assert len(list((tmp_path / "export").rglob("*.dcm"))) == 12


def test_a_held_series_streams_nothing(tmp_path: Path, model: QMapModel, small_slabs: None) -> None:
    env = Env(tmp_path, model, small_protocol(qa={"max_self_nrmse": 1e-9, "action": "hold"}))
    job_id = env.ingest(phantom_series())
    assert run_job(env.ctx, job_id).state == "held"
    assert env.woken == 0 and env.outbox.items(job_id=job_id) == []


class _FailingOutbox(Outbox):
    """An outbox whose disk 'fills up' at the n-th enqueue."""

    fail_at = 3

    def enqueue(self, job_id: Any, destination: str, items: Any, now: float | None = None) -> list[int]:
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.fail_at:
            raise OSError(28, "No space left on device")
        return super().enqueue(job_id, destination, items, now)


@pytest.mark.parametrize("sample_slices", [16, 2], ids=["inferred-whole-first", "sampled-then-streamed"])
def test_a_job_failing_midway_withdraws_the_rest_and_a_rerun_completes_without_duplicates(
    tmp_path: Path, model: QMapModel, small_slabs: None, sample_slices: int,
) -> None:
    """Also when the series is judged on a sample and inferred while it streams (rtcontrast/node/gate.py)."""
    env = Env(tmp_path, model, small_protocol(qa={"sample_slices": sample_slices}))
    failing = _FailingOutbox(env.outbox.conn, tmp_path / "outbox")
    env.ctx.outbox = failing
    export = tmp_path / "export"
    sender = Sender(failing, {"out": FolderDestination("out", export)}, RetryPolicy(base_delay_s=0.01))
    delivered_first = [0]

    def wake() -> None:  # slab 1 is delivered, slab 2 stays pending, slab 3's enqueue fails
        if delivered_first[0] == 0:
            delivered_first[0] = sender.run_once()

    env.ctx.on_enqueued = wake
    job_id = env.ingest(phantom_series())
    with pytest.raises(OSError):
        run_job(env.ctx, job_id)
    job = env.jobs.job(job_id)
    assert job is not None and job.state == "failed"
    assert "8 instance(s) were queued in 2 slab(s); 4 not yet delivered were withdrawn" in (job.reason or "")
    assert failing.job_counts(job_id) == {"pending": 0, "delivered": 4, "dead_letter": 0}
    assert "withdrawn" in [e.event for e in env.jobs.audit_events(job_id)]
    assert len(list(export.rglob("*.dcm"))) == 4  # what the TPS holds: an incomplete series, the job says so

    failing.fail_at = -1  # the disk has room again; the node re-runs the job (restart or retry)
    env.ctx.on_enqueued = lambda: sender.run_once()
    assert run_job(env.ctx, job_id).state == "queued"
    assert ("gate" in (env.jobs.job(job_id).qa or {})) == (sample_slices == 2)  # type: ignore[union-attr]
    assert failing.job_counts(job_id) == {"pending": 0, "delivered": 12, "dead_letter": 0}
    files = list(export.rglob("*.dcm"))
    assert len(files) == 12 and len({f.name for f in files}) == 12  # replaced by SOP Instance UID, no duplicate


def test_map_window_is_derive_map_images_window(tmp_path: Path, model: QMapModel) -> None:
    env = Env(tmp_path, model, small_protocol())
    job_id = env.ingest(phantom_series())
    volume = assemble([Path(m.path) for m in env.jobs.job_instances(job_id)])
    maps = model.predict(volume.pixels, 90.0, 4000.0)
    mask = body_mask(volume.pixels, maps.scale)
    ds = derive_map_images(volume, maps.t2, "T2", 955, env.ctx.node, env.ctx.model_identity, mask=mask)[0]
    hist = sum(u16_histogram(stream.classic_slab(maps, "T2", a, b, mask)) for a, b in stream.slabs(6, 64, 64, SLAB))
    w = map_window(np.asarray(hist))
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == pytest.approx((w.center, w.width), abs=1e-6)
