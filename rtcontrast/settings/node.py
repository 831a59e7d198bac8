"""Node configuration (config/node.yaml): pydantic models, embedded defaults, precise errors.

Why: the node must run with no configuration file at all (every field has a default equal
to the shipped, documented config/node.yaml), and a wrong file must be explained in one
go: EVERY error, each with the file name, the line in the YAML, the field path and what
was expected, e.g. ``config/node.yaml:7: limits.max_associations: Input should be greater
than or equal to 1``.  Unknown keys are errors (a typo must not silently fall back to a
default).

The YAML machinery (:func:`load_yaml_model`) is shared with :mod:`rtcontrast.settings.protocol`.
Relative paths are relative to the node's working directory.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rtcontrast.settings.diagnose import suggest_key, yaml_error

DEFAULT_NODE_CONFIG = Path("config/node.yaml")

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file is wrong; ``errors`` holds one ``file:line: path: message`` each."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = list(errors)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.errors))


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, values validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# -- YAML with line numbers ---------------------------------------------------------
def format_loc(loc: Loc) -> str:
    """``('recipes', 2, 'te_ms')`` -> ``recipes[2].te_ms``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int], dupes: list[tuple[Loc, int]]) -> None:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value)
            sub = loc + (name,)
            if name in seen:
                dupes.append((sub, key.start_mark.line + 1))
            seen.add(name)
            lines[sub] = key.start_mark.line + 1
            _walk(value, sub, lines, dupes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, loc + (i,), lines, dupes)


def line_of(lines: dict[Loc, int], loc: Loc) -> int:
    """The line of ``loc``, or of its nearest ancestor present in the file (missing keys)."""
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return lines[loc[:n]]
    return 1


def read_yaml(path: Path) -> tuple[Any, dict[Loc, int]]:
    """Parse ``path``: the data and a map from field path to 1-based line number.

    Syntax errors and duplicate keys (which PyYAML would silently resolve to the last
    one) raise :class:`ConfigError`.
    """
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{name}: cannot read: {exc.strerror or exc}"]) from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([yaml_error(name, exc)]) from exc
    lines: dict[Loc, int] = {}
    dupes: list[tuple[Loc, int]] = []
    if node is not None:
        _walk(node, (), lines, dupes)
    if dupes:
        raise ConfigError([f"{name}:{ln}: {format_loc(loc)}: duplicate key" for loc, ln in dupes])
    return ({} if data is None else data), lines


def load_yaml_model(
    path: Path | str,
    model: type[M],
    extra_checks: Callable[[Any], list[tuple[Loc, str]]] | None = None,
    context: dict[str, Any] | None = None,
    allow_empty: bool = True,
) -> M:
    """Load ``path`` into ``model``; on any problem raise ConfigError listing all of them.

    ``extra_checks(raw_data)`` returns cross-field problems (unknown references,
    duplicates) as ``(loc, message)``; it runs even when pydantic found errors, so a
    single run reports everything.  ``context`` is passed to pydantic validators.
    ``allow_empty`` False: an empty file (or one that is only ``{}``/comments) is an
    error instead of "every default" - a truncated file must not pass as a valid one.
    """
    path = Path(path)
    data, lines = read_yaml(path)
    name = str(path)
    problems: list[tuple[Loc, str]] = []
    if not isinstance(data, dict):
        raise ConfigError([f"{name}:1: (top level): expected a mapping of settings, got {type(data).__name__}"])
    if not data and not allow_empty:
        raise ConfigError([f"{name}:1: (top level): the file is empty (truncated?): it must state its settings; "
                           "the embedded defaults apply only when no file is given"])
    result: M | None = None
    try:
        result = model.model_validate(data, context=context)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            loc = tuple(p for p in err["loc"] if isinstance(p, (str, int)))
            msg = err["msg"]
            if err["type"] == "missing":
                msg = "Field required"
            elif err["type"] == "extra_forbidden":
                msg = "unknown key" + suggest_key(model, loc)
            problems.append((loc, msg))
    if extra_checks is not None:
        problems.extend(extra_checks(data))
    if problems:
        seen: set[str] = set()
        errors: list[str] = []
        for loc, msg in sorted(problems, key=lambda p: line_of(lines, p[0])):
            text = f"{name}:{line_of(lines, loc)}: {format_loc(loc)}: {msg}"
            if text not in seen:
                seen.add(text)
                errors.append(text)
        raise ConfigError(errors)
    assert result is not None
    return result


