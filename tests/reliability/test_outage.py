"""Outage suite: the TPS is down for a while, the node restarts meanwhile, everything arrives after.

Why: a planning system is restarted for updates, sometimes for minutes.  The node must
keep what it produced (durable outbox), back off instead of hammering the peer, survive
its own restart during the outage, deliver everything once the peer is back, and
dead-letter nothing while attempts remain.

Timeline: series A is sent and the TPS (Orthanc) is killed as soon as A's first derived
instance was delivered; series B and C arrive during the outage; halfway through, the
node is stopped (SIGTERM) and started again; the TPS comes back after OUTAGE_S.  Attempt
timestamps come from polling the outbox rows (attempts, updated_at) every 0.1 s.

CI: 20 s outage; full form (RTC_FULL=1): 130 s (>= 2 minutes).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

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

OUTAGE_S = 130.0 if FULL else 20.0
BASE_S, MAX_S, JITTER, MAX_ATTEMPTS = (1.0, 16.0, 0.2, 50) if FULL else (0.5, 4.0, 0.2, 50)
N_RECIPES = 2


class AttemptLog:
    """Polls outbox rows; ``history[id]`` maps attempt number -> time of that attempt."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.history: dict[int, dict[int, float]] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for id_, attempts, updated in db_rows(self.db, "SELECT id, attempts, updated_at FROM outbox_items"):
                if attempts:
                    self.history.setdefault(id_, {}).setdefault(attempts, updated)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)


def test_tps_outage_with_node_restart_delivers_everything_with_backoff(tmp_path: Path,
                                                                      orthanc: Orthanc) -> None:  # noqa: F811
    version = QMapModel(MODEL_PATH, "cpu").info.version
    var = tmp_path / "var"
    db = var / "rtcontrast.db"
    settings = node_settings(var, delivery={"max_attempts": MAX_ATTEMPTS, "base_delay_s": BASE_S,
                                            "max_delay_s": MAX_S, "poll_interval_s": 0.2})
    args = write_configs(tmp_path, settings, tps_protocol(orthanc.dicom_port, N_RECIPES))
    port = settings["port"]
    log = tmp_path / "node.log"
    a, b, c = (series(f"outage-{x}", n=10) for x in "abc")
    keys = [k for k, _, _ in RECIPES[:N_RECIPES]]
    expected = expected_derived(a + b + c, keys, version)

    attempts = AttemptLog(db)
    node = NodeProcess(args, log)
    try:
        node.wait_listening()
        assert send(port, a).succeeded == {ds.SOPInstanceUID for ds in a}
        wait_for(lambda: db_rows(db, "SELECT 1 FROM outbox_items WHERE state='delivered' LIMIT 1"), 60,
                 "the first delivery", interval=0.02)
        orthanc.stop(kill=True)
        t_down = time.time()
        for s in (b, c):
            assert send(port, s).succeeded == {ds.SOPInstanceUID for ds in s}
        # the node produces B and C and fails to deliver them: retries pile up, nothing is lost
        wait_for(lambda: db_rows(db, "SELECT COUNT(*) FROM outbox_items WHERE attempts >= 2 AND state='pending'")
                 [0][0] >= 2 * 10 * N_RECIPES, 60, "failed attempts for B and C")
        time.sleep(max(0.0, t_down + OUTAGE_S / 2 - time.time()))
    finally:
        rc = node.terminate()
    assert rc == 0, node.text()[-3000:]
    node = NodeProcess(args, log)  # restart during the outage
    try:
        node.wait_listening()
        time.sleep(max(0.0, t_down + OUTAGE_S - time.time()))
        pending_before = db_rows(db, "SELECT COUNT(*) FROM outbox_items WHERE state='pending'")[0][0]
        assert pending_before > 0
        orthanc.start()
        t_up = time.time()

        def all_delivered() -> bool:
            rows = db_rows(db, "SELECT state, COUNT(*) FROM outbox_items GROUP BY state")
            return dict(rows) == {"delivered": len(expected)}

        wait_for(all_delivered, MAX_S * 2 + 60, "delivery after the TPS came back", interval=0.2)
        wait_for(lambda: db_rows(db, "SELECT COUNT(*) FROM jobs WHERE state != 'delivered'")[0][0] == 0, 10,
                 "jobs marked delivered")
    finally:
        rc = node.terminate()
        attempts.stop()
    assert rc == 0, node.text()[-3000:]

    at_tps = orthanc.sop_instance_uids()
    assert set(at_tps) == expected and len(at_tps) == len(expected)
    assert db_rows(db, "SELECT COUNT(*) FROM outbox_items WHERE state='dead_letter'")[0][0] == 0
    max_used = db_rows(db, "SELECT MAX(attempts) FROM outbox_items")[0][0]
    assert max_used < MAX_ATTEMPTS
    # backoff: each wait at least the policy's lower bound, waits grow until the cap,
    # and the number of attempts during the outage stays small (no retry storm)
    failed_items = 0
    for id_, hist in attempts.history.items():
        times = [hist[k] for k in sorted(hist)]
        if len(times) < 3:
            continue
        failed_items += 1
        for k in range(1, len(times)):
            if k + 1 not in hist or k not in hist:
                continue  # an attempt between two polls was missed; compare only consecutive ones
            gap = hist[k + 1] - hist[k]
            lower = min(MAX_S, BASE_S * 2 ** (k - 1)) * (1 - JITTER) - 0.05
            assert gap >= lower, f"item {id_}: attempt {k + 1} came {gap:.2f} s after attempt {k} (< {lower:.2f} s)"
    assert failed_items >= 2 * 10 * N_RECIPES
    bound = 2 + int(OUTAGE_S / (MAX_S * (1 - JITTER))) + 8  # doubling phase + capped phase + restart slack
    assert max_used <= bound, f"{max_used} attempts in a {OUTAGE_S:.0f} s outage: backoff too eager"
    late = db_rows(db, "SELECT MIN(delivered_at) FROM outbox_items WHERE attempts > 1")[0][0]
    assert late >= t_up - 1.0
    text = log.read_text(errors="replace")
    assert "Traceback" not in text
    print(f"\noutage {OUTAGE_S:.0f} s, node restarted at +{OUTAGE_S / 2:.0f} s; max attempts {max_used}; "
          f"{failed_items} item(s) retried; everything delivered {time.time() - t_up:.1f} s after the TPS returned")
