"""Crash suite: SIGKILL the node at random moments of receive, inference, derivation and sending.

Why: the node promises that nothing acknowledged is lost and nothing is delivered twice
(its stages are deterministic and restartable, its spool and outbox durable).  Each run
starts the node (a restart of the previous run's state), a scanner (pynetdicom, which
records every status it gets) sends a fresh 3-series workload plus whatever it was not
told *Success* for earlier, and the node is killed when the target stage is reached
(polled in its database) after a random extra delay.  At the end a last node runs to
completion and the suite checks:

* every instance the scanner saw *Success* for was on disk (spool file + DB row) right
  after the kill that followed;
* every received instance belongs to a delivered job covering its whole series;
* the TPS (Orthanc) holds exactly the expected derived SOP Instance UIDs (deterministic,
  computed here): none missing, none unexpected; nothing dead-lettered.

CI form: 3 kills; full form (RTC_FULL=1): 20.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pydicom

from rtcontrast.core.inference import QMapModel
from tests.orthanc import Orthanc, orthanc  # noqa: F401  (fixture)
from tests.reliability.helpers import (
    FULL,
    MODEL_PATH,
    RECIPES,
    NodeProcess,
    db_rows,
    expected_derived,
    node_settings,
    send,
    series,
    tps_protocol,
    wait_for,
    write_configs,
)

N_RUNS = 20 if FULL else 3
N_SLICES = 12
SIZE = 64
N_RECIPES = 2
STAGES = ("receive", "infer", "send", "derive")  # CI (3 runs) covers receive, infer, send


def _stage_reached(db: Path, stage: str) -> bool:
    if stage == "infer":
        return bool(db_rows(db, "SELECT 1 FROM jobs WHERE state IN ('assembling', 'inferring') LIMIT 1"))
    if stage == "derive":
        return bool(db_rows(db, "SELECT 1 FROM jobs WHERE state IN ('rendering', 'deriving') LIMIT 1"))
    if stage == "send":
        rows = db_rows(db, "SELECT SUM(state='delivered'), SUM(state='pending') FROM outbox_items")
        return bool(rows and rows[0][0] and rows[0][1])
    raise ValueError(stage)


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(tmp_path: Path, orthanc: Orthanc) -> None:  # noqa: F811
    rng = random.Random(20261125)
    version = QMapModel(MODEL_PATH, "cpu").info.version
    var = tmp_path / "var"
    db = var / "rtcontrast.db"
    # a receiver process beside the main one: an instance it acknowledged must survive the main process's kill too
    settings = node_settings(var, receive_processes=2)
    protocol = tps_protocol(orthanc.dicom_port, N_RECIPES)
    # 12-slice series judged on 5 of them and the rest inferred while streaming (the path a long series takes)
    protocol["qa"] = {**protocol["qa"], "sample_slices": 4}
    args = write_configs(tmp_path, settings, protocol)
    port = settings["port"]
    keys = [k for k, _, _ in RECIPES[:N_RECIPES]]
    log = tmp_path / "node.log"

    sources: dict[str, pydicom.Dataset] = {}  # every instance the scanner must get through
    acked: set[str] = set()  # SOP UIDs the scanner saw Success for
    report: list[str] = []

    def unacked_by_series() -> list[list[pydicom.Dataset]]:
        groups: dict[str, list[pydicom.Dataset]] = {}
        for uid, ds in sources.items():
            if uid not in acked:
                groups.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
        return list(groups.values())

    def scanner(batches: list[list[pydicom.Dataset]], out: list[set[str]]) -> None:
        for batch in batches:
            res = send(port, batch)
            out.append(res.succeeded)

    for run in range(N_RUNS):
        stage = STAGES[run % len(STAGES)]
        for k in range(3):
            for ds in series(f"crash-{run}-{k}", n=N_SLICES, size=SIZE):
                sources[str(ds.SOPInstanceUID)] = ds
        node = NodeProcess(args, log)
        got: list[set[str]] = []
        try:
            node.wait_listening()
            t = threading.Thread(target=scanner, args=(unacked_by_series(), got), daemon=True)
            t0 = time.monotonic()
            t.start()
            if stage == "receive":
                time.sleep(rng.uniform(0.05, 1.0))
                hit = t.is_alive()
            else:
                try:
                    wait_for(lambda: _stage_reached(db, stage), 60, f"stage {stage}", interval=0.02)
                    hit = True
                except AssertionError:
                    hit = False
                time.sleep(rng.uniform(0.0, 0.3))
        finally:
            node.kill()
        report.append(f"run {run}: kill during {stage} at {time.monotonic() - t0:.2f} s ({'hit' if hit else 'missed'})")
        t.join(60)
        assert not t.is_alive(), "scanner hung after the node was killed"
        newly = set().union(*got) if got else set()
        acked |= newly
        # the scanner was told Success only for instances that are durable on disk
        rows = {uid: path for uid, path in db_rows(db, "SELECT sop_instance_uid, path FROM instances")}
        for uid in acked:
            assert uid in rows, f"acknowledged instance {uid} has no DB row after the kill"
            p = Path(rows[uid])
            assert p.is_file(), f"acknowledged instance {uid}: spool file {p} missing"
            assert str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) == uid

    # last start: the scanner re-sends what it was not acknowledged, the node finishes everything
    node = NodeProcess(args, log)
    try:
        node.wait_listening()
        for batch in unacked_by_series():
            res = send(port, batch)
            acked |= res.succeeded
        assert acked == set(sources), f"{len(set(sources) - acked)} instance(s) never acknowledged"
        expected = expected_derived(sources.values(), keys, version)

        def done() -> bool:
            latest = db_rows(db, "SELECT series_uid, state, instance_count FROM jobs WHERE id IN "
                                 "(SELECT MAX(id) FROM jobs GROUP BY series_uid)")
            pending = db_rows(db, "SELECT COUNT(*) FROM outbox_items WHERE state != 'delivered'")[0][0]
            return (len(latest) == 3 * N_RUNS and all(s == "delivered" for _, s, _ in latest) and pending == 0)

        wait_for(done, 180 if FULL else 120, "every job delivered", interval=0.5)
    finally:
        rc = node.terminate()
    assert rc == 0, node.text()[-3000:]

    unconsumed = db_rows(db, "SELECT COUNT(*) FROM instances WHERE job_id IS NULL")[0][0]
    assert unconsumed == 0
    latest = db_rows(db, "SELECT series_uid, instance_count FROM jobs WHERE id IN "
                         "(SELECT MAX(id) FROM jobs GROUP BY series_uid)")
    assert sorted(c for _, c in latest) == [N_SLICES] * (3 * N_RUNS)
    gates = db_rows(db, "SELECT json_extract(qa_json, '$.gate.sample_slices') FROM jobs WHERE id IN "
                        "(SELECT MAX(id) FROM jobs GROUP BY series_uid)")
    assert [g for (g,) in gates] == [5] * (3 * N_RUNS)  # every delivered job took the sampled path
    assert db_rows(db, "SELECT COUNT(*) FROM outbox_items WHERE state = 'dead_letter'")[0][0] == 0
    at_tps = orthanc.sop_instance_uids()
    assert len(at_tps) == len(set(at_tps))
    missing, unexpected = expected - set(at_tps), set(at_tps) - expected
    assert not missing, f"{len(missing)} derived instance(s) never reached the TPS"
    assert not unexpected, f"{len(unexpected)} unexpected instance(s) at the TPS"
    assert len(orthanc.series()) == 3 * N_RUNS * N_RECIPES
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[text.index("Traceback") - 500:][:3000]
    print("\n" + "\n".join(report))
