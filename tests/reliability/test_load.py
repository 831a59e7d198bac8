"""Load suite: several scanners send at once; all complete, no C-STORE fails, memory stays bounded.

Why: a department has several MR scanners (and re-sends) that may push series at the same
moment; the node must accept everything (each association on its own thread), queue the
jobs, deliver every derived instance, and not grow without bound.

CI: 4 scanners x 1 series x 20 slices of 64x64; full (RTC_FULL=1): 4 x 3 x 100 of 128x128.
The node's RSS is sampled from /proc every 0.2 s; its peak (VmHWM) must stay under the limit.
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
    SendResult,
    db_rows,
    expected_derived,
    node_settings,
    send,
    series,
    tps_protocol,
    wait_for,
    write_configs,
)

SCANNERS, SERIES, SLICES, SIZE = (4, 3, 100, 128) if FULL else (4, 1, 20, 64)
N_RECIPES = 2
RSS_LIMIT_MB = 2048 if FULL else 1536


def test_four_scanners_at_once(tmp_path: Path, orthanc: Orthanc) -> None:  # noqa: F811
    version = QMapModel(MODEL_PATH, "cpu").info.version
    var = tmp_path / "var"
    db = var / "rtcontrast.db"
    settings = node_settings(var, receive_processes=2)  # as a site with several scanners runs it (docs/admin.md)
    args = write_configs(tmp_path, settings, tps_protocol(orthanc.dicom_port, N_RECIPES))
    port = settings["port"]
    work = {s: [series(f"load-{s}-{k}", n=SLICES, size=SIZE, series_number=3 + k) for k in range(SERIES)]
            for s in range(SCANNERS)}
    sources = [ds for per in work.values() for sr in per for ds in sr]
    expected = expected_derived(sources, [k for k, _, _ in RECIPES[:N_RECIPES]], version)
    results: list[SendResult] = []
    lock = threading.Lock()

    def scanner(s: int) -> None:
        for sr in work[s]:
            r = send(port, sr, ae_title=f"SCANNER{s}")
            with lock:
                results.append(r)

    node = NodeProcess(args, tmp_path / "node.log")
    peak_rss = 0
    try:
        node.wait_listening()
        t0 = time.monotonic()
        threads = [threading.Thread(target=scanner, args=(s,), daemon=True) for s in range(SCANNERS)]
        for t in threads:
            t.start()

        def finished() -> bool:
            nonlocal peak_rss
            peak_rss = max(peak_rss, node.rss_kb()[0])
            if any(t.is_alive() for t in threads):
                return False
            rows = dict(db_rows(db, "SELECT state, COUNT(*) FROM outbox_items GROUP BY state"))
            jobs = db_rows(db, "SELECT COUNT(*), SUM(state='delivered') FROM jobs")[0]
            return rows == {"delivered": len(expected)} and jobs[0] == jobs[1] == SCANNERS * SERIES

        wait_for(finished, 900 if FULL else 150, "every series delivered", interval=0.2)
        elapsed = time.monotonic() - t0
        hwm_kb = node.rss_kb()[1]
    finally:
        rc = node.terminate()
    assert rc == 0, node.text()[-3000:]
    statuses = [st for r in results for st in r.statuses.values()]
    assert len(results) == SCANNERS * SERIES and all(r.associated and r.error is None for r in results)
    assert len(statuses) == len(sources) and all(st == 0 for st in statuses), "a C-STORE failed"
    at_tps = orthanc.sop_instance_uids()
    assert set(at_tps) == expected and len(at_tps) == len(expected)
    assert hwm_kb / 1024 < RSS_LIMIT_MB, f"node peak RSS {hwm_kb / 1024:.0f} MB >= {RSS_LIMIT_MB} MB"
    print(f"\n{SCANNERS} scanners x {SERIES} series x {SLICES} slices ({SIZE}x{SIZE}): all delivered in "
          f"{elapsed:.1f} s; node peak RSS {hwm_kb / 1024:.0f} MB (sampled max {peak_rss / 1024:.0f} MB)")
