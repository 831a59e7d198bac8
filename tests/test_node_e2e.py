"""The whole node with real peers on loopback: dcmtk storescu as the scanner, Orthanc as the TPS.

In-process nodes (the Node class, short idle timeouts, free ports, a temp var dir each)
where the test only needs to look inside; subprocess nodes (``python node.py run``)
where the test kills and restarts the node or checks the command line itself.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file

from rtcontrast.settings.node import NodeConfig, load_node_config
from rtcontrast.core.contract import ContractError
from rtcontrast.node.cli import cmd_check_config, cmd_resend, cmd_status
from rtcontrast.node.ops.status import read_status
from rtcontrast.node.service import Node
from rtcontrast.settings.protocol import ProtocolConfig
from rtcontrast.core.inference import QMapModel
from rtcontrast.node.receive.scp import StoredInstance
from rtcontrast.node.receive.spool import Spool
from tests.conftest import free_port
from tests.dicomgen import write_series
from tests.orthanc import Orthanc, orthanc  # noqa: F401  (fixture)
from tests.support import MODEL_PATH, REPO, dciodvfy_errors, node_settings, phantom_series, storescu, wait_for

GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")


# ----------------------------------------------------------------------------- helpers


def recipes(n: int, dest: str) -> list[dict[str, Any]]:
    rows = [("T2w", 100, 4000), ("T1w", 10, 500), ("PDw", 10, 4000)]
    return [
        {"key": k, "label": k, "te_ms": te, "tr_ms": tr, "series_number": 901 + i,
         "destinations": [dest]}
        for i, (k, te, tr) in enumerate(rows[:n])
    ]


#: The protocol's default QA thresholds: the phantom series sent here pass them (tests/test_pins_qa.py).
DEFAULT_QA = {"action": "warn"}


def tps_protocol(dicom_port: int, n_recipes: int = 3) -> dict[str, Any]:
    return {
        "version": "e2e",
        "qa": DEFAULT_QA,
        "destinations": {"tps": {"dicom": {"host": "127.0.0.1", "port": dicom_port, "ae_title": "ORTHANC",
                                           "connect_timeout_s": 2, "acse_timeout_s": 5}}},
        "recipes": recipes(n_recipes, "tps"),
    }


def folder_protocol(path: Path, n_recipes: int = 1) -> dict[str, Any]:
    return {"version": "e2e", "qa": DEFAULT_QA, "destinations": {"out": {"folder": {"path": str(path)}}},
            "recipes": recipes(n_recipes, "out")}


def db_rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    """Read the node's database from outside (as an operator's script would)."""
    if not db.exists():
        return []
    conn = sqlite3.connect(db, timeout=10)
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return []
    finally:
        conn.close()


# ----------------------------------------------------------------------------- end to end


def test_scanner_to_tps_geometry_lineage_and_resend(tmp_path: Path, make_node: Callable[..., Node],
                                                    orthanc: Orthanc) -> None:  # noqa: F811
    node = make_node(tps_protocol(orthanc.dicom_port, 3))
    src = phantom_series(n=12, size=128)
    files = write_series(src, tmp_path / "scanner", shuffle=True)
    by_sop = {ds.SOPInstanceUID: ds for ds in src}

    t0 = time.monotonic()
    res = storescu(node.port, files)
    assert res.returncode == 0, res.stderr
    assert node.wait_idle(120), "node did not finish"
    first_latency = time.monotonic() - t0
    (job,) = node.jobs.recent_jobs()
    assert job.state == "delivered" and job.reason is None, (job.state, job.reason)  # no QA warning
    assert job.instance_count == 12 and job.protocol_version and job.protocol_version.startswith("e2e+sha256:")

    series = orthanc.series()
    assert len(series) == 3
    assert sorted(s["MainDicomTags"]["SeriesDescription"] for s in series) == sorted(
        r.series_description for r in node.protocol.recipes
    )
    first_uids = sorted(orthanc.sop_instance_uids())
    assert len(first_uids) == 36 == len(set(first_uids))
    for s in series:
        assert len(s["Instances"]) == 12
        referenced: set[str] = set()
        for iid in s["Instances"]:
            ds = pydicom.dcmread(orthanc.save_instance(iid, tmp_path / "got.dcm"))
            source = by_sop[ds.SourceImageSequence[0].ReferencedSOPInstanceUID]
            referenced.add(source.SOPInstanceUID)
            assert ds.StudyInstanceUID == source.StudyInstanceUID
            assert ds.FrameOfReferenceUID == source.FrameOfReferenceUID
            for kw in GEOMETRY:
                assert [str(v) for v in ds[kw].value] == [str(v) for v in source[kw].value], kw
            assert ds.SourceImageSequence[0].ReferencedSOPClassUID == source.SOPClassUID
            assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
            assert ds.SyntheticData == "YES" and list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert referenced == set(by_sop)
        assert dciodvfy_errors(tmp_path / "got.dcm") == []

    # the scanner sends the same series again: a new job, the TPS gets replacements only
    res = storescu(node.port, files)
    assert res.returncode == 0, res.stderr
    assert node.wait_idle(120)
    jobs = node.jobs.recent_jobs()
    assert [j.state for j in jobs] == ["delivered", "delivered"]
    assert sorted(orthanc.sop_instance_uids()) == first_uids
    assert len(orthanc.series()) == 3
    print(f"\nscanner -> TPS, 12 slices x 3 recipes: {first_latency:.1f} s (incl. 0.3 s release grace)")


def test_refusals_ineligible_out_of_range_and_ct(tmp_path: Path, make_node: Callable[..., Node],
                                                caplog: pytest.LogCaptureFixture) -> None:
    export = tmp_path / "export"
    node = make_node(folder_protocol(export))
    gre = phantom_series(scanning_sequence="GR", uid_seed="gre")
    hot = phantom_series(te=200, uid_seed="te200")
    with caplog.at_level("INFO"):
        assert storescu(node.port, write_series(gre, tmp_path / "gre")).returncode == 0
        assert storescu(node.port, write_series(hot, tmp_path / "hot")).returncode == 0
        ct = storescu(node.port, [get_testdata_file("CT_small.dcm")], extra=("-R",))  # propose CT only
        assert node.wait_idle(60)
    assert ct.returncode != 0  # no presentation context: the CT instance was never sent

    states = {j.series_uid: (j.state, j.reason) for j in node.jobs.recent_jobs()}
    assert states[gre[0].SeriesInstanceUID] == ("ineligible", "ScanningSequence 'GR' is gradient echo: not spin-echo")
    state, reason = states[hot[0].SeriesInstanceUID]
    lo, hi = node.model.info.te_range_ms
    assert state == "ineligible" and reason.startswith(f"TE 200 ms outside the model's trained range {lo:g}-{hi:g} ms")
    assert len(states) == 2  # nothing of the CT reached the job store
    assert not export.exists() or not any(export.rglob("*.dcm"))

    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"series {gre[0].SeriesInstanceUID} ineligible: ScanningSequence 'GR' is gradient echo" in text
    assert "refused presentation contexts" in text and "1.2.840.10008.5.1.4.1.1.2" in text
    for phi in ("PHANTOM", "RTC-PHANTOM-001", "19700101", "CompressedSamples"):
        assert phi not in text


def test_restart_resumes_jobs_supersedes_and_completes_series(tmp_path: Path, model: QMapModel) -> None:
    """State left by a crash: a job mid-inference, a newer job of the same series, an unclaimed series."""
    var = tmp_path / "var"
    config = NodeConfig.model_validate(node_settings(var))
    protocol = ProtocolConfig.model_validate(folder_protocol(tmp_path / "export", 2))
    # what a node wrote before it died, using its own stores
    from rtcontrast.node.store import db
    from rtcontrast.node.store.jobs import JobStore
    from datetime import datetime, timezone

    spool, conn = Spool(config.spool_path), db.connect(config.db_file)
    jobs = JobStore(conn)

    def receive(datasets: list[pydicom.Dataset]) -> None:
        for ds in datasets:
            jobs.record_instance(StoredInstance(
                path=spool.store(ds), study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
                sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, calling_ae="SCANNER",
                peer_address="127.0.0.1:1", received_at=datetime.now(timezone.utc)))

    a, b = phantom_series(uid_seed="A"), phantom_series(uid_seed="B")
    receive(a)
    old = jobs.create_job(a[0].StudyInstanceUID, a[0].SeriesInstanceUID)
    assert old is not None
    jobs.set_state(old, "inferring")
    receive(a[:2])  # re-sent instances: a newer job covers the whole series
    new = jobs.create_job(a[0].StudyInstanceUID, a[0].SeriesInstanceUID)
    receive(b)  # received, never made into a job
    (spool.series_dir(b[0].StudyInstanceUID, b[0].SeriesInstanceUID) / ".x.dcm.tmp").write_bytes(b"partial")
    conn.close()

    node = Node(config, protocol, model=model)
    node.start()
    try:
        assert node.wait_idle(60)
        by_id = {j.id: j for j in node.jobs.recent_jobs()}
        assert by_id[old].state == "failed" and by_id[old].reason == f"superseded by job {new}"
        assert by_id[new].state == "delivered"
        others = [j for j in by_id.values() if j.series_uid == b[0].SeriesInstanceUID]
        assert [j.state for j in others] == ["delivered"]
        assert not list(config.spool_path.rglob(".*.tmp"))
        assert len(list((tmp_path / "export").rglob("*.dcm"))) == 2 * 2 * 6
    finally:
        node.stop()


def test_dead_letters_status_and_resend(tmp_path: Path, model: QMapModel,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    closed = free_port()  # nobody listens: every association fails
    cfg_file = tmp_path / "node.yaml"
    cfg_file.write_text(yaml.safe_dump(node_settings(tmp_path / "var", delivery={
        "max_attempts": 1, "base_delay_s": 0.1, "max_delay_s": 0.1, "poll_interval_s": 0.2})))
    config = load_node_config(cfg_file)
    proto = tps_protocol(closed, 1)
    node = Node(config, ProtocolConfig.model_validate(proto), model=model)
    node.start()
    try:
        assert storescu(node.port, write_series(phantom_series(uid_seed="dead"), tmp_path / "in")).returncode == 0
        job = wait_for(lambda: [j for j in node.jobs.recent_jobs() if j.reason and "dead-lettered" in j.reason],
                       60, "dead letters")[0]
        assert job.state == "queued" and job.reason.startswith("6 instance(s) dead-lettered")
    finally:
        node.stop()
    st = read_status(config)
    assert st.queues == {"tps": {"pending": 0, "delivered": 0, "dead_letter": 6}}
    assert "tps (ORTHANC@127.0.0.1" in (st.dead_letters[0]["last_error"] or "")
    assert cmd_status(cfg_file) == 0
    out = capsys.readouterr().out
    assert "tps: pending 0, delivered 0, dead_letter 6" in out and "dead letters: 6" in out
    assert cmd_resend(cfg_file, "other", None) == 0 and "0 dead letter(s)" in capsys.readouterr().out
    assert cmd_resend(cfg_file, "tps", job.id) == 0 and "6 dead letter(s) put back" in capsys.readouterr().out
    assert read_status(config).queues["tps"]["pending"] == 6


# ----------------------------------------------------------------------------- subprocess nodes


class NodeProcess:
    """``python node.py run ...`` with its log in a file."""

    def __init__(self, args: list[str], cwd: Path, log: Path) -> None:
        self.log = log
        self._fh = open(log, "ab")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, str(REPO / "node.py"), "run", *args], cwd=cwd,
                                     stdout=self._fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_listening(self, timeout_s: float = 60) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.text()}")
            return "listening on" in self.text()
        wait_for(ready, timeout_s, "the node to listen")

    def signal(self, sig: int) -> int:
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self._fh.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._fh.close()


def test_kill_mid_job_tps_down_restart_delivers_exactly_once(tmp_path: Path, orthanc: Orthanc) -> None:  # noqa: F811
    orthanc.stop()  # the TPS is down
    var = tmp_path / "var"
    settings = node_settings(var, delivery={"max_attempts": 50, "base_delay_s": 0.5, "max_delay_s": 1.0,
                                            "poll_interval_s": 0.2})
    (tmp_path / "node.yaml").write_text(yaml.safe_dump(settings))
    (tmp_path / "protocol.yaml").write_text(yaml.safe_dump(tps_protocol(orthanc.dicom_port, 2)))
    args = ["--config", str(tmp_path / "node.yaml"), "--protocol", str(tmp_path / "protocol.yaml")]
    db = var / "rtcontrast.db"

    first = NodeProcess(args, REPO, tmp_path / "node1.log")
    try:
        first.wait_listening()
        res = storescu(settings["port"], write_series(phantom_series(n=12, size=128, uid_seed="kill"), tmp_path / "in"))
        assert res.returncode == 0, res.stderr
        wait_for(lambda: db_rows(db, "SELECT id FROM jobs"), 30, "the job")
    finally:
        first.kill()  # SIGKILL right after the job was created
    state_at_kill = db_rows(db, "SELECT state FROM jobs")[0][0]

    second = NodeProcess(args, REPO, tmp_path / "node2.log")
    try:
        second.wait_listening()
        # the TPS is still down: items wait with backoff, the error is recorded
        def retried() -> list[tuple[Any, ...]]:
            rows = db_rows(db, "SELECT attempts, last_error FROM outbox_items WHERE state='pending'")
            ok = len(rows) == 24 and min(r[0] for r in rows) >= 1 and max(r[0] for r in rows) >= 2
            return rows if ok else []

        rows = wait_for(retried, 60, "failed attempts with backoff")
        assert all("tps (ORTHANC@127.0.0.1" in (err or "") for _, err in rows)
        orthanc.start()
        wait_for(lambda: db_rows(db, "SELECT state FROM jobs") == [("delivered",)], 60, "delivery")
        rc = second.signal(signal.SIGTERM)
    finally:
        second.kill()
    assert rc == 0, second.text()
    uids = orthanc.sop_instance_uids()
    assert len(uids) == 24 == len(set(uids)) and len(orthanc.series()) == 2
    text = second.text()
    assert "resuming job 1" in text or state_at_kill == "queued", text
    assert "stopped" in text.splitlines()[-1]


def test_embedded_defaults_export_to_var_export(tmp_path: Path) -> None:
    """``python node.py run`` with no files in a fresh directory: the default model (qmap-se: a pelvis series passes its
    QA), ./var, folder export."""
    port = free_port()
    proc = NodeProcess(["--port", str(port)], tmp_path, tmp_path / "node.log")
    try:
        proc.wait_listening()
        src = phantom_series(uid_seed="defaults", size=128)  # at 64x64 qmap-se 1.4.0 holds it (T1 sd 48 %)
        assert storescu(port, write_series(src, tmp_path / "in")).returncode == 0
        n_recipes = len(ProtocolConfig().recipes)
        export = tmp_path / "var" / "export"
        wait_for(lambda: len(list(export.rglob("*.dcm"))) == n_recipes * 6, 60, "exported files")
        rc = proc.signal(signal.SIGTERM)
    finally:
        proc.kill()
    assert rc == 0
    text = proc.text()
    assert f"listening on 0.0.0.0:{port} as RTCONTRAST" in text
    assert text.count("model qmap-se ") == 1 and "sha256" in text and "ExecutionProvider" in text
    assert (tmp_path / "var" / "rtcontrast.db").exists() and (tmp_path / "var" / "spool").is_dir()
    exported = next(export.rglob("*.dcm"))
    assert exported.parent.parent.name == src[0].StudyInstanceUID
    assert "timings: assemble=" in text and "PHANTOM" not in text


# ----------------------------------------------------------------------------- configuration and model


def test_check_config_shipped_files_ok() -> None:
    r = subprocess.run([sys.executable, "node.py", "check-config"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK: node config/node.yaml") and len(r.stdout.strip().splitlines()) == 1


def test_check_config_broken_protocol(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "protocol.yaml"
    bad.write_text(
        "version: '2'\n"
        "destinations:\n"
        "  out: {folder: {path: /tmp/x}}\n"
        "recipes:\n"
        "  - {key: A, label: a, te_ms: -5, tr_ms: 500, series_number: 901, destinations: [out]}\n"
        "  - {key: B, label: b, te_ms: 10, tr_ms: 500, series_number: 902, destinations: [nowhere]}\n"
    )
    assert cmd_check_config(REPO / "config" / "node.yaml", bad) == 1
    err = capsys.readouterr().err
    assert f"{bad}:5: recipes[0].te_ms: Input should be greater than 0" in err
    assert f"{bad}:6: recipes[1].destinations[0]: unknown destination 'nowhere'" in err


def test_model_with_unknown_contract_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    m = onnx.load(str(MODEL_PATH))
    for prop in m.metadata_props:
        if prop.key == "rtcontrast.contract":
            prop.value = "qmap/9"
    bad = tmp_path / "future.onnx"
    onnx.save(m, str(bad))
    with pytest.raises(ContractError, match="declares contract 'qmap/9'"):
        Node(NodeConfig(model_path=bad, var_dir=tmp_path / "var"), ProtocolConfig())
    cfg = tmp_path / "node.yaml"
    cfg.write_text(f"var_dir: {tmp_path / 'var'}\nport: {free_port()}\nmodel_path: {bad}\n")
    assert cmd_check_config(cfg, None) == 1
    assert f"{cfg}:3: model_path: " in capsys.readouterr().err
    r = subprocess.run([sys.executable, str(REPO / "node.py"), "run", "--config", str(cfg)], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "qmap/9" in r.stderr and "listening" not in r.stderr