# -- validators shared with protocol.py -------------------------------------------
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash


def check_ae_title(value: str) -> str:
    """An AE title: 1-16 printable ASCII characters, no backslash, not only spaces."""
    if not _AE_RE.match(value) or not value.strip():
        raise ValueError("an AE title is 1 to 16 printable ASCII characters, without backslash")
    return value.strip()


# -- the node config ----------------------------------------------------------------
class Limits(StrictModel):
    """Admission limits of the receiving side."""

    max_associations: int = Field(10, ge=1, le=1000, description="simultaneous associations accepted")
    max_pdu_bytes: int = Field(262144, ge=0, description="maximum PDU size offered (0 = no limit)")
    max_instance_bytes: int = Field(2 * 1024**3, ge=0, description="larger instances refused 0xA700 (0 = no limit)")
    min_free_disk_bytes: int = Field(1024**3, ge=0, description="below this free space, C-STORE is refused 0xA700")
    max_associations_per_peer: int = Field(
        0, ge=0, le=1000, description="connections one address may hold (0 = half of max_associations, at least 1)")
    max_pending_connections: int = Field(
        0, ge=0, le=10000, description="connections waiting for their association request (0 = 4 x max_associations)")
    association_request_timeout_s: float = Field(
        10.0, gt=0, le=300, description="a connection must deliver its A-ASSOCIATE-RQ within this time")


def check_tls_files(cert: Path | str | None, key: Path | str | None, ca: Path | str | None) -> list[str]:
    """Load the PEM files as the node will (certificate with its key, CA bundle): problems found."""
    import ssl

    problems: list[str] = []
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if cert is not None:
        try:
            ctx.load_cert_chain(str(cert), None if key is None else str(key))
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            problems.append(f"cert_file/key_file unusable (not PEM, encrypted, or the key does not match): {exc}")
    if ca is not None:
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (OSError, ValueError) as exc:
            problems.append(f"ca_file unusable (not a PEM CA bundle): {exc}")
    return problems


