"""Running under systemd: the unit verifies, install.sh lays out a release, and the node
speaks sd_notify (READY after the SCP listens, WATCHDOG pings), reloads its protocol on
SIGHUP, serves Prometheus metrics and keeps patient identity out of its log.

The node runs as a real subprocess (``python node.py run``) with ``NOTIFY_SOCKET`` set to
an abstract-namespace datagram socket that the test binds, exactly as systemd would.
CI installs systemd-analyze through scripts/setup.sh --test (Debian package systemd); the
verify test skips only when the binary is absent.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import site
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from rtcontrast.node.ops import systemd as sd
from tests.conftest import dcmtk, free_port
from tests.dicomgen import write_series
from tests.support import MODEL_PATH, REPO, phantom_series

UNIT = REPO / "systemd" / "rtcontrast.service"
PHANTOM_NAME, PHANTOM_ID = "PHANTOM^TEST", "RTC-PHANTOM-001"


# ----------------------------------------------------------------------------- the unit


def _unit_lines() -> list[str]:
    return [ln.strip() for ln in UNIT.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def test_unit_has_the_operational_settings() -> None:
    lines = _unit_lines()
    for required in (
        "Type=notify", "WatchdogSec=30", "Restart=on-failure", "User=rtcontrast", "StateDirectory=rtcontrast",
        "ConfigurationDirectory=rtcontrast", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
        "NoNewPrivileges=yes", "CapabilityBoundingSet=", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service", "ExecReload=/bin/kill -HUP $MAINPID",
    ):
        assert required in lines, required
    assert not any(ln.startswith("DynamicUser=yes") for ln in lines)
    pre = [ln for ln in lines if ln.startswith("ExecStartPre=")]
    reload = [ln for ln in lines if ln.startswith("ExecReload=")]
    assert len(pre) == 1 and " check-config " in pre[0]
    assert len(reload) == 2 and " check-config " in reload[0]  # check first, then HUP
    assert any(ln.startswith("ExecStart=") and " run --config /etc/rtcontrast/node.yaml" in ln for ln in lines)


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd; scripts/setup.sh --test installs it)")
    # verify insists that ExecStart binaries exist: point the venv's python at a real one,
    # everything else (directives, sections, values) is checked as shipped.
    text = UNIT.read_text().replace("/opt/rtcontrast/current/venv/bin/python", sys.executable)
    unit = tmp_path / "rtcontrast.service"
    unit.write_text(text)
    r = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [ln for ln in (r.stdout + r.stderr).splitlines() if "rtcontrast.service" in ln]
    assert r.returncode == 0 and complaints == [], r.stdout + r.stderr

    # the check can fail: a typo in a directive is reported
    unit.write_text(text.replace("WatchdogSec=30", "WatchdogSec=30\nWatchdogSecs=30"))
    r = subprocess.run([tool, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "Unknown key" in r.stdout + r.stderr


def test_install_script_releases_configs_and_unit(tmp_path: Path) -> None:
    env = {
        **os.environ, "NO_SYSTEMD": "1", "PREFIX": str(tmp_path / "opt"), "ETC": str(tmp_path / "etc"),
        "UNIT_DIR": str(tmp_path / "units"), "STATE": str(tmp_path / "state"),
        # no package download in a test: the release venv sees this interpreter's packages
        # (PYTHONPATH works whether they are global or in a venv, unlike --system-site-packages)
        "VENV_ARGS": "--without-pip", "PIP": "0", "PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join(site.getsitepackages()),
    }

    def install(version: str) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["bash", str(REPO / "scripts" / "install.sh")], env={**env, "VERSION": version},
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        return r

    r = install("1.0-a")
    opt, etc = tmp_path / "opt", tmp_path / "etc"
    assert os.readlink(opt / "current") == "releases/1.0-a"
    assert (opt / "current" / "app" / "node.py").is_file() and (opt / "current" / "venv" / "bin" / "python").exists()
    assert (opt / "current" / "app" / "models" / "qmap-pelvis.onnx").is_file()
    app = opt / "current" / "app"
    assert (app / "LICENSE").read_text() == (REPO / "LICENSE").read_text() and (app / "NOTICE").is_file()
    third = (app / "THIRD-PARTY-LICENCES.txt").read_text()
    assert "pydicom" in third and "GPL!" not in third and "pylibjpeg-libjpeg" not in third
    node_cfg = yaml.safe_load((etc / "node.yaml").read_text())
    assert node_cfg["var_dir"] == str(tmp_path / "state")
    assert node_cfg["model_path"] == str(opt / "current" / "app" / "models" / "qmap-se.onnx")
    assert (tmp_path / "units" / "rtcontrast.service").read_text() == UNIT.read_text()
    assert "OK: node" in r.stdout  # check-config of the installed release against /etc

    # the admin edits the config; an upgrade keeps it and switches `current`
    (etc / "node.yaml").write_text((etc / "node.yaml").read_text().replace("ae_title: RTCONTRAST", "ae_title: RTC_SITE"))
    r = install("1.1-b")
    assert os.readlink(opt / "current") == "releases/1.1-b"
    assert "ae_title: RTC_SITE" in (etc / "node.yaml").read_text()
    assert "kept existing" in r.stdout and (etc / "node.yaml.dist").is_file()
    assert sorted(p.name for p in (opt / "releases").iterdir()) == ["1.0-a", "1.1-b"]


# ----------------------------------------------------------------------------- sd_notify


def _notify_socket() -> tuple[socket.socket, str]:
    name = f"rtcontrast-test-{uuid.uuid4().hex[:12]}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    return s, "@" + name


def test_notify_helper_abstract_and_path_sockets(tmp_path: Path) -> None:
    s, addr = _notify_socket()
    with s:
        s.settimeout(5)
        assert sd.notify("READY=1\nSTATUS=x", {"NOTIFY_SOCKET": addr})
        assert s.recv(4096) == b"READY=1\nSTATUS=x"
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as p:
        p.bind(str(path))
        p.settimeout(5)
        assert sd.notify("WATCHDOG=1", {"NOTIFY_SOCKET": str(path)})
        assert p.recv(4096) == b"WATCHDOG=1"
    assert not sd.notify("READY=1", {})  # outside systemd: a no-op
    assert not sd.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})  # never raises
    assert sd.watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert sd.watchdog_interval_s({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    w = sd.Watchdog({"WATCHDOG_USEC": "2000000"})
    assert w.period_s == 1.0 and not w.maybe_ping(False)  # unhealthy: no ping


def _recipe(key: str, te: float, tr: float, number: int) -> dict[str, Any]:
    return {"key": key, "label": key, "te_ms": te, "tr_ms": tr, "series_number": number, "destinations": ["out"]}


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def test_node_under_systemd_ready_watchdog_reload_metrics(tmp_path: Path) -> None:
    """One subprocess node, as systemd runs it: READY once listening, WATCHDOG pings,
    SIGHUP with a broken protocol (refused, field errors logged, old one stays) and a good
    one (the next series gets the new recipe), metrics after the end-to-end run, no
    patient identity in the log."""
    port, mport = free_port(), free_port()
    export = tmp_path / "export"
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({
        "bind_host": "127.0.0.1", "port": port, "var_dir": str(tmp_path / "var"), "model_path": str(MODEL_PATH),
        "series_idle_timeout_s": 1.5, "release_grace_s": 0.3, "limits": {"min_free_disk_bytes": 0},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": mport},
        "delivery": {"base_delay_s": 0.3, "max_delay_s": 1.0, "poll_interval_s": 0.2},
    }))
    # lenient QA: this test is about systemd (notify, reload, stop), not QA (pinned in tests/test_pins_qa.py)
    lenient = {"max_self_nrmse": 10.0, "max_te_error_frac": 100.0, "max_tr_error_frac": 100.0, "action": "warn"}
    proto = tmp_path / "protocol.yaml"
    good1 = {"version": "ops-1", "qa": lenient, "destinations": {"out": {"folder": {"path": str(export)}}},
             "recipes": [_recipe("T2w", 100, 4000, 901)]}
    proto.write_text(yaml.safe_dump(good1))
    log_path = tmp_path / "node.log"
    sock, addr = _notify_socket()
    env = {**os.environ, "NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "2000000"}
    env.pop("WATCHDOG_PID", None)
    with open(log_path, "w") as logf:
        proc = subprocess.Popen([sys.executable, str(REPO / "node.py"), "run", "--config", str(cfg), "--protocol",
                                 str(proto)], cwd=tmp_path, env=env, stdout=logf, stderr=subprocess.STDOUT)
    messages: list[tuple[float, str]] = []
    ready_before_listen: list[bool] = []
    reading = threading.Event()

    def reader() -> None:
        """Drain the notify socket as systemd does (a reader that falls behind fills the queue)."""
        sock.settimeout(0.2)
        while not reading.is_set():
            try:
                msg = sock.recv(4096).decode()
            except (TimeoutError, OSError):
                continue
            if msg.startswith("READY=1"):
                ready_before_listen.append(not _port_open(port))
            messages.append((time.monotonic(), msg))

    threading.Thread(target=reader, name="notify-reader", daemon=True).start()

    def receive_until(pred: Any, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert not any(ready_before_listen), "READY=1 came before the SCP listened"
            if pred():
                return
            time.sleep(0.05)
        raise AssertionError(f"timed out; got {[m for _, m in messages]}; log:\n{log_path.read_text()[-3000:]}")

    def log_text() -> str:
        return log_path.read_text()

    def wait_log(needle: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if needle in log_text():
                return
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} not in log:\n{log_text()[-3000:]}")

    def send_series(seed: str) -> None:
        files = write_series(phantom_series(uid_seed=seed), tmp_path / seed)
        r = subprocess.run([dcmtk("storescu"), "-aet", "SCANNER", "-aec", "RTCONTRAST", "-to", "10", "-ta", "10",
                            "-td", "20", "127.0.0.1", str(port), *map(str, files)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr

    def exported_series() -> set[str]:
        return {p.parent.name for p in export.rglob("*.dcm")}

    try:
        receive_until(lambda: any(m.startswith("READY=1") for _, m in messages), 90)
        ready = next(m for _, m in messages if m.startswith("READY=1"))
        assert f"MAINPID={proc.pid}" in ready and "STATUS=listening" in ready
        receive_until(lambda: sum(m == "WATCHDOG=1" for _, m in messages) >= 2, 10)
        pings = [t for t, m in messages if m == "WATCHDOG=1"]
        assert pings[-1] - pings[-2] < 2.0  # at least every WATCHDOG_USEC

        # 1) a series with protocol ops-1: one synthetic series
        send_series("sd1")
        deadline = time.monotonic() + 60
        while len(list(export.rglob("*.dcm"))) < 6 and time.monotonic() < deadline:
            time.sleep(0.2)
        first = exported_series()
        assert len(first) == 1

        # 2) a broken protocol: refused with every field-level error, old one stays
        bad = dict(good1, version="ops-bad", recipes=[_recipe("T2w", -5, 4000, 901), _recipe("X", 10, 500, 5000)])
        proto.write_text(yaml.safe_dump(bad))
        proc.send_signal(signal.SIGHUP)
        wait_log("protocol reload refused", 15)
        text = log_text()
        assert re.search(r"protocol reload: .*protocol\.yaml:\d+: recipes\[0\]\.te_ms: Input should be greater than 0", text)
        assert re.search(r"protocol reload: .*recipes\[1\]\.series_number: series number 5000 is outside", text)
        assert "protocol ops-1+sha256:" in text.split("protocol reload refused")[1].splitlines()[0]

        # 3) a good protocol with a new recipe: in force for the next series
        good2 = dict(good1, version="ops-2", recipes=[_recipe("T2w", 100, 4000, 901), _recipe("T1w", 10, 500, 902)])
        proto.write_text(yaml.safe_dump(good2))
        proc.send_signal(signal.SIGHUP)
        wait_log("protocol reloaded from", 15)
        send_series("sd2")
        deadline = time.monotonic() + 60
        while len(exported_series() - first) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(exported_series() - first) == 2, "the new recipe did not take effect"
        wait_log("delivered: 12 instance(s)", 30)

        # 4) metrics after the end-to-end run
        body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()

        def value(name: str) -> float:
            m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", body, re.M)
            assert m, f"{name} not in metrics:\n{body}"
            return float(m.group(1))

        assert value("rtcontrast_instances_received_total") == 12
        assert value("rtcontrast_series_completed_total") == 2
        assert value('rtcontrast_jobs_finished_total{state="delivered"}') == 2
        assert value('rtcontrast_instances_sent_total{destination="out"}') == 18
        assert value('rtcontrast_send_failures_total{destination="out"}') == 0
        assert value('rtcontrast_outbox_pending{destination="out"}') == 0
        assert value('rtcontrast_dead_letters{destination="out"}') == 0
        assert value("rtcontrast_jobs_pending") == 0
        assert value('rtcontrast_stage_duration_seconds_count{stage="infer"}') == 2
        assert value('rtcontrast_protocol_reloads_total{result="rejected"}') == 1
        assert value('rtcontrast_protocol_reloads_total{result="ok"}') == 1
        assert re.search(r'^rtcontrast_model_info\{.*name="qmap-pelvis".*provider="\w+ExecutionProvider".*sha256="[0-9a-f]{64}"', body, re.M)
        assert re.search(r'^rtcontrast_protocol_info\{.*version="ops-2\+sha256:[0-9a-f]{12}"', body, re.M)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        receive_until(lambda: any(m.startswith("STOPPING=1") for _, m in messages), 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        reading.set()
        sock.close()
    text = log_text()
    assert PHANTOM_NAME not in text and PHANTOM_ID not in text and "PHANTOM" not in text


def test_notify_never_blocks_on_a_full_queue(tmp_path: Path) -> None:
    """A supervisor that reads slowly must not freeze the node's main loop (and its SIGTERM
    handling): Linux queues only ``max_dgram_qlen`` (10) datagrams on a unix socket; past
    that a blocking send would hang.  Here nobody reads: notify returns False at once."""
    sock, addr = _notify_socket()
    try:
        env = {"NOTIFY_SOCKET": addr}
        results = []
        t0 = time.monotonic()
        for _ in range(64):
            results.append(sd.notify("WATCHDOG=1", env=env))
        assert time.monotonic() - t0 < 5.0
        assert results[0] is True and results[-1] is False  # queued until full, then dropped
    finally:
        sock.close()
