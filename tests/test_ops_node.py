"""Operations inside one node process: protocol reload while a job runs, QA hold -> preview
-> release -> delivered, status/audit for an admin, retention purge.

Real peers where they are cheap (dcmtk storescu as the scanner, a folder destination as
the TPS); the node is in-process so the test can look at its database and files.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

import node as node_cli
import rtcontrast.node.service as node_mod
from rtcontrast.node.store import db
from rtcontrast.settings.node import NodeConfig
from rtcontrast.node.store.jobs import JobStore
from rtcontrast.node.admin import release_job
from rtcontrast.node.ops.status import read_status
from rtcontrast.node.service import Node
from rtcontrast.settings.protocol import ProtocolConfig
from rtcontrast.core.inference import QMapModel
from rtcontrast.node.ops.retention import purge
from rtcontrast.node.receive.scp import StoredInstance
from tests.dicomgen import write_series
from tests.support import LENIENT_QA, MODEL_PATH, node_settings, phantom_series, storescu, wait_for

PHANTOM_NAME, PHANTOM_ID = "PHANTOM^TEST", "RTC-PHANTOM-001"


@pytest.fixture(scope="module")
def model() -> QMapModel:
    return QMapModel(MODEL_PATH, "cpu")


def recipe(key: str, te: float, tr: float, number: int) -> dict[str, Any]:
    return {"key": key, "label": key, "te_ms": te, "tr_ms": tr, "series_number": number, "destinations": ["out"]}


def protocol(export: Path, version: str, recipes: list[dict[str, Any]], qa: dict[str, Any] | None = None) -> dict[str, Any]:
    """Lenient QA unless ``qa`` is given: these tests are about operations (reload, metrics,
    audit, hold/release), and the QA tests that need a violation pass their own thresholds."""
    return {"version": version, "qa": qa or LENIENT_QA, "destinations": {"out": {"folder": {"path": str(export)}}},
            "recipes": recipes}


@pytest.fixture
def started(tmp_path: Path) -> Iterator[list[Node]]:
    nodes: list[Node] = []
    yield nodes
    for n in nodes:
        n.stop(timeout_s=10)


def make(tmp_path: Path, model: QMapModel, proto: dict[str, Any], started: list[Node], **over: Any) -> Node:
    proto_path = tmp_path / "protocol.yaml"
    proto_path.write_text(yaml.safe_dump(proto))
    settings = node_settings(tmp_path / "var", metrics={"enabled": False}, **over)
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(settings))
    n = Node(NodeConfig.model_validate(settings), ProtocolConfig.model_validate(proto), model=model,
             protocol_path=proto_path)
    n.start()
    started.append(n)
    return n


def exported(export: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in export.rglob("*.dcm"):
        out[p.parent.name] = out.get(p.parent.name, 0) + 1
    return out


# ----------------------------------------------------------------------------- reload


def test_reload_mid_job_keeps_the_jobs_protocol(tmp_path: Path, model: QMapModel, started: list[Node],
                                                monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    export = tmp_path / "export"
    node = make(tmp_path, model, protocol(export, "r1", [recipe("T2w", 100, 4000, 901)]), started)
    old_version = node.protocol.audit_version
    proto_path = tmp_path / "protocol.yaml"

    # broken: refused, every field error logged, the old protocol stays
    proto_path.write_text("version: r-bad\nrecipes:\n  - {key: A, label: a, te_ms: 0, tr_ms: 500, series_number: 901,"
                          " destinations: [nowhere]}\nqa: {action: maybe}\n")
    with caplog.at_level(logging.ERROR, logger="rtcontrast.node.service"):
        assert node.reload() is False
    errors = [r.getMessage() for r in caplog.records]
    assert any(f"{proto_path}:3: recipes[0].te_ms: Input should be greater than 0" in e for e in errors), errors
    assert any("recipes[0].destinations[0]: unknown destination 'nowhere'" in e for e in errors), errors
    assert any("qa.action: Input should be 'send', 'warn' or 'hold'" in e for e in errors), errors
    assert node.protocol.audit_version == old_version

    # a reload that lands while a job runs: that job finishes with the protocol it started with
    good = protocol(export, "r2", [recipe("T2w", 100, 4000, 901), recipe("T1w", 10, 500, 902)])
    real_run_job = node_mod.run_job

    def run_job_with_reload(ctx: Any, job_id: int) -> Any:
        proto_path.write_text(yaml.safe_dump(good))
        assert node.reload() is True
        monkeypatch.setattr(node_mod, "run_job", real_run_job)
        return real_run_job(ctx, job_id)

    monkeypatch.setattr(node_mod, "run_job", run_job_with_reload)
    assert storescu(node.port, write_series(phantom_series(uid_seed="mid1"), tmp_path / "s1")).returncode == 0
    assert node.wait_idle(90)
    (job1,) = node.jobs.recent_jobs()
    assert job1.state == "delivered" and job1.protocol_version == old_version
    assert sorted(exported(export).values()) == [6]  # one recipe: the old protocol
    assert node.protocol.version == "r2"

    # the next series gets the new protocol (a new recipe appears)
    assert storescu(node.port, write_series(phantom_series(uid_seed="mid2"), tmp_path / "s2")).returncode == 0
    assert node.wait_idle(90)
    job2 = node.jobs.recent_jobs()[0]
    assert job2.state == "delivered" and job2.protocol_version == node.protocol.audit_version != old_version
    assert sorted(exported(export).values()) == [6, 6, 6]


# ----------------------------------------------------------------------------- QA hold -> release


def test_hold_preview_status_release_audit(tmp_path: Path, model: QMapModel, started: list[Node],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    export = tmp_path / "export"
    hold = {"max_self_nrmse": 1e-9, "max_te_error_frac": 100.0, "max_tr_error_frac": 100.0, "action": "hold"}
    node = make(tmp_path, model, protocol(export, "h1", [recipe("T2w", 100, 4000, 901)], qa=hold), started)
    src = phantom_series(uid_seed="hold")
    assert storescu(node.port, write_series(src, tmp_path / "in")).returncode == 0
    assert node.wait_idle(90)
    (job,) = node.jobs.recent_jobs()
    assert job.state == "held" and job.reason is not None and job.reason.startswith("QA hold: self NRMSE")
    assert not export.exists() or exported(export) == {}

    preview = tmp_path / "var" / "jobs" / str(job.id) / "preview.png"
    assert preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and preview.stat().st_size > 10_000
    assert job.qa is not None and job.qa["preview"] == str(preview)

    status = read_status(node.config).render()
    assert "held for an admin: 1" in status and f"#{job.id} series {src[0].SeriesInstanceUID}" in status
    assert "disk spool:" in status and "recent audit events" in status

    with pytest.raises(ValueError, match="no job 999"):
        release_job(node.config, 999)
    cfg = str(tmp_path / "node.yaml")
    assert node_cli.main(["release", "--config", cfg, "--job", str(job.id), "--note", "checked by physicist",
                          "--user", "AB"]) == 0
    wait_for(lambda: (j := node.jobs.job(job.id)) is not None and j.state == "delivered", 90, "released job delivered")
    files = list(export.rglob("*.dcm"))
    assert len(files) == 6
    ds = pydicom.dcmread(files[0])
    assert ds.ImageComments.startswith("QA hold released by AB 20") and ds.SeriesDescription.endswith(" QA-REV")
    assert ": checked by physicist. QA: self NRMSE" in ds.ImageComments
    events = [e.event for e in node.jobs.audit_events(job.id)]
    assert events.index("held") < events.index("released") < events.index("hold_overridden")
    assert node_cli.main(["release", "--config", cfg, "--job", str(job.id)]) == 1  # delivered: not held
    capsys.readouterr()

    # the audit trail: from where, made with what, to where, with which status
    assert node_cli.main(["audit", "--config", cfg, "--series", src[0].SeriesInstanceUID]) == 0
    out = capsys.readouterr().out
    assert f"job {job.id}: delivered" in out
    assert "from   SCANNER at 127.0.0.1: 6 instance(s)" in out, out
    assert f"made   with protocol {node.protocol.audit_version}, model qmap-pelvis" in out
    derived_series = pydicom.dcmread(files[0]).SeriesInstanceUID
    assert f"to     out: series {derived_series}: delivered 6" in out
    assert "released" in out and "hold_overridden" in out
    assert PHANTOM_NAME not in out and PHANTOM_ID not in out
    assert node_cli.main(["audit", "--config", cfg, "--job", "4242"]) == 1


# ----------------------------------------------------------------------------- retention


def _record(jobs: JobStore, spool: Path, study: str, series: str, n: int) -> list[Path]:
    paths = []
    for i in range(n):
        sop = f"{series}.{i + 1}"
        p = spool / study / series / f"{sop}.dcm"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * 100)
        jobs.record_instance(StoredInstance(p, study, series, sop, "1.2.840.10008.5.1.4.1.1.4", "SCANNER",
                                            "127.0.0.1", datetime.now(timezone.utc)))
        paths.append(p)
    return paths


def _age(paths: list[Path], days: float) -> None:
    t = time.time() - days * 86400
    for p in paths:
        os.utime(p, (t, t))


def test_retention_purges_only_finished_old_series(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    var = tmp_path / "var"
    spool, export, jobs_root = var / "spool", tmp_path / "export", var / "jobs"
    conn = db.connect(var / "rtcontrast.db")
    jobs = JobStore(conn)
    files: dict[str, list[Path]] = {}
    job_ids: dict[str, int] = {}
    for name, state in (("1.1", "delivered"), ("1.2", "held"), ("1.3", "queued"), ("1.5", "ineligible"),
                        ("1.6", "failed")):
        files[name] = _record(jobs, spool, "9.9", name, 3)
        jid = jobs.create_job("9.9", name)
        assert jid is not None
        jobs.set_state(jid, state, "test")
        job_ids[name] = jid
        d = jobs_root / str(jid)
        d.mkdir(parents=True)
        (d / "preview.png").write_bytes(b"png")
        files[name].append(d / "preview.png")
    files["1.4"] = _record(jobs, spool, "9.9", "1.4", 2)  # received, not yet a job
    # exports: derived series 2.1 (delivered) and 2.3 (still pending for 'out')
    for derived in ("2.1", "2.3"):
        p = export / "9.9" / derived / f"{derived}.1.dcm"
        p.parent.mkdir(parents=True)
        p.write_bytes(b"y" * 50)
        files[derived] = [p]
    conn.execute(
        "INSERT INTO outbox_items (job_id, destination, sop_instance_uid, sop_class_uid, transfer_syntax_uid,"
        " study_instance_uid, series_instance_uid, path, state, next_attempt_at, created_at, updated_at)"
        " VALUES (?, 'out', '2.3.1', '1.2', '1.2.840.10008.1.2.1', '9.9', '2.3', '/nowhere', 'pending', 0, 0, 0)",
        (str(job_ids["1.3"]),),
    )
    conn.close()
    for name, paths in files.items():
        _age(paths, 1 if name == "1.6" else 40)  # 1.6 failed but recent

    kw = dict(spool_root=spool, outbox_root=var / "outbox", jobs_root=jobs_root, export_dirs={"out": export},
              retention_days=30)
    dry = purge(var / "rtcontrast.db", dry_run=True, **kw)
    assert dry.spool_series == ["1.1", "1.5"] and dry.spool_files == 6
    assert dry.export_series == ["2.1"] and dry.job_dirs == sorted([job_ids["1.1"], job_ids["1.5"]])
    assert all(p.exists() for paths in files.values() for p in paths)  # dry run: nothing removed

    # the CLI says the same
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({"var_dir": str(var), "retention_days": 30}))
    proto = tmp_path / "protocol.yaml"
    proto.write_text(yaml.safe_dump(protocol(export, "p", [recipe("T2w", 100, 4000, 901)])))
    assert node_cli.main(["purge", "--config", str(cfg), "--protocol", str(proto), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would remove 6 spool file(s) of 2 series, 1 export file(s) of 1 series, 2 job folder(s)" in out

    report = purge(var / "rtcontrast.db", **kw)
    assert report.spool_files == 6 and not report.dry_run
    for name in ("1.1", "1.5", "2.1"):
        assert not any(p.exists() for p in files[name]), name
    for name in ("1.2", "1.3", "1.4", "1.6", "2.3"):  # held, queued, unclaimed, recent, owed export
        assert all(p.exists() for p in files[name]), name
    assert not (spool / "9.9" / "1.1").exists() and (spool / "9.9").is_dir()
    assert report.kept_pending_series == 3
    # the audit rows stay: what happened is still answerable
    conn = db.connect(var / "rtcontrast.db")
    assert JobStore(conn).job(job_ids["1.1"]) is not None and len(JobStore(conn).job_instances(job_ids["1.1"])) == 3
    conn.close()
    assert purge(var / "rtcontrast.db", **kw).spool_files == 0  # idempotent