class Tls(StrictModel):
    """DICOM TLS listener (PS3.15 Annex B) beside, or instead of, the plain port.

    Why a separate port: a peer chooses TLS before the first byte, so one port cannot
    serve both; 2762 is the port IANA registered for DICOM over TLS.
    """

    enabled: bool = False
    port: int = Field(2762, ge=1, le=65535, description="the TLS port")
    plain_port_enabled: bool = Field(True, description="false: no plain (unencrypted) listener on `port`")
    cert_file: Path | None = Field(None, description="this node's certificate (PEM, chain allowed)")
    key_file: Path | None = Field(None, description="its private key (PEM, unencrypted)")
    ca_file: Path | None = Field(None, description="CA bundle that signs accepted client certificates")
    require_client_cert: bool = Field(False, description="refuse peers without a certificate signed by ca_file")
    handshake_timeout_s: float = Field(10.0, gt=0, description="a peer silent this long in the handshake is dropped")

    @model_validator(mode="after")
    def _complete(self) -> Tls:
        problems: list[str] = []
        if self.enabled:
            for name in ("cert_file", "key_file"):
                value = getattr(self, name)
                if value is None:
                    problems.append(f"enabled: true needs {name}")
                elif not Path(value).is_file():
                    problems.append(f"{name} {str(value)!r} is not a readable file")
            if self.ca_file is not None and not Path(self.ca_file).is_file():
                problems.append(f"ca_file {str(self.ca_file)!r} is not a readable file")
            if self.require_client_cert and self.ca_file is None:
                problems.append("require_client_cert needs ca_file (the CA that signs client certificates)")
            if not problems:
                problems.extend(check_tls_files(self.cert_file, self.key_file, self.ca_file))
        elif not self.plain_port_enabled:
            problems.append("plain_port_enabled is false and TLS is disabled: the node would not listen at all")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class Metrics(StrictModel):
    """Prometheus-style metrics endpoint (loopback by default)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(9110, ge=1, le=65535)


def is_loopback(host: str) -> bool:
    """True for a loopback address (127.0.0.0/8, ::1) or ``localhost``: reachable from this machine only."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Review(StrictModel):
    """The review page for held series (:mod:`rtcontrast.node.review`), served by the node.

    Why these rules: the page shows patient images and releases series to the TPS.  On a
    loopback address only users of this machine reach it (an SSH tunnel for the physicist);
    anywhere else it must be HTTPS (``cert_file`` + ``key_file``) with logins (``users_file``,
    bcrypt hashes), or the node refuses the configuration.
    """

    enabled: bool = False
    host: str = Field("127.0.0.1", min_length=1, description="listen address; beyond loopback: TLS + users_file")
    port: int = Field(9120, ge=0, le=65535, description="0: any free port (tests)")
    cert_file: Path | None = Field(None, description="HTTPS certificate (PEM, chain allowed)")
    key_file: Path | None = Field(None, description="its private key (PEM, unencrypted)")
    users_file: Path | None = Field(None, description="reviewers: 'name: bcrypt-hash' lines; null: no login (loopback only)")
    session_hours: float = Field(8.0, gt=0, le=24 * 7, description="a login lasts this long")
    recent_jobs: int = Field(50, ge=1, le=1000, description="jobs listed besides the held ones")

    @model_validator(mode="after")
    def _safe(self) -> Review:
        problems: list[str] = []
        if (self.cert_file is None) != (self.key_file is None):
            problems.append("cert_file and key_file go together (HTTPS needs both)")
        elif self.cert_file is not None:
            for name in ("cert_file", "key_file"):
                if not Path(getattr(self, name)).is_file():
                    problems.append(f"{name} {str(getattr(self, name))!r} is not a readable file")
            if not problems:
                problems.extend(check_tls_files(self.cert_file, self.key_file, None))
        if self.users_file is not None and not Path(self.users_file).is_file():
            problems.append(f"users_file {str(self.users_file)!r} is not a readable file")
        if self.enabled and not is_loopback(self.host) and (self.cert_file is None or self.users_file is None):
            problems.append(f"host {self.host!r} is not a loopback address: the review page needs cert_file, "
                            "key_file (HTTPS) and users_file (logins) there")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def tls(self) -> bool:
        """Served over HTTPS."""
        return self.cert_file is not None


class Identity(StrictModel):
    """This node as equipment in the derived objects (General Equipment)."""

    manufacturer: str = Field("rtcontrast", min_length=1, max_length=64)
    model_name: str = Field("rtcontrast node", min_length=1, max_length=64)
    station_name: str = Field("RTCONTRAST", min_length=1, max_length=16)
    device_serial_number: str = Field("RTC-0001", min_length=1, max_length=64)
    institution_name: str | None = Field(None, max_length=64, description="None keeps the source's")


class Delivery(StrictModel):
    """Outbox retry policy (see rtcontrast.node.dispatch.outbox.RetryPolicy)."""

    max_attempts: int = Field(10, ge=1)
    base_delay_s: float = Field(10.0, ge=0)
    max_delay_s: float = Field(900.0, gt=0)
    poll_interval_s: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _order(self) -> Delivery:
        if self.max_delay_s < self.base_delay_s:
            raise ValueError("max_delay_s must be >= base_delay_s")
        return self


_UID_ROOT_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.?$")


