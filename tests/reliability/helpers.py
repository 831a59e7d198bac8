"""Shared parts of the reliability suites: a subprocess node, a recording scanner, the node's DB.

Why a subprocess node: the crash and outage suites SIGKILL it, and the load suite reads
its resident memory from ``/proc``.  Why pynetdicom as the scanner: the tests must know
the DIMSE status the scanner saw for every instance (dcmtk storescu only logs it).

Every suite has a reduced CI form (default) and a full form (``RTC_FULL=1`` or
``make test-reliability-full``); :data:`FULL` says which one runs.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, Verification
from pydicom.uid import ExplicitVRLittleEndian

from rtcontrast.dicom.uids import instance_uid
from rtcontrast.node.dispatch.sender import keep_responses
from tests.conftest import free_port
from tests.dicomgen import make_series

REPO = Path(__file__).resolve().parents[2]
MODEL_PATH = REPO / "models" / "qmap-pelvis.onnx"
#: Full form of the suites (long outages, many kills, big loads).
FULL = os.environ.get("RTC_FULL", "") not in ("", "0")

#: Lenient QA on purpose: this suite tests crash, outage, load and bad-input behaviour, not QA; a QA hold or warning would hide the
#: behaviour under test.  QA itself is pinned with the default thresholds in tests/test_pins_qa.py,
#: tests/test_pipeline.py and tests/test_node_e2e.py.
LENIENT_QA = {"max_self_nrmse": 10.0, "max_te_error_frac": 100.0, "max_tr_error_frac": 100.0, "action": "warn"}
RECIPES = [("T2w", 100, 4000), ("T1w", 10, 500), ("PDw", 10, 4000)]


def wait_for(cond: Callable[[], Any], timeout_s: float, what: str, interval: float = 0.2) -> Any:
    """Poll ``cond`` until truthy (returned) or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


# ----------------------------------------------------------------------------- configuration


def node_settings(var: Path, port: int | None = None, **over: Any) -> dict[str, Any]:
    """Loopback node with short timeouts and quick retries (overrides merge one level deep)."""
    cfg: dict[str, Any] = {
        "bind_host": "127.0.0.1",
        "port": port or free_port(),
        "var_dir": str(var),
        "series_idle_timeout_s": 3.0,
        "release_grace_s": 0.3,
        "model_path": str(MODEL_PATH),
        "execution_provider": "cpu",
        "limits": {"min_free_disk_bytes": 0},
        "metrics": {"enabled": False},
        "delivery": {"max_attempts": 100, "base_delay_s": 0.3, "max_delay_s": 1.0, "poll_interval_s": 0.2},
    }
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


def tps_protocol(dicom_port: int, n_recipes: int = 2, classic_maps: bool = False) -> dict[str, Any]:
    """Recipes (and optionally classic maps) to one DICOM destination 'tps' (Orthanc)."""
    proto: dict[str, Any] = {
        "version": "reliability",
        "qa": LENIENT_QA,
        "destinations": {"tps": {"dicom": {"host": "127.0.0.1", "port": dicom_port, "ae_title": "ORTHANC",
                                           "connect_timeout_s": 2, "acse_timeout_s": 5}}},
        "recipes": [
            {"key": k, "label": k, "te_ms": te, "tr_ms": tr, "series_number": 901 + i, "destinations": ["tps"]}
            for i, (k, te, tr) in enumerate(RECIPES[:n_recipes])
        ],
    }
    if classic_maps:
        proto["maps"] = {"classic": True, "destinations": ["tps"]}
    return proto


