"""The Storage SCP's settings (AE, limits, allow-lists, TLS) and what it hands on for each stored instance.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path


from rtcontrast.settings.node import NodeConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScpTls:
    """The TLS listener: its port, this node's certificate, and client verification.

    ``ca_file`` set: client certificates are verified against it when presented;
    ``require_client_cert`` also refuses peers that present none.
    """

    port: int
    cert_file: str
    key_file: str
    ca_file: str | None = None
    require_client_cert: bool = False
    handshake_timeout_s: float = 10.0


def server_ssl_context(tls: ScpTls) -> ssl.SSLContext:
    """The server-side context: TLS 1.2 or newer (BCP 195), our certificate, client checks.

    Raises ``OSError``/``ssl.SSLError`` for unreadable or mismatched files, so a broken
    configuration stops the node before it listens.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.ca_file:
        ctx.load_verify_locations(cafile=tls.ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    elif tls.require_client_cert:
        raise ValueError("require_client_cert needs ca_file")
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass(frozen=True)
class ScpSettings:
    """Listening and admission settings of the Storage SCP.

    ``allowed_calling_aets``: ``None`` or empty accepts any calling AE; otherwise others
    are rejected with "calling AE title not recognised".  ``require_called_aet``: reject
    ("called AE title not recognised") when the peer calls another AE title.
    ``max_instance_bytes``: larger datasets are refused with 0xA700 (0 = no limit).
    ``stream_to_disk``: receive C-STORE datasets into a temporary file instead of memory
    (pynetdicom's process-wide ``_config.STORE_RECV_CHUNKED_DATASET``; useful for large
    Enhanced MR objects, costs one extra file copy).
    ``allowed_networks``: addresses or CIDR networks; ``None`` or empty accepts any peer.
    ``plain_enabled``: listen without TLS on ``port``; ``tls``: also (or only) listen
    with TLS on ``tls.port``.  ``max_associations`` counts both listeners together.
    ``max_associations_per_peer`` (0: half of ``max_associations``, at least 1): connections
    one address may hold; ``max_pending_connections`` (0: 4 x ``max_associations``):
    connections still waiting for their A-ASSOCIATE-RQ; ``association_request_timeout_s``:
    how long a connection may take to deliver it (see :mod:`rtcontrast.node.receive.admission`).
    """

    ae_title: str = "RTCONTRAST"
    host: str = "0.0.0.0"
    port: int = 11112
    max_associations: int = 10
    max_pdu_size: int = 262144
    max_instance_bytes: int = 2 * 1024**3
    allowed_calling_aets: list[str] | None = None
    require_called_aet: bool = True
    network_timeout: float = 60.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    stream_to_disk: bool = False
    allowed_networks: list[str] | None = None
    plain_enabled: bool = True
    tls: ScpTls | None = None
    max_associations_per_peer: int = 0
    max_pending_connections: int = 0
    association_request_timeout_s: float = 10.0

    @classmethod
    def from_config(cls, c: NodeConfig) -> ScpSettings:
        """The SCP settings a node configuration asks for (listener, admission, limits, TLS)."""
        tls = None
        if c.tls.enabled:
            assert c.tls.cert_file is not None and c.tls.key_file is not None  # checked by the config
            tls = ScpTls(
                port=c.tls.port,
                cert_file=str(c.tls.cert_file),
                key_file=str(c.tls.key_file),
                ca_file=None if c.tls.ca_file is None else str(c.tls.ca_file),
                require_client_cert=c.tls.require_client_cert,
                handshake_timeout_s=c.tls.handshake_timeout_s,
            )
        return cls(
            ae_title=c.ae_title,
            host=c.bind_host,
            port=c.port,
            max_associations=c.limits.max_associations,
            max_pdu_size=c.limits.max_pdu_bytes,
            max_instance_bytes=c.limits.max_instance_bytes,
            allowed_calling_aets=list(c.allowed_calling_aes) or None,
            require_called_aet=c.require_called_ae,
            allowed_networks=list(c.allowed_ips) or None,
            plain_enabled=c.tls.plain_port_enabled or not c.tls.enabled,
            tls=tls,
            max_associations_per_peer=c.limits.max_associations_per_peer,
            max_pending_connections=c.limits.max_pending_connections,
            association_request_timeout_s=c.limits.association_request_timeout_s,
        )


@dataclass(frozen=True)
class StoredInstance:
    """One instance durably in the spool, as handed to ``on_stored``."""

    path: Path
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    calling_ae: str
    peer_address: str
    received_at: datetime
