"""Shared parts of the benchmarks: machine description, results JSON, tables, data, processes.

Why one place: every benchmark must record the same description of the machine it ran
on (CPU model, cores, memory, versions, git commit, date, and whether something else was
using the CPU), because the numbers are only meaningful as ratios measured side by side
on that machine.  Run from the repository root: ``python bench/<name>.py``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results"
DCMTK_STORESCU = "/usr/bin/storescu"
DCMTK_STORESCP = "/usr/bin/storescp"
#: dcmtk reads TCP_NODELAY from the environment (libdcmnet: "disabling Nagle algorithm as
#: requested at runtime (TCP_NODELAY=..."); set it explicitly so both dcmtk peers disable Nagle.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def other_cpu_users() -> list[str]:
    """Command lines of other processes known to compete for the CPU (training runs)."""
    me = os.getpid()
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        cmd = _read(str(d / "cmdline")).replace("\x00", " ").strip()
        # training runs (either module path), mutation testing and other engineers' test runs
        if any(k in cmd for k in ("rtcontrast.research.train", "rtcontrast.train", "mutmut", "-m pytest")):
            found.append(cmd[:160])
    return sorted(set(found))


def machine() -> dict[str, Any]:
    """Where and when the benchmark ran (recorded in every results file)."""
    cpu = next((ln.split(":", 1)[1].strip() for ln in _read("/proc/cpuinfo").splitlines()
                if ln.startswith("model name")), platform.processor())
    mem_kb = next((int(ln.split()[1]) for ln in _read("/proc/meminfo").splitlines() if ln.startswith("MemTotal")), 0)
    versions: dict[str, str] = {"python": platform.python_version()}
    for mod in ("onnxruntime", "numpy", "pydicom", "pynetdicom", "torch"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            pass
    try:
        versions["dcmtk"] = subprocess.run([DCMTK_STORESCU, "--version"], capture_output=True, text=True,
                                           timeout=10).stdout.splitlines()[0].strip()
    except Exception:  # noqa: BLE001
        pass

    def git(*args: str) -> str:
        r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        return r.stdout.strip()

    contention = other_cpu_users()
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024**2, 1),
        "os": platform.platform(),
        "versions": versions,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_at_start": _read("/proc/loadavg").split()[:3],
        "cpu_contention": (
            "other CPU users (training runs, mutation tests, test suites: contending_processes) were running during "
            "this benchmark; absolute numbers are pessimistic, ratios were measured side by side"
            if contention or os.getloadavg()[0] > (os.cpu_count() or 1)
            else "none detected"
        ),
        "contending_processes": contention,
    }


def write_result(name: str, data: dict[str, Any]) -> Path:
    """``bench/results/<name>.json`` with the machine description first."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    doc = {"benchmark": name, "machine": data.pop("machine", None) or machine(), **data}
    doc["machine"]["loadavg_at_end"] = _read("/proc/loadavg").split()[:3]
    out.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    return out


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table (numbers formatted by the caller)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *(line(r) for r in cells[1:])])


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


class Timer:
    """``with Timer() as t: ...; t.s``."""

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.perf_counter() - self.t0


def wait_port(port: int, timeout_s: float = 30.0) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:port."""
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")


def storescu(port: int, files: Sequence[Path], called: str = "RTCONTRAST", timeout: float = 600) -> float:
    """dcmtk storescu (TCP_NODELAY=1) sends ``files`` in one association; wall seconds. Raises on failure."""
    cmd = [DCMTK_STORESCU, "-aet", "SCANNER", "-aec", called, "127.0.0.1", str(port), *map(str, files)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=DCMTK_ENV)
    dt = time.perf_counter() - t0
    if r.returncode != 0 or "Store Failed" in r.stderr or "E:" in r.stderr:
        raise RuntimeError(f"storescu to port {port} failed ({r.returncode}): {r.stderr[-2000:]}")
    return dt
