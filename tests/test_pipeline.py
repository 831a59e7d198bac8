"""The per-job pipeline without the network: spool + job store + outbox on disk, the real model.

Series come from the pelvis phantom (rtcontrast.research.phantom) written as DICOM by
tests/dicomgen.py.  QA runs with the protocol's default thresholds, which a good phantom
series passes (the QA tests that need a violation lower one threshold to 1e-9 and say so);
the pixel checks use tolerances from the model card, not its exact numbers.
"""

from __future__ import annotations

import io
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from rtcontrast import __version__
from rtcontrast.node.store import db
from rtcontrast.node.store.jobs import JobStore
from rtcontrast.node.ops.logs import setup_logging
from rtcontrast.node.dispatch.outbox import Outbox
from rtcontrast.node.pipeline import STAGES, PipelineContext, node_identity, run_job
from rtcontrast.settings.protocol import ProtocolConfig
from rtcontrast.core.inference import QMapModel
from rtcontrast.node.receive.scp import StoredInstance
from rtcontrast.node.receive.spool import Spool
from tests.dicomgen import make_enhanced
from tests.support import geometry, phantom_image, phantom_series

def small_protocol(**overrides: Any) -> ProtocolConfig:
    """Two recipes to a folder destination 'out' (path set by the caller's fixture)."""
    raw: dict[str, Any] = {
        "version": "test-1",
        "destinations": {"out": {"folder": {"path": "/nonexistent"}}},
        "recipes": [
            {"key": "T2w", "label": "T2w TE100 TR4000", "te_ms": 100, "tr_ms": 4000, "series_number": 901,
             "destinations": ["out"]},
            {"key": "T1w", "label": "T1w TE10 TR500", "te_ms": 10, "tr_ms": 500, "series_number": 902,
             "destinations": ["out"]},
        ],
        "qa": {"action": "warn"},  # default thresholds: the phantom series here pass them (tests/test_pins_qa.py)
    }
    for k, v in overrides.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    return ProtocolConfig.model_validate(raw)


class Env:
    """Spool, job store and outbox in a temp directory: what the node gives the pipeline."""

    def __init__(self, root: Path, model: QMapModel, protocol: ProtocolConfig) -> None:
        self.root = root
        self.spool = Spool(root / "spool")
        self.conn = db.connect(root / "node.db")
        self.jobs = JobStore(self.conn)
        self.outbox = Outbox(db.connect(root / "node.db"), root / "outbox")
        self.woken = 0
        self.ctx = PipelineContext(
            protocol=protocol,
            model=model,
            node=node_identity(ae_title="RTCONTRAST", model=model),
            jobs=self.jobs,
            outbox=self.outbox,
            on_enqueued=self._wake,
        )

    def _wake(self) -> None:
        self.woken += 1

    def ingest(self, datasets: list[pydicom.Dataset], calling_ae: str = "SCANNER") -> int:
        """Spool and record the instances like the SCP does, then make the series' job."""
        for ds in datasets:
            path = self.spool.store(ds)
            self.jobs.record_instance(
                StoredInstance(
                    path=path, study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                    sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, calling_ae=calling_ae,
                    peer_address="127.0.0.1:1", received_at=datetime.now(timezone.utc),
                )
            )
        job_id = self.jobs.create_job(datasets[0].StudyInstanceUID, datasets[0].SeriesInstanceUID)
        assert job_id is not None
        return job_id

    def queued_datasets(self, job_id: int) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(it.path) for it in self.outbox.items(job_id=job_id)]


@pytest.fixture
def env(tmp_path: Path, model: QMapModel) -> Env:
    return Env(tmp_path, model, small_protocol())


# ----------------------------------------------------------------------------- eligible series


