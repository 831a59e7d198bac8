"""Shared test fixtures: real DICOM peers on loopback (dcmtk, Orthanc), free ports.

dcmtk tools are resolved from /usr/bin first: pynetdicom installs Python apps with the
same names (storescu, echoscu, ...) that can shadow dcmtk on PATH.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

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
