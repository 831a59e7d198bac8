"""Shared test fixtures: real DICOM peers on loopback (dcmtk, Orthanc), free ports.

dcmtk tools are resolved from /usr/bin first: pynetdicom installs Python apps with the
same names (storescu, echoscu, ...) that can shadow dcmtk on PATH.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def dcmtk(tool: str) -> str:
    """Absolute path of a dcmtk command-line tool, never pynetdicom's namesake."""
    for cand in (Path("/usr/bin") / tool, Path("/usr/local/bin") / tool):
        if cand.exists():
            return str(cand)
    found = shutil.which(tool)
    if found is None or "pyenv" in found or "site-packages" in found:
        pytest.skip(f"dcmtk {tool} not installed (apt-get install dcmtk)")
    return found


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def model():  # noqa: ANN201  (QMapModel; imported lazily so conftest stays light)
    """The shipped qmap/1 model through onnxruntime on the CPU (one session per test module)."""
    from rtcontrast.core.inference import QMapModel
    from tests.support import MODEL_PATH

    return QMapModel(MODEL_PATH, "cpu")


@pytest.fixture
def make_node(tmp_path: Path, model: Any) -> Iterator[Callable[..., Any]]:
    """Start in-process nodes (stopped at the end of the test)."""
    from rtcontrast.node.service import Node
    from rtcontrast.settings.node import NodeConfig
    from rtcontrast.settings.protocol import ProtocolConfig
    from tests.support import node_settings

    started: list[Any] = []

    def make(protocol: dict[str, Any], **over: Any) -> Any:
        node = Node(NodeConfig.model_validate(node_settings(tmp_path / "var", **over)),
                    ProtocolConfig.model_validate(protocol), model=model)
        node.start()
        started.append(node)
        return node

    yield make
    for n in started:
        n.stop(timeout_s=10)




@pytest.fixture
def outbox(tmp_path: Path) -> Any:
    """A real outbox (SQLite + files) under ``tmp_path``."""
    from rtcontrast.node.dispatch.outbox import Outbox
    from rtcontrast.node.store.db import connect

    return Outbox(connect(tmp_path / "node.db"), tmp_path / "outbox")
