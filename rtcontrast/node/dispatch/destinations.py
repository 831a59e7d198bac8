"""Where derived objects go: a C-STORE peer or a folder, built from the protocol.

Kept apart from the outbox so that the settings schema (and the researchers' importer,
which reads it) never pulls in the DICOM network stack: the protocol describes
destinations as data, this module turns them into what the sender uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

from rtcontrast.settings.protocol import ProtocolConfig


@dataclass(frozen=True)
class DicomDestination:
    """A C-STORE SCP (the TPS, a PACS).

    TLS fields are optional; when ``tls`` is true the association runs over TLS 1.2+: the
    peer's certificate must chain to ``tls_ca_file`` (the system CAs when None) and name
    ``tls_server_hostname`` (default ``host``); ``tls_cert_file``/``tls_key_file`` are
    our client certificate, for peers that require one.  A failed handshake is a failed
    attempt (retried, then dead-lettered) whose error says why.

    ``max_associations``: how many associations the sender may hold open to this peer at
    once (a batch is split into that many contiguous parts, sent concurrently); 1 for a
    peer that accepts only one association at a time.
    """

    name: str
    host: str
    port: int
    ae_title: str
    calling_ae: str = "RTCONTRAST"
    connect_timeout_s: float = 10.0
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    max_pdu: int = 16382
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_server_hostname: str | None = None
    max_associations: int = 3


@dataclass(frozen=True)
class FolderDestination:
    """A directory (an import folder, a share): ``<path>/<Study>/<Series>/<SOP>.dcm``."""

    name: str
    path: Path


Destination = Union[DicomDestination, FolderDestination]


def build_destinations(
    protocol: ProtocolConfig, default_calling_ae: str
) -> dict[str, DicomDestination | FolderDestination]:
    """The outbox destinations the protocol names (calling AE defaults to the node's)."""
    out: dict[str, DicomDestination | FolderDestination] = {}
    for name, d in protocol.destinations.items():
        if d.folder is not None:
            out[name] = FolderDestination(name=name, path=Path(d.folder.path))
        else:
            c = d.dicom
            assert c is not None
            out[name] = DicomDestination(
                name=name, host=c.host, port=c.port, ae_title=c.ae_title,
                calling_ae=c.calling_ae or default_calling_ae,
                connect_timeout_s=c.connect_timeout_s, acse_timeout_s=c.acse_timeout_s,
                dimse_timeout_s=c.dimse_timeout_s, network_timeout_s=c.network_timeout_s,
                max_pdu=c.max_pdu, tls=c.tls.enabled, tls_ca_file=c.tls.ca_file,
                tls_cert_file=c.tls.cert_file, tls_key_file=c.tls.key_file,
                tls_server_hostname=c.tls.server_hostname, max_associations=c.max_associations,
            )
    return out


#: The protocol's default folder destination; it follows the node's ``export_dir``.
DEFAULT_EXPORT = Path("var/export")


def node_destinations(protocol: ProtocolConfig, calling_ae: str, export_path: Path) -> dict[str, Destination]:
    """The destinations as the node uses them: the default export folder follows ``export_path``."""
    out: dict[str, Destination] = {}
    for name, dest in build_destinations(protocol, calling_ae).items():
        if isinstance(dest, FolderDestination) and Path(dest.path) == DEFAULT_EXPORT:
            dest = FolderDestination(name=name, path=export_path)
        out[name] = dest
    return out
