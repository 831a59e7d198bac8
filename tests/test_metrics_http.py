"""The metrics endpoint (#16): /healthz follows the node's health, build info is exported."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from rtcontrast import __version__
from rtcontrast.node.ops.metrics import NodeMetrics


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_healthz_and_build_info() -> None:
    m = NodeMetrics()
    state = {"healthy": True}
    m.set_health_check(lambda: state["healthy"])
    port = m.serve("127.0.0.1", 0)
    try:
        assert _get(port, "/healthz") == (200, "ok\n")
        state["healthy"] = False
        code, text = _get(port, "/healthz")
        assert code == 503 and text.startswith("unhealthy:")

        def broken() -> bool:
            raise RuntimeError("database locked")

        m.set_health_check(broken)
        code, text = _get(port, "/healthz")
        assert code == 503 and "RuntimeError: database locked" in text
        code, body = _get(port, "/metrics")
        assert code == 200
        [line] = [ln for ln in body.splitlines() if ln.startswith("rtcontrast_build_info{")]
        assert f'version="{__version__}"' in line and 'pydicom="' in line and 'commit="' in line
        assert line.endswith(" 1.0")
        assert "rtcontrast_instances_received_total" in body
    finally:
        m.stop()
    with pytest.raises(OSError):
        _get(port, "/healthz")
