"""Peak memory of the node processing one large series (512x512x200).

Why: the node runs beside other services on the MR-sim console or a small VM; a series
must not need more than 1 GB (#13; 2 GB before).  The node runs as a subprocess (``node.py run``), the
series goes in with dcmtk storescu, the outputs (3 recipes + classic maps) go to a
folder destination, and VmHWM/VmRSS are read from /proc/<pid>/status every 0.2 s along
with the job's state, so the peak can be attributed to a stage.

Target: peak RSS (VmHWM) <= 1 GB.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, storescu, table, verdict, write_result  # noqa: E402
from tests.dicomgen import write_series  # noqa: E402
from tests.reliability.helpers import LENIENT_QA, RECIPES, NodeProcess, db_rows, node_settings, series, write_configs  # noqa: E402

LIMIT_MB = 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    info = machine()
    work = Path(tempfile.mkdtemp(prefix="rtc-bench-memory-"))
    print(f"generating {args.slices} slices {args.size}x{args.size} ...", flush=True)
    src = series("bench-memory", n=args.slices, size=args.size)
    files = write_series(src, work / "in")
    del src
    var = work / "var"
    settings = node_settings(var, series_idle_timeout_s=600.0, release_grace_s=0.2)
    protocol = {
        "version": "bench-memory", "qa": LENIENT_QA,
        "destinations": {"out": {"folder": {"path": str(work / "export")}}},
        "recipes": [{"key": k, "label": k, "te_ms": te, "tr_ms": tr, "series_number": 901 + i,
                     "destinations": ["out"]} for i, (k, te, tr) in enumerate(RECIPES)],
        "maps": {"classic": True, "destinations": ["out"]},
    }
    node = NodeProcess(write_configs(work, settings, protocol), work / "node.log")
    samples: list[dict[str, Any]] = []
    db = var / "rtcontrast.db"
    try:
        node.wait_listening()
        idle_rss = node.rss_kb()[0]
        t0 = time.monotonic()
        t_recv = storescu(settings["port"], files)
        recv_hwm = node.rss_kb()[1]
        state = "received"
        while True:
            rss, hwm = node.rss_kb()
            rows = db_rows(db, "SELECT state, reason FROM jobs ORDER BY id DESC LIMIT 1")
            state = rows[0][0] if rows else "receiving"
            samples.append({"t_s": round(time.monotonic() - t0, 2), "rss_kb": rss, "hwm_kb": hwm, "state": state})
            if state in ("delivered", "failed", "ineligible", "held"):
                break
            if time.monotonic() - t0 > 1800:
                raise RuntimeError("the job did not finish within 30 minutes")
            time.sleep(0.2)
        if state != "delivered":
            raise RuntimeError(f"job ended {state}: {rows[0][1]}")
        total = time.monotonic() - t0
        hwm_kb = node.rss_kb()[1]
        qa_rows = db_rows(db, "SELECT qa_json FROM jobs ORDER BY id DESC LIMIT 1")
    finally:
        node.terminate()
    exported = len(list((work / "export").rglob("*.dcm")))
    by_state: dict[str, int] = {}
    for s in samples:
        by_state[s["state"]] = max(by_state.get(s["state"], 0), s["rss_kb"])
    peak_mb = hwm_kb / 1024
    print()
    print(f"memory: {args.slices} slices {args.size}x{args.size} 16-bit ({args.slices * args.size**2 * 2 / 1e6:.0f} MB "
          f"of pixels), 3 recipes + classic maps to a folder ({exported} files), {total:.0f} s")
    print(table(["phase", "max sampled RSS (MB)"],
                [["idle (model loaded)", f"{idle_rss / 1024:.0f}"], ["after receive (VmHWM)", f"{recv_hwm / 1024:.0f}"],
                 *[[f"job {k}", f"{v / 1024:.0f}"] for k, v in by_state.items()]]))
    print(f"peak RSS (VmHWM) {peak_mb:.0f} MB (target <= {LIMIT_MB} MB: {verdict(peak_mb <= LIMIT_MB)})")
    out = write_result("memory", {
        "machine": info,
        "setup": {"slices": args.slices, "matrix": [args.size, args.size], "bits": 16,
                  "outputs": "3 recipes + classic T1/T2/PD maps to a folder destination", "receive_s": round(t_recv, 2)},
        "peak_rss_mb": round(peak_mb, 1), "idle_rss_mb": round(idle_rss / 1024, 1),
        "after_receive_hwm_mb": round(recv_hwm / 1024, 1),
        "max_rss_mb_by_job_state": {k: round(v / 1024, 1) for k, v in by_state.items()},
        "total_s": round(total, 1), "exported_files": exported,
        "job_timings_s": (__import__("json").loads(qa_rows[0][0] or "{}").get("timings_s") if qa_rows else None),
        "samples": samples[:: max(1, len(samples) // 300)],
        "targets": {"peak_rss<=1GB": peak_mb <= LIMIT_MB},
    })
    print(f"results: {out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
