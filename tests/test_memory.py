"""Memory of a job (#13 item 3): the maps are kept in files while a job runs, and QA over the
whole series holds no whole-volume float64 temporary and no copy of a map.

The bound on peak memory is bench/memory.py (a subprocess node, 512x512x200, VmHWM); these
tests keep the mechanisms it relies on from regressing, cheaply.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from rtcontrast.core.inference import QMapModel
from rtcontrast.core.maps import QMaps, SlabFile, slab_allocator
from rtcontrast.dicom.derive import RecipeInfo
from rtcontrast.node.qa import compute_qa
from rtcontrast.node.stream import series_windows
from tests.support import phantom_image


def test_slabfile_round_trips_bit_for_bit(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    want = rng.standard_normal((7, 5, 3)).astype(np.float32)
    want[2, 1, 1] = np.nan
    f = SlabFile(tmp_path / "m.f32", want.shape)
    f[0:3] = want[0:3]
    f[3:7] = want[3:7]
    assert f.shape == want.shape and f.ndim == 3 and len(f) == 7 and f.size == want.size
    np.testing.assert_array_equal(f[:], want)
    assert f[:].tobytes() == want.tobytes()
    np.testing.assert_array_equal(f[2:5], want[2:5])
    np.testing.assert_array_equal(f[-1], want[-1])
    np.testing.assert_array_equal(f[1:3, 2], want[1:3, 2])
    np.testing.assert_array_equal(np.asarray(f), want)
    assert f[5:2].shape == (0, 5, 3)
    f[4] = 1.5
    assert (f[4] == 1.5).all()
    with pytest.raises(IndexError):
        f[::2]
    with pytest.raises(IndexError):
        f[7]
    assert (tmp_path / "m.f32").stat().st_size == want.nbytes


@pytest.fixture(scope="module")
def series(model: QMapModel) -> tuple[np.ndarray, QMaps]:
    px = phantom_image(6, 64, 90.0, 4000.0)
    return px, model.predict(px, 90.0, 4000.0)


def test_maps_in_files_are_the_maps_in_memory(series: tuple[np.ndarray, QMaps], model: QMapModel,
                                              tmp_path: Path) -> None:
    """predict(out=slab_allocator) gives the same maps bit for bit, and the same QA and windows."""
    px, mem = series
    spilled = model.predict(px, 90.0, 4000.0, out=slab_allocator(tmp_path / "maps"))
    assert isinstance(spilled.t1, SlabFile)
    for name in ("pd", "t1", "t2"):
        assert np.asarray(getattr(spilled, name)).tobytes() == getattr(mem, name).tobytes(), name
    np.testing.assert_array_equal(spilled.te_tr_pred, mem.te_tr_pred)
    assert compute_qa(spilled, px, 90.0, 4000.0) == compute_qa(mem, px, 90.0, 4000.0)
    recipes = [RecipeInfo(key="T2w", te_ms=100, tr_ms=4000, series_number=901, series_description="SYNTH T2w")]
    mask = px > 0.05 * mem.scale
    assert series_windows(spilled, recipes, True, mask, voxels=64 * 64 * 2) == series_windows(mem, recipes, True, mask)


def test_qa_holds_no_whole_volume_temporary() -> None:
    """QA over a 512x512x20 series allocates about the mask, a body copy of one map and a few slices.

    Guards against a whole-volume float64 temporary (8 bytes a voxel) or a second copy of a
    map coming back: either alone is 2x the bound.
    """
    n, h, w = 20, 512, 512
    rng = np.random.default_rng(1)
    pixels = np.zeros((n, h, w), np.float32)
    pixels[:, 128:384, 128:384] = rng.uniform(100, 1000, (n, 256, 256)).astype(np.float32)  # body: 1/4
    maps = QMaps(pd=pixels * np.float32(1.1), t1=rng.uniform(200, 2000, (n, h, w)).astype(np.float32),
                 t2=rng.uniform(20, 200, (n, h, w)).astype(np.float32),
                 te_tr_pred=np.tile(np.float32([90.0, 4000.0]), (n, 1)), scale=1000.0)
    tracemalloc.start()
    try:
        qa = compute_qa(maps, pixels, 90.0, 4000.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert qa["body_voxels"] > 0
    voxels = n * h * w
    # measured 29 MB: the mask (1 byte a voxel), the self-NRMSE block (4 slices), a float32 copy of
    # the body voxels of one map; one whole-volume float64 temporary alone is 8 bytes a voxel
    assert peak < 6 * voxels, f"QA peak {peak / 1e6:.0f} MB for {voxels / 1e6:.1f} M voxels"


def _pixels(ds: object) -> bytes:
    for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if kw in ds:  # type: ignore[operator]
            return bytes(getattr(ds, kw))
    raise AssertionError("no pixel data")


def test_job_keeps_its_maps_in_files_and_removes_them(tmp_path: Path, model: QMapModel,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """run_job: the maps QA sees are files in the job folder; the folder is gone when the job ends.

    Same outputs as maps in memory: the pixels of every queued instance equal a run whose
    maps stay in memory (predict without ``out``).
    """
    from rtcontrast.node import pipeline
    from tests.support import phantom_series
    from tests.test_pipeline import Env, small_protocol

    seen: list[tuple[type, bool]] = []
    real_qa = pipeline.compute_qa

    def spying_qa(maps: QMaps, *args: object) -> dict:
        seen.append((type(maps.t1), isinstance(maps.t1, SlabFile) and maps.t1.path.is_file()))
        return real_qa(maps, *args)

    def run(root: Path, in_memory: bool) -> dict[tuple[int, int], bytes]:
        env = Env(root, model, small_protocol(maps={"classic": True, "parametric": True, "destinations": ["out"]}))
        env.ctx.job_dir = lambda j: root / "jobs" / str(j)
        if in_memory:
            real_predict = model.predict
            monkeypatch.setattr(model, "predict", lambda *a, out=None, **k: real_predict(*a, **k))
        job_id = env.ingest(phantom_series())
        res = pipeline.run_job(env.ctx, job_id)
        assert res.state == "queued", res.reason
        assert not (root / "jobs" / str(job_id) / "maps").exists()
        if in_memory:
            monkeypatch.undo()
        return {(int(ds.SeriesNumber), int(ds.InstanceNumber)): _pixels(ds) for ds in env.queued_datasets(job_id)}

    monkeypatch.setattr(pipeline, "compute_qa", spying_qa)
    spilled = run(tmp_path / "a", in_memory=False)
    assert seen == [(SlabFile, True)]
    monkeypatch.setattr(pipeline, "compute_qa", spying_qa)
    kept = run(tmp_path / "b", in_memory=True)
    assert seen[1][0] is np.ndarray
    assert len(spilled) == 12 + 18 + 3 and spilled == kept  # recipes, classic maps, Parametric Maps