def write_configs(directory: Path, settings: dict[str, Any], protocol: dict[str, Any]) -> list[str]:
    """node.yaml + protocol.yaml in ``directory``; the ``node.py run`` arguments for them."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "node.yaml").write_text(yaml.safe_dump(settings))
    (directory / "protocol.yaml").write_text(yaml.safe_dump(protocol))
    return ["--config", str(directory / "node.yaml"), "--protocol", str(directory / "protocol.yaml")]


# ----------------------------------------------------------------------------- the node process


class NodeProcess:
    """``python node.py run ...`` in its own session, log appended to ``log``."""

    def __init__(self, args: list[str], log: Path, cwd: Path = REPO) -> None:
        self.log = log
        self._start_offset = log.stat().st_size if log.exists() else 0
        self._fh = open(log, "ab")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen([sys.executable, str(REPO / "node.py"), "run", *args], cwd=cwd,
                                     stdout=self._fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        """This process's part of the log."""
        with open(self.log, "rb") as fh:
            fh.seek(self._start_offset)
            return fh.read().decode(errors="replace")

    def wait_listening(self, timeout_s: float = 90) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.text()[-4000:]}")
            return "listening on" in self.text()
        wait_for(ready, timeout_s, "the node to listen", interval=0.1)

    def rss_kb(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in kB from /proc (0, 0 once the process is gone)."""
        try:
            text = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return 0, 0
        vals = {ln.split(":")[0]: int(ln.split()[1]) for ln in text.splitlines() if ln.startswith(("VmRSS", "VmHWM"))}
        return vals.get("VmRSS", 0), vals.get("VmHWM", 0)

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._fh.close()

    def terminate(self, timeout_s: float = 30) -> int:
        """SIGTERM (a clean stop); SIGKILL if it does not stop in time.  The exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._fh.close()
        return int(self.proc.returncode)


def db_rows(db: Path, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
    """Read the node's database from outside (WAL readers are safe while it runs)."""
    if not db.exists():
        return []
    conn = sqlite3.connect(db, timeout=10)
    try:
        return conn.execute(sql, tuple(params)).fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return []
    finally:
        conn.close()


# ----------------------------------------------------------------------------- data


def phantom_volume(n: int, size: int, seed: int = 0) -> np.ndarray:
    """A body-like disc with structure, distinct per slice (the model's numbers do not matter)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    r2 = (yy - size / 2) ** 2 + (xx - size / 2) ** 2
    body = r2 < (0.4 * size) ** 2
    inner = r2 < (0.15 * size) ** 2
    vol = rng.uniform(0, 20, (n, size, size))
    vol += body[None] * 600 + inner[None] * 300 + 5 * np.arange(n)[:, None, None]
    return vol.astype(np.float32).round()


def series(seed: str, n: int = 12, size: int = 64, **spec: Any) -> list[pydicom.Dataset]:
    """A classic MR T2w SE series (TE 90, TR 4000 unless overridden) with UIDs from ``seed``."""
    spec.setdefault("te", 90.0)
    spec.setdefault("tr", 4000.0)
    return make_series(phantom_volume(n, size, zlib.crc32(seed.encode())), uid_seed=seed, **spec)


def expected_derived(datasets: Iterable[pydicom.Dataset], recipe_keys: Iterable[str], model_version: str) -> set[str]:
    """SOP Instance UIDs the node must deliver for these source instances (deterministic UIDs)."""
    keys = list(recipe_keys)
    return {instance_uid(None, str(ds.SOPInstanceUID), None, k, model_version) for ds in datasets for k in keys}


# ----------------------------------------------------------------------------- the scanner


@dataclass
class SendResult:
    """What the scanner saw: status per SOP Instance UID (None: no response), association outcome."""

    statuses: dict[str, int | None] = field(default_factory=dict)
    associated: bool = False
    error: str | None = None

    @property
    def succeeded(self) -> set[str]:
        return {uid for uid, st in self.statuses.items() if st == 0}


def scanner_ae(ae_title: str = "SCANNER") -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = 10
    ae.dimse_timeout = 30
    ae.network_timeout = 30
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    return ae


def send(port: int, datasets: Iterable[pydicom.Dataset], ae_title: str = "SCANNER",
         called: str = "RTCONTRAST", stop: threading.Event | None = None) -> SendResult:
    """C-STORE ``datasets`` in one association, recording every status; never raises."""
    res = SendResult()
    ae = scanner_ae(ae_title)
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
    except Exception as exc:  # connection refused etc.
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    if not assoc.is_established:
        res.error = "association not established"
        return res
    res.associated = True
    keep_responses(assoc)  # a scanner is not subject to pynetdicom's requestor race (see the sender)
    try:
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            if stop is not None and stop.is_set():
                break
            if not assoc.is_established:
                res.statuses[uid] = None
                continue
            try:
                st = assoc.send_c_store(ds)
                res.statuses[uid] = int(st.Status) if st is not None and "Status" in st else None
            except Exception as exc:
                res.statuses[uid] = None
                res.error = f"{type(exc).__name__}: {exc}"
        if assoc.is_established:
            assoc.release()
    except Exception as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        if assoc.is_established:
            assoc.abort()
    return res


def echo(port: int, ae_title: str = "SCANNER") -> int | None:
    """C-ECHO status (0 = success), None when there was no answer."""
    ae = scanner_ae(ae_title)
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="RTCONTRAST")
    except Exception:
        return None
    if not assoc.is_established:
        return None
    try:
        st = assoc.send_c_echo()
        return int(st.Status) if st is not None and "Status" in st else None
    finally:
        assoc.release()
