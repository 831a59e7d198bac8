"""Security of the receiving and sending sides, with real dcmtk peers on 127.0.0.1.

Admission (calling AE, called AE, peer address) is answered with the A-ASSOCIATE-RJ
reason PS3.8 defines and one log line; DICOM TLS works both ways with throwaway
certificates (tests/tlsgen.py) and fails closed; the association limit, PDU size and
disk guard come from the node configuration.  No log line carries the phantom's
PatientName, PatientID or PatientBirthDate.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, Verification

from rtcontrast.settings.node import NodeConfig
from rtcontrast.node.store import db
from rtcontrast.node.service import Node
from rtcontrast.node.dispatch.destinations import DicomDestination, build_destinations
from rtcontrast.node.dispatch.outbox import DELIVERED, PENDING, Outbox, RetryPolicy
from rtcontrast.node.dispatch.sender import Sender
from rtcontrast.settings.protocol import ProtocolConfig
from rtcontrast.core.inference import QMapModel
from rtcontrast.node.receive.scp import ScpSettings, StorageSCP, StoredInstance
from rtcontrast.node.receive.spool import Spool
from tests.conftest import dcmtk, free_port
from tests.dicomgen import PATIENT, make_series, phantom, write_series
from tests.support import MODEL_PATH
from tests.tlsgen import Pki, make_pki

pytestmark = pytest.mark.network

AET = "RTCONTRAST"
PHI = (PATIENT["PatientName"], PATIENT["PatientID"], PATIENT["PatientBirthDate"])


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A second, unrelated CA: its certificates must not be trusted by the first."""
    return make_pki(tmp_path_factory.mktemp("pki2"), cn="untrusted CA")


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(make_series(phantom(2), te=90.0, tr=4000.0), tmp_path_factory.mktemp("phantom"))


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Everything the node logs (DEBUG for rtcontrast, INFO for pynetdicom), checked for PHI after the test."""
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="rtcontrast")
    yield caplog
    text = caplog.text
    for value in PHI:
        assert value not in text, f"patient identifier {value!r} in the logs"


def start_scp(tmp_path: Path, config: NodeConfig, min_free_bytes: int = 0) -> tuple[StorageSCP, list[StoredInstance]]:
    """A Storage SCP configured exactly as Node builds it (ScpSettings.from_config)."""
    stored: list[StoredInstance] = []
    settings = ScpSettings.from_config(config)
    settings = ScpSettings(**{**settings.__dict__, "network_timeout": 10, "acse_timeout": 10, "dimse_timeout": 10})
    scp = StorageSCP(settings, Spool(tmp_path / "spool", min_free_bytes), stored.append, lambda keys: None)
    scp.start()
    return scp, stored


@pytest.fixture
def scp_factory(tmp_path: Path) -> Iterator[Any]:
    made: list[StorageSCP] = []

    def make(**cfg: Any) -> tuple[StorageSCP, list[StoredInstance]]:
        base: dict[str, Any] = {"bind_host": "127.0.0.1", "port": free_port()}
        scp, stored = start_scp(tmp_path, NodeConfig.model_validate({**base, **cfg}))
        made.append(scp)
        return scp, stored

    yield make
    for scp in made:
        scp.stop()


def storescu(port: int, files: list[Path], *, aet: str = "SCANNER", aec: str = AET,
             tls: tuple[str, ...] = (), timeout: float = 60) -> subprocess.CompletedProcess[str]:
    cmd = [dcmtk("storescu"), "-v", "-aet", aet, "-aec", aec, "-to", "10", "-ta", "10", "-td", "10",
           *tls, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def tls_client_args(pki: Pki) -> tuple[str, ...]:
    """storescu: our client key + certificate, and the CA that must sign the server's."""
    return ("+tls", str(pki.client.key), str(pki.client.cert), "+cf", str(pki.ca))


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "rtcontrast.node.receive.scp" and r.getMessage().startswith("refused")]