def test_eligible_series_is_queued_with_qa_and_identity(env: Env) -> None:
    src = phantom_series()
    job_id = env.ingest(src)
    res = run_job(env.ctx, job_id)
    assert res.state == "queued", res.reason
    assert res.queued == {"out": 12} and env.woken == 1

    job = env.jobs.job(job_id)
    assert job is not None and job.state == "queued"
    assert job.protocol_version == env.ctx.protocol.audit_version and job.protocol_version.startswith("test-1+sha256:")
    assert (job.model_name, job.model_version) == (env.ctx.model.info.name, env.ctx.model.info.version)
    assert job.model_sha256 == env.ctx.model.sha256
    qa = job.qa or {}
    for key in ("self_nrmse", "te_pred_ms", "tr_pred_ms", "te_error_frac", "tr_error_frac", "t1_ms", "t2_ms", "pd"):
        assert key in qa, key
    assert 0 < qa["self_nrmse"] < 0.05  # the phantom re-renders within 5 % (model card target 2 % at 256x256)
    assert set(qa["t1_ms"]) == {"p5", "p50", "p95"} and qa["t1_ms"]["p5"] <= qa["t1_ms"]["p95"]
    assert set(qa["timings_s"]) == set(STAGES) and sum(qa["timings_s"].values()) > 0
    assert qa["slices"] == 6 and qa["violations"] == []
    events = [e.event for e in env.jobs.audit_events(job_id)]
    assert "qa" in events and events.count("state") >= 5

    out = env.queued_datasets(job_id)
    by_series: dict[str, list[pydicom.Dataset]] = {}
    for ds in out:
        by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    assert len(by_series) == 2 and all(len(v) == 6 for v in by_series.values())
    descs = {v[0].SeriesDescription for v in by_series.values()}
    assert descs == {r.series_description for r in env.ctx.protocol.recipes}
    for ds in out:
        assert f"rtcontrast {__version__}" in ds.SoftwareVersions
        assert env.ctx.model.info.name in ds.SoftwareVersions and env.ctx.model.info.version in ds.SoftwareVersions
        assert ds.StudyInstanceUID == src[0].StudyInstanceUID
        assert ds.FrameOfReferenceUID == src[0].FrameOfReferenceUID
        assert ds.ImageComments.endswith(", QA passed") and "QA WARNING" not in ds.ImageComments  # provenance (#16)
    # pixel values, not just types: the T2w recipe (TE100/TR4000) of a TE90/TR4000 input is the
    # input a little darker (e^(-10/T2), T2 ~ 30-300 ms), slice by slice at the source position
    t2w = sorted(by_series[next(u for u, v in by_series.items() if v[0].SeriesNumber == 901)],
                 key=lambda d: float(d.ImagePositionPatient[2]))
    inp = sorted(src, key=lambda d: float(d.ImagePositionPatient[2]))
    got = np.stack([d.pixel_array for d in t2w]).astype(np.float64)
    ref = np.stack([d.pixel_array for d in inp]).astype(np.float64)
    body = ref > 0.2 * np.percentile(ref, 99)
    assert 0.8 < float(np.median(got[body] / ref[body])) < 1.0
    lo, hi = np.percentile(got[got > 0], [1.0, 99.5])  # the stored window spans these
    assert float(t2w[0].WindowWidth) == pytest.approx(hi - lo, rel=1e-3, abs=0.5)


def test_rerun_gives_the_same_uids(env: Env) -> None:
    """A second job for the same series (re-send) yields the same derived SOP Instance UIDs."""
    src = phantom_series()
    first = env.ingest(src)
    run_job(env.ctx, first)
    second = env.ingest(src)  # re-sent: every instance unconsumed again
    assert run_job(env.ctx, second).state == "queued"
    uids1 = sorted(it.sop_instance_uid for it in env.outbox.items(job_id=first))
    uids2 = sorted(it.sop_instance_uid for it in env.outbox.items(job_id=second))
    assert uids1 == uids2 and len(set(uids1)) == 12
    # running the same job again (restart) replaces its own rows
    assert run_job(env.ctx, second).state == "queued"
    assert len(env.outbox.items(job_id=second)) == 12


def test_enhanced_mr_gives_classic_series(env: Env) -> None:
    enh = make_enhanced(phantom_image(), te=90, tr=4000, geometry=geometry(64), uid_seed="enh")
    job_id = env.ingest([enh])
    res = run_job(env.ctx, job_id)
    assert res.state == "queued", res.reason
    out = env.queued_datasets(job_id)
    assert len(out) == 12
    assert {ds.SOPClassUID for ds in out} == {"1.2.840.10008.5.1.4.1.1.4"}
    frames = sorted(int(ds.SourceImageSequence[0].ReferencedFrameNumber) for ds in out if ds.SeriesNumber == 901)
    assert frames == [1, 2, 3, 4, 5, 6]
    assert all(ds.SourceImageSequence[0].ReferencedSOPInstanceUID == enh.SOPInstanceUID for ds in out)


def test_maps_classic_and_parametric(tmp_path: Path, model: QMapModel) -> None:
    proto = small_protocol(
        destinations={"out": {"folder": {"path": "/x"}}, "pacs": {"folder": {"path": "/y"}}},
        maps={"classic": True, "parametric": True, "destinations": ["pacs"]},
    )
    env = Env(tmp_path, model, proto)
    job_id = env.ingest(phantom_series())
    res = run_job(env.ctx, job_id)
    assert res.queued == {"out": 12, "pacs": 3 * 6 + 3}
    pacs = [pydicom.dcmread(it.path) for it in env.outbox.items(job_id=job_id, destination="pacs")]
    classes = [ds.SOPClassUID for ds in pacs]
    assert classes.count("1.2.840.10008.5.1.4.1.1.30") == 3
    assert classes.count("1.2.840.10008.5.1.4.1.1.4") == 18


# ----------------------------------------------------------------------------- refusals


