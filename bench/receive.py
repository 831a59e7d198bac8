"""Receive throughput: the node's Storage SCP against pynetdicom's and dcmtk's bare storescp.

Why: the scanner's time is not ours to waste; the node writes every instance durably
(fsync'd temp file, atomic rename, fsync'd directory, SQLite record) before *Success*,
so it is compared with receivers that do less: pynetdicom's storescp app (writes the
file, no fsync) and dcmtk's storescp (C++, TCP_NODELAY=1, --fork).

The sender is always dcmtk storescu (TCP_NODELAY=1): 200 slices 256x256 16-bit over
loopback in one association; then 4 senders at once (4 distinct series, 800 slices).
Repetitions are interleaved (node, pynetdicom, dcmtk, node, ...) and medians reported.
The node never starts a job during the benchmark (idle timeout and release grace of
10^6 s): this measures the receive path only.

Targets: node >= 1.0x pynetdicom storescp with 1 sender and >= 1.5x with 4 (#13; the durable
writes of concurrent associations are group-committed; ``--processes 2,4,1`` runs one node per
``receive_processes`` value, the first one is the node the ratios are about), >= 0.5x dcmtk
storescp (single sender).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    DCMTK_ENV,
    DCMTK_STORESCP,
    machine,
    median,
    storescu,
    table,
    verdict,
    wait_port,
    write_result,
)
from tests.conftest import free_port  # noqa: E402
from tests.dicomgen import write_series  # noqa: E402
from tests.reliability.helpers import NodeProcess, node_settings, series, tps_protocol, write_configs  # noqa: E402

PDU = 262144  # the node's default max PDU; pynetdicom gets the same, dcmtk its maximum (131072)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--processes", type=lambda v: [int(x) for x in v.split(",")], default=[1],
                    help="receive_processes of the node, comma-separated: one node each (the first one is "
                         "the one the ratios are about), e.g. 4,1")
    args = ap.parse_args()
    info = machine()
    work = Path(tempfile.mkdtemp(prefix="rtc-bench-receive-"))
    print(f"generating {args.senders} x {args.slices} slices {args.size}x{args.size} in {work} ...", flush=True)
    sets = [write_series(series(f"bench-recv-{k}", n=args.slices, size=args.size), work / f"in{k}")
            for k in range(args.senders)]

    procs: list[subprocess.Popen[bytes]] = []
    nodes: dict[str, tuple[NodeProcess, Path, int]] = {}
    try:
        # (a) the node, once per receive_processes value (the first one is "node": the ratios' numerator)
        for n in args.processes:
            name = "node" if n == args.processes[0] else f"node, {n} processes"
            var = work / f"node{n}"
            settings = node_settings(var, series_idle_timeout_s=1e6, release_grace_s=1e6, receive_processes=n,
                                     limits={"min_free_disk_bytes": 0, "max_pdu_bytes": PDU})
            cfg_dir = work / f"cfg{n}"
            cfg_dir.mkdir(exist_ok=True)
            node = NodeProcess(write_configs(cfg_dir, settings, tps_protocol(free_port(), 1)), work / f"node{n}.log")
            nodes[name] = (node, var, settings["port"])
            node.wait_listening()
        # (b) pynetdicom's bare storescp app
        p_py = free_port()
        (work / "py").mkdir()
        procs.append(subprocess.Popen([sys.executable, "-m", "pynetdicom", "storescp", str(p_py), "-q",
                                       "-pdu", str(PDU), "-od", str(work / "py")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work))
        # (c) dcmtk storescp, TCP_NODELAY=1, one process per association
        p_dc = free_port()
        (work / "dcmtk").mkdir()
        procs.append(subprocess.Popen([DCMTK_STORESCP, "--fork", "-pdu", "131072", "-od", str(work / "dcmtk"),
                                       str(p_dc)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      env=DCMTK_ENV, cwd=work))
        targets = {name: port for name, (_, _, port) in nodes.items()}
        targets.update({"pynetdicom storescp": p_py, "dcmtk storescp": p_dc})
        for port in targets.values():
            wait_port(port)

        single: dict[str, list[float]] = {k: [] for k in targets}
        multi: dict[str, list[float]] = {k: [] for k in targets}
        for rep in range(args.reps):
            for name, port in targets.items():
                dt = storescu(port, sets[0])
                single[name].append(args.slices / dt)
                errs: list[BaseException] = []
                times: list[float] = []

                def one(files: list[Path]) -> None:
                    try:
                        times.append(storescu(port, files))
                    except BaseException as exc:  # noqa: BLE001 - reported below
                        errs.append(exc)

                t0 = time.perf_counter()
                ts = [threading.Thread(target=one, args=(s,)) for s in sets]
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                wall = time.perf_counter() - t0
                if errs:
                    raise RuntimeError(f"{name}: {errs[0]}")
                multi[name].append(args.senders * args.slices / wall)
                print(f"rep {rep + 1}/{args.reps} {name:>20}: {single[name][-1]:7.1f} slices/s single, "
                      f"{multi[name][-1]:7.1f} slices/s with {args.senders} senders", flush=True)
        # every slice really arrived at each node (spool files of the 4 series)
        for name, (node, var, _) in nodes.items():
            stored = (len(list((var / "spool").rglob("*.dcm")))
                      - len(list((var / "spool" / "quarantine").glob("*.dcm"))))
            if stored != args.senders * args.slices:
                raise RuntimeError(f"{name} spool holds {stored} instances, expected {args.senders * args.slices}")
        rss_kb = nodes["node"][0].rss_kb()
    finally:
        for node, _, _ in nodes.values():
            node.terminate()
        for p in procs:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()

    med_s = {k: median(v) for k, v in single.items()}
    med_m = {k: median(v) for k, v in multi.items()}
    r_py = med_s["node"] / med_s["pynetdicom storescp"]
    r_dc = med_s["node"] / med_s["dcmtk storescp"]
    r_py_m = med_m["node"] / med_m["pynetdicom storescp"]
    r_dc_m = med_m["node"] / med_m["dcmtk storescp"]
    rows = [[k, f"{med_s[k]:.1f}", f"{med_s[k] * args.size**2 * 2 / 1e6:.1f}", f"{med_m[k]:.1f}"] for k in targets]
    print()
    print(f"receive: {args.slices} slices {args.size}x{args.size} 16-bit, dcmtk storescu (TCP_NODELAY=1), "
          f"median of {args.reps} interleaved reps")
    print(table(["receiver", "slices/s (1 sender)", "MB/s", f"slices/s ({args.senders} senders)"], rows))
    print(f"node / pynetdicom storescp: {r_py:.2f}x (target >= 1.0x: {verdict(r_py >= 1.0)}); "
          f"{args.senders} senders {r_py_m:.2f}x (target >= 1.5x: {verdict(r_py_m >= 1.5)})")
    print(f"node / dcmtk storescp:      {r_dc:.2f}x (target >= 0.5x: {verdict(r_dc >= 0.5)}); "
          f"{args.senders} senders {r_dc_m:.2f}x")
    out = write_result("receive", {
        "machine": info,
        "setup": {"slices": args.slices, "matrix": [args.size, args.size], "bits": 16, "reps": args.reps,
                  "senders_concurrent": args.senders, "sender": "dcmtk storescu, TCP_NODELAY=1, one association",
                  "node": "durable spool (fsync file + directory), SQLite record, max PDU 262144, no jobs",
                  "node_receive_processes": args.processes,
                  "pynetdicom_storescp": "python -m pynetdicom storescp -pdu 262144 -od DIR (writes files, no fsync)",
                  "dcmtk_storescp": "storescp --fork -pdu 131072 -od DIR, TCP_NODELAY=1 (no fsync)"},
        "slices_per_s_single": single, "slices_per_s_concurrent": multi,
        "median_single": med_s, "median_concurrent": med_m,
        "ratios": {"node_vs_pynetdicom": round(r_py, 3), "node_vs_dcmtk": round(r_dc, 3),
                   "node_vs_pynetdicom_concurrent": round(r_py_m, 3), "node_vs_dcmtk_concurrent": round(r_dc_m, 3)},
        "targets": {"node_vs_pynetdicom>=1.0": r_py >= 1.0, "node_vs_pynetdicom_concurrent>=1.5": r_py_m >= 1.5,
                    "node_vs_dcmtk>=0.5": r_dc >= 0.5},
        "node_rss_kb": {"rss": rss_kb[0], "hwm": rss_kb[1]},
    })
    print(f"results: {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")
    subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