def wait_for(cond: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


# ----------------------------------------------------------------------------- admission
def test_unknown_calling_ae_refused(scp_factory: Any, phantom_files: list[Path],
                                    logs: pytest.LogCaptureFixture) -> None:
    scp, stored = scp_factory(allowed_calling_aes=["MR_SCANNER1"])
    res = storescu(scp.port, phantom_files, aet="INTRUDER")
    assert res.returncode != 0 and "Calling AE Title Not Recognized" in res.stderr, res.stderr
    assert stored == []
    lines = refusals(logs)
    assert len(lines) == 1, lines
    assert "127.0.0.1" in lines[0] and "INTRUDER" in lines[0] and "reason 3" in lines[0], lines[0]
    ok = storescu(scp.port, phantom_files, aet="MR_SCANNER1")
    assert ok.returncode == 0, ok.stderr
    assert len(stored) == len(phantom_files)


def test_called_ae_must_match(scp_factory: Any, phantom_files: list[Path], logs: pytest.LogCaptureFixture) -> None:
    scp, stored = scp_factory()
    res = storescu(scp.port, phantom_files, aec="OTHER_NODE")
    assert res.returncode != 0 and "Called AE Title Not Recognized" in res.stderr, res.stderr
    assert stored == []
    (line,) = refusals(logs)
    assert "OTHER_NODE" in line and "reason 7" in line


def test_unknown_ip_refused(scp_factory: Any, phantom_files: list[Path], logs: pytest.LogCaptureFixture) -> None:
    """An address outside allowed_ips is closed at accept, before any byte is read (#15: no slot, no thread)."""
    scp, stored = scp_factory(allowed_ips=["10.0.0.0/8", "192.168.1.17"])
    res = storescu(scp.port, phantom_files)
    assert res.returncode != 0 and "Association Request Failed" in res.stderr, res.stderr
    assert stored == []
    (line,) = refusals(logs)
    assert "127.0.0.1" in line and "allowed_ips" in line and "before any association" in line, line


def test_allowed_ip_network_admitted(scp_factory: Any, phantom_files: list[Path],
                                     logs: pytest.LogCaptureFixture) -> None:
    scp, stored = scp_factory(allowed_ips=["10.0.0.0/8", "127.0.0.0/8"])
    res = storescu(scp.port, phantom_files)
    assert res.returncode == 0, res.stderr
    assert len(stored) == len(phantom_files) and refusals(logs) == []


# ----------------------------------------------------------------------------- TLS, receiving
def tls_config(pki: Pki, **over: Any) -> dict[str, Any]:
    tls = {"enabled": True, "port": free_port(), "cert_file": str(pki.server.cert), "key_file": str(pki.server.key),
           "ca_file": str(pki.ca), "require_client_cert": True, "handshake_timeout_s": 5}
    tls.update(over)
    return {"tls": tls}


def test_tls_store_with_dcmtk(scp_factory: Any, pki: Pki, phantom_files: list[Path],
                              logs: pytest.LogCaptureFixture) -> None:
    scp, stored = scp_factory(**tls_config(pki))
    assert scp.tls_port is not None and scp.tls_port != scp.port
    res = storescu(scp.tls_port, phantom_files, tls=tls_client_args(pki))
    assert res.returncode == 0, res.stderr
    assert sorted(i.sop_instance_uid for i in stored) == sorted(
        str(__import__("pydicom").dcmread(f).SOPInstanceUID) for f in phantom_files)
    # the summary line is written when the server side of the connection closes, after storescu exited
    deadline = time.monotonic() + 10
    while not any("TLSv1." in r.getMessage() and "released" in r.getMessage() for r in logs.records):
        assert time.monotonic() < deadline, [r.getMessage() for r in logs.records]
        time.sleep(0.05)
    # the plain port still answers plain DICOM (plain_port_enabled defaults to true)
    assert storescu(scp.port, phantom_files[:1]).returncode == 0


def test_plain_dicom_to_tls_port_fails(scp_factory: Any, pki: Pki, phantom_files: list[Path],
                                       logs: pytest.LogCaptureFixture) -> None:
    scp, stored = scp_factory(**tls_config(pki))
    res = storescu(scp.tls_port, phantom_files)
    assert res.returncode != 0 and stored == []
    line = wait_for(lambda: [m for m in refusals(logs) if "handshake failed" in m], 5, "the handshake log line")[0]
    assert "127.0.0.1" in line and "does not speak TLS" in line, line


def test_untrusted_or_missing_client_certificate_fails(scp_factory: Any, pki: Pki, other_pki: Pki,
                                                       phantom_files: list[Path],
                                                       logs: pytest.LogCaptureFixture) -> None:
    scp, stored = scp_factory(**tls_config(pki))
    foreign = ("+tls", str(other_pki.client.key), str(other_pki.client.cert), "+cf", str(pki.ca))
    assert storescu(scp.tls_port, phantom_files, tls=foreign).returncode != 0
    assert storescu(scp.tls_port, phantom_files, tls=("+tla", "+cf", str(pki.ca))).returncode != 0
    assert stored == []
    wait_for(lambda: len([m for m in refusals(logs) if "handshake failed" in m]) >= 2, 5, "two refusals")
    # and the node does not trust a server certificate from another CA either way round:
    res = storescu(scp.tls_port, phantom_files, tls=("+tls", str(pki.client.key), str(pki.client.cert),
                                                      "+cf", str(other_pki.ca)))
    assert res.returncode != 0 and stored == []


def test_silent_tls_client_does_not_block_others(scp_factory: Any, pki: Pki, phantom_files: list[Path],
                                                 logs: pytest.LogCaptureFixture) -> None:
    """A peer that connects and never starts the handshake must not stall the listener."""
    scp, stored = scp_factory(**tls_config(pki, handshake_timeout_s=30))
    with socket.create_connection(("127.0.0.1", scp.tls_port), timeout=5):
        res = storescu(scp.tls_port, phantom_files[:1], tls=tls_client_args(pki), timeout=30)
        assert res.returncode == 0, res.stderr
    assert len(stored) == 1


def test_tls_only_node_from_config(tmp_path: Path, pki: Pki, phantom_files: list[Path],
                                   logs: pytest.LogCaptureFixture) -> None:
    """The whole Node with TLS only: dcmtk over TLS is stored, the plain port is closed."""
    plain = free_port()
    cfg = NodeConfig.model_validate({
        "bind_host": "127.0.0.1", "port": plain, "var_dir": str(tmp_path / "var"), "model_path": str(MODEL_PATH),
        "limits": {"min_free_disk_bytes": 0}, "series_idle_timeout_s": 60, "metrics": {"enabled": False},
        **tls_config(pki, plain_port_enabled=False),
    })
    node = Node(cfg, ProtocolConfig(), model=QMapModel(MODEL_PATH, "cpu"))
    with node:
        assert node.scp is not None and node.scp.tls_port == cfg.tls.port
        res = storescu(cfg.tls.port, phantom_files, tls=tls_client_args(pki))
        assert res.returncode == 0, res.stderr
        assert len(list((tmp_path / "var" / "spool").rglob("*.dcm"))) == len(phantom_files)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", plain), timeout=2).close()


# ----------------------------------------------------------------------------- TLS, sending
@pytest.fixture
def tls_storescp(tmp_path: Path, pki: Pki) -> Iterator[tuple[int, Path]]:
    """dcmtk storescp with TLS, requiring a client certificate from ``pki``'s CA."""
    port, out = free_port(), tmp_path / "tps"
    out.mkdir()
    cmd = [dcmtk("storescp"), "-aet", "TPS", "-od", str(out), "-ta", "10", "-td", "10",
           "+tls", str(pki.server.key), str(pki.server.cert), "+cf", str(pki.ca), "-rc", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:  # a bare TCP probe: storescp logs a failed handshake and keeps listening
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"storescp +tls did not start: {proc.stdout.read() if proc.stdout else ''}") from None
                time.sleep(0.1)
        yield port, out
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def make_sender(tmp_path: Path, dest: DicomDestination) -> tuple[Outbox, Sender]:
    conn = db.connect(tmp_path / "outbox.db")
    outbox = Outbox(conn, tmp_path / "outbox")
    return outbox, Sender(outbox, {dest.name: dest}, RetryPolicy(max_attempts=3, base_delay_s=60, max_delay_s=60))


def protocol_tps(port: int, **tls: Any) -> DicomDestination:
    """The destination as an admin writes it in protocol.yaml (tls block), via build_destinations."""
    proto = ProtocolConfig.model_validate({
        "destinations": {"tps": {"dicom": {"host": "127.0.0.1", "port": port, "ae_title": "TPS",
                                           "connect_timeout_s": 5, "acse_timeout_s": 10, "tls": tls}}},
        "recipes": [{"key": "T2w", "label": "T2w", "te_ms": 100, "tr_ms": 4000, "series_number": 901,
                     "destinations": ["tps"]}],
    })
    dest = build_destinations(proto, AET)["tps"]
    assert isinstance(dest, DicomDestination) and dest.tls == bool(tls.get("enabled"))
    return dest


def test_outbox_delivers_over_tls(tmp_path: Path, pki: Pki, tls_storescp: tuple[int, Path],
                                  phantom_files: list[Path], logs: pytest.LogCaptureFixture) -> None:
    port, out = tls_storescp
    dest = protocol_tps(port, enabled=True, ca_file=str(pki.ca), cert_file=str(pki.client.cert),
                        key_file=str(pki.client.key))
    outbox, sender = make_sender(tmp_path, dest)
    outbox.enqueue("job1", "tps", phantom_files)
    assert sender.run_once() == len(phantom_files)
    assert [i.state for i in outbox.items()] == [DELIVERED] * len(phantom_files)
    wait_for(lambda: len(list(out.iterdir())) == len(phantom_files), 10, "files at the TLS storescp")


def test_outbox_tls_wrong_ca_is_not_delivered(tmp_path: Path, pki: Pki, other_pki: Pki,
                                              tls_storescp: tuple[int, Path], phantom_files: list[Path],
                                              logs: pytest.LogCaptureFixture) -> None:
    port, out = tls_storescp
    dest = protocol_tps(port, enabled=True, ca_file=str(other_pki.ca), cert_file=str(pki.client.cert),
                        key_file=str(pki.client.key))
    outbox, sender = make_sender(tmp_path, dest)
    outbox.enqueue("job1", "tps", phantom_files[:1])
    assert sender.run_once() == 0
    (item,) = outbox.items()
    assert item.state == PENDING and item.attempts == 1 and item.next_attempt_at > time.time() + 30
    assert item.last_error and "TLS handshake" in item.last_error and "certificate verify failed" in item.last_error
    assert list(out.iterdir()) == []


def test_outbox_tls_without_client_cert_is_not_delivered(tmp_path: Path, pki: Pki,
                                                         tls_storescp: tuple[int, Path],
                                                         phantom_files: list[Path],
                                                         logs: pytest.LogCaptureFixture) -> None:
    port, out = tls_storescp
    outbox, sender = make_sender(tmp_path, protocol_tps(port, enabled=True, ca_file=str(pki.ca)))
    outbox.enqueue("job1", "tps", phantom_files[:1])
    assert sender.run_once() == 0
    (item,) = outbox.items()
    assert item.state == PENDING and item.attempts == 1 and item.last_error
    assert list(out.iterdir()) == []


def test_outbox_tls_missing_ca_file_is_a_clear_failure(tmp_path: Path, phantom_files: list[Path],
                                                       logs: pytest.LogCaptureFixture) -> None:
    """Caught by the protocol check first; a file that disappears later fails each attempt clearly."""
    from rtcontrast.settings.node import ConfigError

    with pytest.raises(ValueError, match="missing.crt"):
        protocol_tps(free_port(), enabled=True, ca_file=str(tmp_path / "missing.crt"))
    bad = tmp_path / "proto.yaml"
    bad.write_text("destinations:\n  tps:\n    dicom:\n      host: 127.0.0.1\n      port: 104\n      ae_title: TPS\n"
                   f"      tls: {{enabled: true, ca_file: {tmp_path / 'nope.crt'}}}\n"
                   "recipes: [{key: a, label: a, te_ms: 100, tr_ms: 4000, series_number: 901, destinations: [tps]}]\n")
    from rtcontrast.settings.protocol import load_protocol

    with pytest.raises(ConfigError, match=r"proto.yaml:7: destinations.tps.dicom.tls: .*nope.crt"):
        load_protocol(bad)
    dest = DicomDestination(name="tps", host="127.0.0.1", port=free_port(), ae_title="TPS", tls=True,
                            tls_ca_file=str(tmp_path / "missing.crt"), connect_timeout_s=5)
    outbox, sender = make_sender(tmp_path, dest)
    outbox.enqueue("job1", "tps", phantom_files[:1])
    assert sender.run_once() == 0
    (item,) = outbox.items()
    assert item.state == PENDING and "TLS set-up" in (item.last_error or "")


# ----------------------------------------------------------------------------- limits
def test_max_associations_and_pdu_size(scp_factory: Any, logs: pytest.LogCaptureFixture) -> None:
    """The (N+1)-th simultaneous association is rejected (transient: retry later), not queued."""
    scp, _ = scp_factory(limits={"max_associations": 2, "max_pdu_bytes": 65536, "min_free_disk_bytes": 0,
                                 "max_associations_per_peer": 3})  # the global limit, not the per-peer one
    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage)
    held = [ae.associate("127.0.0.1", scp.port, ae_title=AET) for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        assert held[0].acceptor.maximum_length == 65536
        extra = ae.associate("127.0.0.1", scp.port, ae_title=AET)
        assert extra.is_rejected and not extra.is_established
        rj = extra.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (2, 3, 2)  # transient, presentation, local limit
        line = wait_for(lambda: [m for m in refusals(logs) if "too many" in m], 5, "the limit log line")[0]
        assert "limit 2" in line and "SCANNER" in line
        held.pop().release()

        def admitted() -> bool:
            a = ae.associate("127.0.0.1", scp.port, ae_title=AET)
            if a.is_established:
                held.append(a)
                return True
            return False

        wait_for(admitted, 10, "a free association slot after a release")
    finally:
        for a in held:
            a.release()


def test_disk_guard_refuses_before_the_disk_fills(tmp_path: Path, phantom_files: list[Path],
                                                  logs: pytest.LogCaptureFixture) -> None:
    """limits.min_free_disk_bytes reaches the Node's spool: 0xA700, nothing written."""
    cfg = NodeConfig.model_validate({
        "bind_host": "127.0.0.1", "port": free_port(), "var_dir": str(tmp_path / "var"),
        "model_path": str(MODEL_PATH), "limits": {"min_free_disk_bytes": 1 << 60}, "metrics": {"enabled": False},
    })
    node = Node(cfg, ProtocolConfig(), model=QMapModel(MODEL_PATH, "cpu"))
    with node:
        res = storescu(node.port, phantom_files)
        assert res.returncode != 0 and "OutOfResources" in res.stderr, res.stderr
        assert list((tmp_path / "var" / "spool").rglob("*.dcm")) == []
        assert node.jobs.unfinished_jobs() == []
    assert any("spool full" in m for m in refusals(logs) + [r.getMessage() for r in logs.records])


def test_node_config_reaches_scp_settings(pki: Pki) -> None:
    """Every admission and limit setting of node.yaml is carried into the SCP (Node uses from_config)."""
    cfg = NodeConfig.model_validate({
        "ae_title": "NODE1", "port": 11112, "require_called_ae": False,
        "allowed_calling_aes": ["MR1", "MR2"], "allowed_ips": ["10.1.2.0/24"],
        "limits": {"max_associations": 3, "max_pdu_bytes": 32768, "max_instance_bytes": 1000},
        **tls_config(pki, port=2762, plain_port_enabled=False),
    })
    s = ScpSettings.from_config(cfg)
    assert (s.ae_title, s.port, s.require_called_aet) == ("NODE1", 11112, False)
    assert s.allowed_calling_aets == ["MR1", "MR2"] and s.allowed_networks == ["10.1.2.0/24"]
    assert (s.max_associations, s.max_pdu_size, s.max_instance_bytes) == (3, 32768, 1000)
    assert s.plain_enabled is False and s.tls is not None
    assert (s.tls.port, s.tls.ca_file, s.tls.require_client_cert) == (2762, str(pki.ca), True)
    defaults = ScpSettings.from_config(NodeConfig())
    assert defaults.tls is None and defaults.plain_enabled and defaults.allowed_networks is None


def test_tls_config_errors(tmp_path: Path, pki: Pki) -> None:
    from rtcontrast.settings.node import ConfigError, load_node_config

    bad = tmp_path / "node.yaml"
    bad.write_text(
        "port: 2762\n"
        "tls:\n"
        "  enabled: true\n"
        f"  cert_file: {tmp_path / 'nope.crt'}\n"
        "  require_client_cert: true\n"
    )
    with pytest.raises(ConfigError) as err:
        load_node_config(bad)
    text = str(err.value)
    assert "node.yaml:2: tls:" in text and "key_file" in text and "nope.crt" in text and "ca_file" in text
    mismatch = tmp_path / "mismatch.yaml"
    mismatch.write_text(f"tls: {{enabled: true, cert_file: {pki.server.cert}, key_file: {pki.client.key}}}\n")
    with pytest.raises(ConfigError, match="key does not match"):
        load_node_config(mismatch)
    ok = tmp_path / "ok.yaml"
    ok.write_text(f"tls: {{enabled: true, port: 11112, cert_file: {pki.server.cert}, key_file: {pki.server.key}}}\n")
    with pytest.raises(ConfigError, match="TLS needs its own port"):
        load_node_config(ok)


def test_mismatched_key_stops_before_listening(tmp_path: Path, pki: Pki, other_pki: Pki) -> None:
    import ssl

    from rtcontrast.node.receive.scp import ScpTls

    port, tls_port = free_port(), free_port()
    settings = ScpSettings(host="127.0.0.1", port=port,
                           tls=ScpTls(port=tls_port, cert_file=str(pki.server.cert), key_file=str(other_pki.server.key)))
    scp = StorageSCP(settings, Spool(tmp_path / "spool"), lambda i: None, lambda k: None)
    with pytest.raises(ssl.SSLError):
        scp.start()
    for p in (port, tls_port):
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", p), timeout=2).close()
    scp.stop()


def test_address_allow_list_forms(tmp_path: Path) -> None:
    """CIDR and single addresses, IPv6, and IPv4 peers seen through a dual-stack socket.

    One admission check (#14): the accept-time gate uses the SCP's, and the node config has
    no second copy (its old one lacked the IPv4-mapped handling).
    """
    scp = StorageSCP(ScpSettings(allowed_networks=["10.0.0.0/8", "192.168.1.17", "fd00::/8"]),
                     Spool(tmp_path / "spool"), lambda i: None, lambda k: None)
    allowed = scp.admission.address_allowed
    assert scp.gate.admission is scp.admission
    assert scp.gate.admit("::ffff:10.1.2.3", established=0) is None
    assert "allowed_ips" in (scp.gate.admit("::ffff:127.0.0.1", established=0) or "")
    assert not hasattr(NodeConfig, "ip_allowed") and not hasattr(NodeConfig, "calling_ae_allowed")
    assert allowed("10.200.3.4") and allowed("192.168.1.17") and allowed("::ffff:10.1.2.3") and allowed("fd00::1")
    assert not allowed("192.168.1.18") and not allowed("127.0.0.1") and not allowed("::1")
    assert not allowed("not-an-address")