class NodeConfig(StrictModel):
    """Everything about this node except what to produce (that is the protocol)."""

    ae_title: str = "RTCONTRAST"
    bind_host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    require_called_ae: bool = True
    var_dir: Path = Path("./var")
    spool_dir: Path | None = Field(None, description="default <var_dir>/spool")
    db_path: Path | None = Field(None, description="default <var_dir>/rtcontrast.db")
    outbox_dir: Path | None = Field(None, description="default <var_dir>/outbox")
    export_dir: Path | None = Field(None, description="default <var_dir>/export")
    model_path: Path = Path("models/qmap-se.onnx")
    execution_provider: Literal["auto", "cpu", "cuda"] = "auto"
    series_idle_timeout_s: float = Field(30.0, gt=0)
    release_grace_s: float = Field(5.0, ge=0)
    small_series_max_instances: int = Field(
        64, ge=0, le=100000,
        description="a second worker runs only series up to this many instances, so a huge series cannot "
                    "starve the others (0 = one worker)")
    receive_processes: int = Field(
        1, ge=1, le=32,
        description="processes that accept associations from the one listening socket: the main one plus "
                    "receive_processes - 1 receivers, so concurrent senders use several cores; limits apply per "
                    "process")
    limits: Limits = Field(default_factory=Limits)
    allowed_calling_aes: list[str] = Field(default_factory=list, description="empty: any")
    allowed_ips: list[str] = Field(default_factory=list, description="addresses or CIDR networks; empty: any")
    tls: Tls = Field(default_factory=Tls)
    log_format: Literal["plain", "json"] = "plain"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    metrics: Metrics = Field(default_factory=Metrics)
    retention_days: float = Field(30.0, gt=0)
    held_retention_days: float | None = Field(
        30.0, gt=0, description="held jobs nobody reviewed are discarded after this many days (null: never)")
    review: Review = Field(default_factory=Review)
    uid_root: str | None = None
    identity: Identity = Field(default_factory=Identity)
    delivery: Delivery = Field(default_factory=Delivery)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return check_ae_title(v)

    @field_validator("allowed_calling_aes")
    @classmethod
    def _aes(cls, v: list[str]) -> list[str]:
        return [check_ae_title(a) for a in v]

    @field_validator("allowed_ips")
    @classmethod
    def _ips(cls, v: list[str]) -> list[str]:
        for a in v:
            try:
                ipaddress.ip_network(a, strict=False)
            except ValueError as exc:
                raise ValueError(f"{a!r} is not an IP address or CIDR network") from exc
        return v

    @model_validator(mode="after")
    def _ports(self) -> NodeConfig:
        if self.tls.enabled and self.tls.plain_port_enabled and self.tls.port == self.port:
            raise ValueError(f"tls.port and port are both {self.port}: TLS needs its own port")
        return self

    @field_validator("uid_root")
    @classmethod
    def _uid_root(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if not _UID_ROOT_RE.match(v):
            raise ValueError("a UID root is dot-separated numbers without leading zeros, e.g. '1.2.826.0.1.3680043.10.1234.'")
        v = v if v.endswith(".") else v + "."
        if len(v) > 54:
            raise ValueError("a UID root must be at most 54 characters (64 with the generated suffix)")
        return v

    # resolved paths (defaults under var_dir) --------------------------------------
    @property
    def spool_path(self) -> Path:
        return self.spool_dir or self.var_dir / "spool"

    @property
    def db_file(self) -> Path:
        return self.db_path or self.var_dir / "rtcontrast.db"

    @property
    def outbox_path(self) -> Path:
        return self.outbox_dir or self.var_dir / "outbox"

    @property
    def export_path(self) -> Path:
        return self.export_dir or self.var_dir / "export"


def load_node_config(path: Path | str | None = None) -> NodeConfig:
    """The node config from ``path``, or the embedded defaults when ``path`` is None.

    Raises :class:`ConfigError` (every problem, with line numbers) for a wrong file and
    for a path that does not exist: a path that was asked for and is missing is an error,
    not a silent fallback.
    """
    if path is None:
        return NodeConfig()
    return load_yaml_model(path, NodeConfig, node_cross_checks)


def _port(value: Any, default: int) -> int | None:
    if value is None:
        return default
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def node_cross_checks(raw: Any) -> list[tuple[Loc, str]]:
    """Settings that are each valid but cannot work together (checked on the raw file,
    so they are reported with every other error): two listeners on one port."""
    if not isinstance(raw, dict):
        return []
    out: list[tuple[Loc, str]] = []
    port = _port(raw.get("port"), 11112)
    metrics = raw.get("metrics") if isinstance(raw.get("metrics"), dict) else {}
    tls = raw.get("tls") if isinstance(raw.get("tls"), dict) else {}
    mport = _port(metrics.get("port"), 9110)
    if metrics.get("enabled", True) is not False and mport is not None:
        if mport == port:
            out.append((("metrics", "port"), f"metrics.port and port are both {port}: the metrics endpoint "
                                             "and the DICOM listener need different ports"))
        if tls.get("enabled") is True and mport == _port(tls.get("port"), 2762):
            out.append((("metrics", "port"), f"metrics.port and tls.port are both {mport}: "
                                             "they need different ports"))
    return out
