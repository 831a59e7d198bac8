"""A real Orthanc on loopback, standing in for the planning system (TPS) in tests.

Why a real one: the outbox must prove that a peer that actually parses DICOM accepted
each instance (status checked, instance retrievable by SOP Instance UID), and that a
peer that is down and comes back is handled.  Orthanc is cheap to start (about a
second) and keeps its storage across :meth:`Orthanc.stop` / :meth:`Orthanc.start`.

Use the ``orthanc`` fixture (function scope)::

    from tests.orthanc import orthanc  # noqa: F401  (import the fixture)

    def test_x(orthanc):
        ... send to ("127.0.0.1", orthanc.dicom_port, orthanc.aet) ...
        assert sop_uid in orthanc.sop_instance_uids()
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.conftest import free_port

ORTHANC_BIN = "/usr/sbin/Orthanc"


class OrthancError(RuntimeError):
    """Orthanc did not start, stop or answer as expected."""


class Orthanc:
    """One Orthanc process on 127.0.0.1 with its own config, ports and storage.

    ``aet`` is "ORTHANC"; the called AE is not checked and any calling AE may store.
    ``OverwriteInstances`` is on, as a TPS replaces an instance that arrives again
    with the same SOP Instance UID.
    """

    def __init__(self, workdir: Path, aet: str = "ORTHANC", start_timeout_s: float = 30.0) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.aet = aet
        self.host = "127.0.0.1"
        self.dicom_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.dicom_port:
            self.http_port = free_port()
        self.start_timeout_s = start_timeout_s
        self.storage = self.workdir / "storage"
        self.config_path = self.workdir / "orthanc.json"
        self.log_path = self.workdir / "orthanc.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._write_config()

    # -- lifecycle ---------------------------------------------------------------
    def _write_config(self) -> None:
        cfg = {
            "Name": "rtcontrast-test-tps",
            "StorageDirectory": str(self.storage),
            "IndexDirectory": str(self.storage),
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "DicomModalities": {},
            "UnknownSopClassAccepted": True,
            "OverwriteInstances": True,
            "Plugins": [],
            "SaveJobs": False,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 4,
            "DicomThreadsCount": 2,
            "StableAge": 1,
        }
        self.config_path.write_text(json.dumps(cfg, indent=2))

    @property
    def running(self) -> bool:
        """True while the Orthanc process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start Orthanc (same ports, same storage) and wait until its REST API answers."""
        if self.running:
            return
        self._log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            [ORTHANC_BIN, str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise OrthancError(f"Orthanc exited with {self._proc.returncode}; log:\n{self.log_tail()}")
            try:
                self.get("/system", timeout=1.0)
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.1)
        self.stop()
        raise OrthancError(f"Orthanc did not answer within {self.start_timeout_s} s; log:\n{self.log_tail()}")

    def stop(self, timeout_s: float = 15.0, kill: bool = False) -> None:
        """Stop Orthanc; storage is kept.

        SIGTERM (a clean stop takes ~3 s), then SIGKILL after ``timeout_s``;
        ``kill=True`` sends SIGKILL at once (a crash; also the fast teardown).
        """
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, n: int = 4000) -> str:
        """The last ``n`` characters of Orthanc's log, for failure messages."""
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # -- REST --------------------------------------------------------------------
    def _url(self, path: str) -> str:
        return f"http://{self.host}:{self.http_port}{path}"

    def get_bytes(self, path: str, timeout: float = 10.0) -> bytes:
        """GET ``path`` from the REST API; raw body."""
        with urllib.request.urlopen(self._url(path), timeout=timeout) as resp:
            return resp.read()

    def get(self, path: str, timeout: float = 10.0) -> Any:
        """GET ``path`` from the REST API; parsed JSON."""
        return json.loads(self.get_bytes(path, timeout=timeout))

    def post(self, path: str, body: Any, timeout: float = 10.0) -> Any:
        """POST JSON (or raw bytes) to ``path``; parsed JSON answer."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self._url(path), data=data, method="POST")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def instances(self) -> list[dict[str, Any]]:
        """Every stored instance, with ``ID``, ``MainDicomTags``, ``ParentSeries``."""
        return list(self.get("/instances?expand"))

    def series(self) -> list[dict[str, Any]]:
        """Every stored series, with ``ID``, ``MainDicomTags`` and its ``Instances`` ids."""
        return list(self.get("/series?expand"))

    def sop_instance_uids(self) -> list[str]:
        """SOP Instance UIDs of every stored instance (a list: duplicates would show)."""
        return [i["MainDicomTags"]["SOPInstanceUID"] for i in self.instances()]

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc id of the instance with this SOP Instance UID, or None."""
        found = self.post(
            "/tools/find",
            {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}},
        )
        return found[0] if found else None

    def instance_file(self, instance_id: str) -> bytes:
        """The stored DICOM file of one instance (Orthanc id)."""
        return self.get_bytes(f"/instances/{urllib.parse.quote(instance_id)}/file")

    def save_instance(self, instance_id: str, path: Path) -> Path:
        """Write one stored instance to ``path`` for inspection; returns ``path``."""
        path = Path(path)
        path.write_bytes(self.instance_file(instance_id))
        return path

    def dataset(self, sop_instance_uid: str) -> pydicom.Dataset:
        """The stored instance with this SOP Instance UID, parsed by pydicom."""
        iid = self.find_instance(sop_instance_uid)
        if iid is None:
            raise KeyError(sop_instance_uid)
        tmp = self.workdir / f"{iid}.dcm"
        self.save_instance(iid, tmp)
        try:
            return pydicom.dcmread(tmp)
        finally:
            os.unlink(tmp)

    def __enter__(self) -> Orthanc:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """A started Orthanc on 127.0.0.1 (AE "ORTHANC"), stopped at the end of the test."""
    if not Path(ORTHANC_BIN).exists():
        pytest.skip("Orthanc not installed (apt-get install orthanc)")
    server = Orthanc(tmp_path / "orthanc")
    server.start()
    try:
        yield server
    finally:
        server.stop(kill=True)