def test_gradient_echo_is_ineligible_with_exact_reason(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    src = phantom_series(scanning_sequence="GR", uid_seed="gre")
    job_id = env.ingest(src)
    with caplog.at_level(logging.INFO, logger="rtcontrast.node.pipeline"):
        res = run_job(env.ctx, job_id)
    assert res.state == "ineligible"
    assert res.reason == "ScanningSequence 'GR' is gradient echo: not spin-echo"
    job = env.jobs.job(job_id)
    assert job is not None and job.state == "ineligible" and job.reason == res.reason
    assert env.outbox.items(job_id=job_id) == [] and env.woken == 0
    lines = [r.getMessage() for r in caplog.records if "ineligible" in r.getMessage()]
    assert lines == [f"job {job_id} series {src[0].SeriesInstanceUID} ineligible: {res.reason}"]
    assert any(e.event == "ineligible" and e.detail == {"reason": res.reason} for e in env.jobs.audit_events(job_id))


@pytest.mark.parametrize(
    ("te", "tr", "expected"),
    [
        (200.0, 4000.0, "TE 200 ms outside the model's trained range 8-150 ms"),
        (90.0, 9000.0, "TR 9000 ms outside the model's trained range 300-6000 ms"),
    ],
)
def test_te_tr_outside_trained_range(env: Env, te: float, tr: float, expected: str) -> None:
    lo_te, hi_te = env.ctx.model.info.te_range_ms
    lo_tr, hi_tr = env.ctx.model.info.tr_range_ms
    expected = expected.replace("8-150", f"{lo_te:g}-{hi_te:g}").replace("300-6000", f"{lo_tr:g}-{hi_tr:g}")
    job_id = env.ingest(phantom_series(te=te, tr=tr, uid_seed=f"range{te}{tr}"))
    res = run_job(env.ctx, job_id)
    assert res.state == "ineligible"
    assert res.reason is not None and res.reason.startswith(expected), res.reason
    assert env.outbox.items(job_id=job_id) == []


def test_volume_error_fails_the_job_and_keeps_the_files(env: Env) -> None:
    src = phantom_series(uid_seed="gap")
    del src[2]  # a missing slice: inconsistent spacing
    job_id = env.ingest(src)
    res = run_job(env.ctx, job_id)
    assert res.state == "failed"
    assert res.reason is not None and res.reason.startswith("volume: inconsistent slice spacing")
    assert all(i.path.is_file() for i in env.jobs.job_instances(job_id))
    assert any(e.event == "failed" for e in env.jobs.audit_events(job_id))


# ----------------------------------------------------------------------------- QA actions


def test_qa_hold_sends_nothing(tmp_path: Path, model: QMapModel) -> None:
    env = Env(tmp_path, model, small_protocol(qa={"max_self_nrmse": 1e-9, "action": "hold"}))
    job_id = env.ingest(phantom_series())
    res = run_job(env.ctx, job_id)
    assert res.state == "held" and res.reason is not None and res.reason.startswith("QA hold: self NRMSE")
    assert env.outbox.items(job_id=job_id) == []
    job = env.jobs.job(job_id)
    assert job is not None and job.qa is not None and job.qa["violations"] and job.qa["action"] == "hold"
    audited = [e.detail for e in env.jobs.audit_events(job_id) if e.event == "qa"]
    assert len(audited) == 1 and audited[0] is not None and audited[0]["violations"] == job.qa["violations"]


def test_qa_warn_flags_every_image(tmp_path: Path, model: QMapModel) -> None:
    env = Env(tmp_path, model, small_protocol(qa={"max_self_nrmse": 1e-9, "action": "warn"}))
    job_id = env.ingest(phantom_series())
    res = run_job(env.ctx, job_id)
    assert res.state == "queued" and res.reason is not None and res.reason.startswith("QA warning:")
    out = env.queued_datasets(job_id)
    assert len(out) == 12
    for ds in out:
        assert ds.SeriesDescription.startswith("SYNTH") and ds.SeriesDescription.endswith(" QA!")
        assert len(ds.SeriesDescription) <= 64
        assert ds.ImageComments.startswith("QA WARNING: self NRMSE")


def test_qa_send_ignores_violations(tmp_path: Path, model: QMapModel) -> None:
    env = Env(tmp_path, model, small_protocol(qa={"max_self_nrmse": 1e-9, "action": "send"}))
    job_id = env.ingest(phantom_series())
    assert run_job(env.ctx, job_id).state == "queued"
    assert all("QA" not in ds.ImageComments for ds in env.queued_datasets(job_id))  # provenance only (#16)


# ----------------------------------------------------------------------------- logging


def test_json_logs_and_phi_filter() -> None:
    buf = io.StringIO()
    handler = setup_logging("json", "INFO", stream=buf)
    try:
        logging.getLogger("rtcontrast.test").info("series %s done", "1.2.3")
        logging.getLogger("rtcontrast.test").info("PatientName=%s", "PHANTOM^TEST")
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert lines[0]["msg"] == "series 1.2.3 done" and lines[0]["level"] == "INFO"
    assert "PHANTOM" not in buf.getvalue() and lines[1]["level"] == "WARNING"
    assert lines[1]["msg"].startswith("log record suppressed")
