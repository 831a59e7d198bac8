"""Never pass non-finite data or broken geometry (#15 findings 2 and 9).

The probe's cases: RescaleSlope NaN (or 1e308) on one slice gave blank derived slices at
the TPS with a QA record ``te_error_frac: NaN, violations: [], action: none``; a missing
FrameOfReferenceUID gave a derived series with an empty frame of reference; PixelSpacing
``0\\-1`` passed through.  Real files, the real model, a real job store and outbox.
"""

from __future__ import annotations

import math
import warnings
from datetime import datetime, timezone
from pathlib import Path

import pydicom
import pytest

from rtcontrast.core.inference import QMapModel
from rtcontrast.dicom.volume import VolumeError, assemble
from rtcontrast.node.dispatch.outbox import Outbox
from rtcontrast.node.pipeline import PipelineContext, node_identity, run_job
from rtcontrast.node.qa import qa_violations
from rtcontrast.node.receive.scp import StoredInstance
from rtcontrast.node.receive.spool import Spool
from rtcontrast.node.store import db
from rtcontrast.node.store.jobs import JobState, JobStore
from rtcontrast.settings.protocol import ProtocolConfig
from tests.dicomgen import write_series
from tests.support import phantom_series


def _write(tmp_path: Path, datasets: list[pydicom.Dataset]) -> list[Path]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about NaN / out-of-range DS strings: that is the point
        return write_series(datasets, tmp_path / "in")


def _series(**slice0: object) -> list[pydicom.Dataset]:
    dss = phantom_series(n=4, size=32)
    for kw, value in slice0.items():
        if value is None:
            delattr(dss[1], kw)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                setattr(dss[1], kw, value)
    return dss


@pytest.mark.parametrize("slope", ["NaN", "1e308", "inf"])
def test_non_finite_rescale_refused_by_volume(tmp_path: Path, slope: str) -> None:
    paths = _write(tmp_path, _series(RescaleSlope=slope, RescaleIntercept="0"))
    with pytest.raises(VolumeError, match="not finite"):
        assemble(paths)


@pytest.mark.parametrize(("attrs", "message"), [
    ({"FrameOfReferenceUID": None}, "missing FrameOfReferenceUID"),
    ({"PixelSpacing": ["0", "-1"]}, "PixelSpacing must be positive"),
    ({"SliceThickness": "0"}, "SliceThickness must be positive"),
    ({"SliceThickness": None}, "missing SliceThickness"),
    ({"ImagePositionPatient": ["0", "inf", "0"]}, "ImagePositionPatient is not finite"),
    ({"ImageOrientationPatient": ["1", "0", "0", "1", "0", "0"]}, "does not span a plane"),
])
def test_broken_geometry_refused(tmp_path: Path, attrs: dict[str, object], message: str) -> None:
    paths = _write(tmp_path, _series(**attrs))
    with pytest.raises(VolumeError, match=message):
        assemble(paths)


def test_nan_qa_figure_is_a_violation() -> None:
    """``te_error_frac: NaN`` compared False with every threshold: ``violations: []``, action none."""
    qa = {"self_nrmse": 0.01, "te_error_frac": math.nan, "tr_error_frac": 0.0, "te_pred_ms": math.nan,
          "te_header_ms": 90.0, "tr_pred_ms": 4000.0, "tr_header_ms": 4000.0, "t1_ms": {"p50": math.inf}}
    out = qa_violations(qa, ProtocolConfig())
    assert any("te_error_frac" in v for v in out) and any("t1_ms" in v for v in out), out


def test_nan_slope_job_fails_and_sends_nothing(tmp_path: Path, model: QMapModel) -> None:
    """End to end through the pipeline: the job fails with the reason; no derived instance is queued."""
    protocol = ProtocolConfig.model_validate({
        "destinations": {"out": {"folder": {"path": str(tmp_path / "export")}}},
        "recipes": [{"key": "T2w", "label": "T2w", "te_ms": 100, "tr_ms": 4000, "series_number": 901,
                     "destinations": ["out"]}],
        "qa": {"action": "warn"},
    })
    conn = db.connect(tmp_path / "node.db")
    jobs, outbox = JobStore(conn), Outbox(db.connect(tmp_path / "node.db"), tmp_path / "outbox")
    spool = Spool(tmp_path / "spool")
    dss = _series(RescaleSlope="NaN", RescaleIntercept="0")
    for path, ds in zip(_write(tmp_path, dss), dss, strict=True):
        stored = spool.store(path, study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                             sop_instance_uid=ds.SOPInstanceUID)
        jobs.record_instance(StoredInstance(stored, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID,
                                            ds.SOPClassUID, "SCANNER", "127.0.0.1:1", datetime.now(timezone.utc)))
    job_id = jobs.create_job(dss[0].StudyInstanceUID, dss[0].SeriesInstanceUID)
    assert job_id is not None
    ctx = PipelineContext(protocol=protocol, model=model, node=node_identity(ae_title="RTCONTRAST", model=model),
                          jobs=jobs, outbox=outbox)
    res = run_job(ctx, job_id)
    assert res.state == JobState.FAILED and "RescaleSlope is not finite" in (res.reason or ""), res.reason
    assert outbox.items(job_id=job_id) == []


@pytest.mark.network
def test_scp_refuses_non_finite_rescale(tmp_path: Path) -> None:
    """The scanner is told at once (0xC000) for the broken slice; the others are stored."""
    import subprocess

    from rtcontrast.node.receive.scp import ScpSettings, StorageSCP
    from tests.conftest import dcmtk, free_port

    stored: list[StoredInstance] = []
    scp = StorageSCP(ScpSettings(host="127.0.0.1", port=free_port(), require_called_aet=False),
                     Spool(tmp_path / "spool"), stored.append, lambda keys: None)
    scp.start()
    try:
        paths = _write(tmp_path, _series(RescaleSlope="NaN", RescaleIntercept="0"))
        res = subprocess.run([dcmtk("storescu"), "-v", "-nh", "-aec", "RTCONTRAST", "127.0.0.1", str(scp.port),
                              *map(str, paths)], capture_output=True, text=True, timeout=60)
    finally:
        scp.stop()
    assert "Error: CannotUnderstand" in res.stderr, res.stderr  # 0xC000
    assert len(stored) == len(paths) - 1
    assert list((tmp_path / "spool" / "quarantine").iterdir())  # kept, not dropped
