"""Admin actions on a node's database and files, shared by the CLI (and testable without it).

Each opens its own connection: a running node sees the change within a scheduler tick.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from rtcontrast.core.contract import ContractError
from rtcontrast.core.inference import QMapModel
from rtcontrast.node.dispatch.outbox import Outbox
from rtcontrast.node.ops.holds import DiscardResult, discard_held, release_held
from rtcontrast.node.registry import resolve_model
from rtcontrast.node.store import db
from rtcontrast.node.store.jobs import JobStore
from rtcontrast.settings.node import ConfigError, NodeConfig
from rtcontrast.settings.protocol import ProtocolConfig

log = logging.getLogger(__name__)

def resend_dead_letters(config: NodeConfig, destination: str | None = None, job_id: int | None = None) -> int:
    """Put dead letters back to pending (a running node's sender picks them up); how many."""
    conn = db.connect(config.db_file)
    try:
        return Outbox(conn, config.outbox_path).retry_dead(destination=destination, job_id=job_id)
    finally:
        conn.close()


def release_job(config: NodeConfig, job_id: int, note: str | None = None, user: str | None = None,
                via: str = "cli") -> str:
    """Release a held job (:func:`rtcontrast.node.ops.holds.release_held`); its series UID.

    A running node's scheduler picks it up within a second and re-runs it with the QA
    hold overridden: the images are sent flagged with the reviewer's decision (``QA hold
    released by <user> <date>: <note>``); a stopped node does at its next start.  The job
    runs with the protocol in force then.  ``user`` None: the login name of the shell
    (``$SUDO_USER``, ``$USER``).  Raises ValueError when the job does not exist or is not held.
    """
    conn = db.connect(config.db_file)
    try:
        return release_held(JobStore(conn), job_id, user=user or _shell_user(), note=note, via=via).series_uid
    finally:
        conn.close()


def discard_job(config: NodeConfig, job_id: int, note: str | None, user: str | None = None,
                via: str = "cli") -> DiscardResult:
    """Discard a held job (:func:`rtcontrast.node.ops.holds.discard_held`): never sent, files removed.

    ``note`` is required (why).  Raises ValueError when the job does not exist or is not
    held, or the note or name is missing or bad.
    """
    conn = db.connect(config.db_file)
    try:
        return discard_held(JobStore(conn), job_id, user=user or _shell_user(), note=note, via=via,
                            jobs_root=config.var_dir / "jobs")
    finally:
        conn.close()


def _shell_user() -> str:
    """Who runs the command: the sudo caller first (``sudo -u rtcontrast ...`` runs as the service user)."""
    import getpass

    name = os.environ.get("SUDO_USER") or os.environ.get("USER") or ""
    if not name:
        try:
            name = getpass.getuser()
        except (KeyError, OSError):
            name = ""
    return name or "unknown"


_SHIPPED_NODE = Path("config/node.yaml")
_SHIPPED_PROTOCOL = Path("config/protocol.yaml")



def _load(config_path: Path | None, protocol_path: Path | None) -> tuple[NodeConfig, ProtocolConfig]:
    from rtcontrast.settings.node import load_node_config
    from rtcontrast.settings.protocol import load_protocol

    errors: list[str] = []
    config = protocol = None
    try:
        config = load_node_config(config_path)
    except ConfigError as exc:
        errors.extend(exc.errors)
    try:
        protocol = load_protocol(protocol_path)
    except ConfigError as exc:
        errors.extend(exc.errors)
    if errors:
        raise ConfigError(errors)
    assert config is not None and protocol is not None
    return config, protocol


def check_config(config_path: Path | None, protocol_path: Path | None) -> tuple[list[str], str]:
    """Validate node config, protocol and the model's contract: (errors, one-line summary).

    Each error reads ``file:line: field: message``.  ``None`` paths mean the embedded
    defaults.
    """
    from rtcontrast.settings.node import line_of, read_yaml

    try:
        config, protocol = _load(config_path, protocol_path)
    except ConfigError as exc:
        return exc.errors, ""
    try:
        model_file = resolve_model(config, protocol)
    except ContractError as exc:
        where = "(embedded defaults):1"
        if protocol_path is not None:
            _, lines = read_yaml(Path(protocol_path))
            where = f"{protocol_path}:{line_of(lines, ('model',))}"
        return [f"{where}: model: {exc}"], ""
    try:
        model = QMapModel(model_file, "cpu" if config.execution_provider == "auto" else config.execution_provider)
    except (ContractError, RuntimeError) as exc:
        where = "(embedded defaults):1"
        if config_path is not None:
            _, lines = read_yaml(Path(config_path))
            where = f"{config_path}:{line_of(lines, ('model_path',))}"
        return [f"{where}: model_path: {exc}"], ""
    summary = (
        f"OK: node {config_path or '(embedded defaults)'} (AE {config.ae_title}, port {config.port}, "
        f"var {config.var_dir}); protocol {protocol_path or '(embedded defaults)'} ({protocol.audit_version}, "
        f"{len(protocol.recipes)} recipe(s), destinations {', '.join(sorted(protocol.destinations))}); "
        f"model {model.info.name} {model.info.version} sha256 {model.sha256[:12]}"
    )
    return [], summary


