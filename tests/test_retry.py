"""Transient vs permanent failures (#15 finding 4): nothing acknowledged is lost to a full disk.

Before: 15 instances answered Success, derivation hit ENOSPC, the job failed for good and
no command could re-run it.  Now a job that fails with ENOSPC (or a busy/full database)
is put back with backoff until it succeeds, with a metric and a log line, and an admin
can re-run any failed job from the spool (``node.py retry --job N``).

The disk-full fault is injected at the outbox's file write (the real write path raises
the real ``OSError(ENOSPC)`` a full file system gives); everything else is real: the node,
dcmtk storescu as the scanner, the folder destination, SQLite.
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml

from rtcontrast.node import cli
from rtcontrast.node.dispatch import outbox as outbox_mod
from rtcontrast.node.retry import transient_cause
from rtcontrast.node.store.jobs import JobState
from tests.dicomgen import write_series
from tests.support import LENIENT_QA, node_settings, phantom_series, storescu, wait_for

pytestmark = pytest.mark.network


def protocol(export: Path) -> dict[str, Any]:
    return {"destinations": {"out": {"folder": {"path": str(export)}}},
            "recipes": [{"key": "T2w", "label": "T2w", "te_ms": 100, "tr_ms": 4000, "series_number": 901,
                         "destinations": ["out"]}],
            "qa": LENIENT_QA}


def test_transient_causes() -> None:
    assert transient_cause(OSError(errno.ENOSPC, "No space left on device")) == "disk_full"
    assert transient_cause(sqlite3.OperationalError("database is locked")) == "database_busy"
    try:
        try:
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        except OSError as inner:
            raise RuntimeError("derive failed") from inner
    except RuntimeError as outer:
        assert transient_cause(outer) == "disk_full"
    assert transient_cause(ValueError("bad series")) is None
    assert transient_cause(OSError(errno.ENOENT, "gone")) is None


def test_enospc_after_ack_is_retried_until_space_returns(make_node: Any, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    full = {"on": True, "hits": 0}
    real_write = outbox_mod._atomic_write

    def write(dest: Path, fn: Any, sync_dir: bool = True) -> None:
        if full["on"]:
            full["hits"] += 1
            raise OSError(errno.ENOSPC, "No space left on device", str(dest))
        real_write(dest, fn, sync_dir)

    monkeypatch.setattr(outbox_mod, "_atomic_write", write)
    node = make_node(protocol(tmp_path / "export"))
    dss = phantom_series(n=3, size=32)
    assert storescu(node.port, write_series(dss, tmp_path / "in")).returncode == 0
    study, uid = str(dss[0].StudyInstanceUID), str(dss[0].SeriesInstanceUID)
    wait_for(lambda: full["hits"] > 0 and node.jobs.jobs_for_series(study, uid)[-1].retry_count >= 1, 120,
             "the first transient failure")
    job = node.jobs.jobs_for_series(study, uid)[-1]
    assert job.state == JobState.RECEIVED and "transient failure (disk_full)" in (job.reason or "")
    assert node.metrics.job_retries.labels("disk_full")._value.get() >= 1
    full["on"] = False  # space returns
    done = wait_for(lambda: (j := node.jobs.job(job.id)) and j.state in (JobState.QUEUED, JobState.DELIVERED) and j,
                    60, "the job to succeed once space is back")
    assert done.id == job.id
    wait_for(lambda: len(list((tmp_path / "export").rglob("*.dcm"))) == 3, 30, "three derived slices")
    assert "transient failure (disk_full" in caplog.text and "retry 1 in 5 s" in caplog.text


def test_admin_retry_reruns_a_failed_job(make_node: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = node_settings(tmp_path / "var", release_grace_s=3.0, series_idle_timeout_s=5.0)
    node = make_node(protocol(tmp_path / "export"), **{k: v for k, v in settings.items() if k != "port"})
    dss = phantom_series(n=3, size=32)
    assert storescu(node.port, write_series(dss, tmp_path / "in")).returncode == 0
    study, uid = str(dss[0].StudyInstanceUID), str(dss[0].SeriesInstanceUID)
    # a permanent failure: a spooled file went missing before the job ran (moved away by hand)
    rec = node.jobs.instance(str(dss[0].SOPInstanceUID))
    assert rec is not None and node.jobs.jobs_for_series(study, uid) == []  # within the release grace
    member = rec.path
    moved = member.with_suffix(".away")
    member.rename(moved)
    first = wait_for(lambda: node.jobs.jobs_for_series(study, uid), 30, "the job")[0]
    failed = wait_for(lambda: (j := node.jobs.job(first.id)) and j.state == JobState.FAILED and j, 60,
                      "the failed job")
    assert "missing" in (failed.reason or "")
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({**settings, "port": node.port}))
    assert cli.main(["retry", "--config", str(cfg), "--job", str(first.id)]) == 1  # the file is still gone
    assert "spooled file(s) are gone" in capsys.readouterr().err
    moved.rename(member)
    assert cli.main(["retry", "--config", str(cfg), "--job", str(first.id), "--note", "file restored"]) == 0
    wait_for(lambda: node.jobs.job(first.id).state in (JobState.QUEUED, JobState.DELIVERED), 60, "the re-run")
    assert any(e.event == "retried" for e in node.jobs.audit_events(first.id))
    assert cli.main(["retry", "--config", str(cfg), "--job", str(first.id)]) == 1  # only failed jobs
