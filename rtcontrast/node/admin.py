"""Admin actions on a node's database and files, shared by the CLI (and testable without it).

Each opens its own connection: a running node sees the change within a scheduler tick.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

from rtcontrast.core.contract import ContractError
from rtcontrast.core.inference import QMapModel
from rtcontrast.node.dispatch.outbox import Outbox
from rtcontrast.node.ops.holds import DiscardResult, discard_held, release_held
from rtcontrast.node.registry import resolve_model, resolve_model_path
from rtcontrast.node.store import db
from rtcontrast.node.store.jobs import JobRole, JobState, JobStore
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


def retry_job(config: NodeConfig, job_id: int, note: str | None = None) -> str:
    """Re-run a failed job from the spool (``node.py retry --job N``): back to ``received``.

    For a job that failed for a reason that is gone now (disk full, a missing file put
    back, a bug fixed by an upgrade).  Only ``failed`` jobs: a held job is released, an
    ineligible one would be ineligible again.  The job keeps its membership snapshot; the
    running node re-runs it within a second with the protocol in force then.  A job that
    was superseded by a newer job of its series is refused (the newer one covers it).
    Raises ValueError otherwise.
    """
    conn = db.connect(config.db_file)
    try:
        jobs = JobStore(conn)
        job = jobs.job(job_id)
        if job is None:
            raise ValueError(f"no job {job_id}")
        if job.state != JobState.FAILED:
            raise ValueError(f"job {job_id} is {job.state}, not failed: only failed jobs are retried "
                             "(held jobs: release; ineligible ones would be ineligible again)")
        newer = [j.id for j in jobs.jobs_for_series(job.study_uid, job.series_uid) if j.id > job_id]
        if newer:
            raise ValueError(f"job {job_id} was superseded by job {max(newer)} (same series): retry that one")
        missing = [m.sop_instance_uid for m in jobs.job_instances(job_id) if not m.path.is_file()]
        if missing:
            raise ValueError(f"job {job_id}: {len(missing)} spooled file(s) are gone (retention or deleted), "
                             f"e.g. instance {missing[0]}: the scanner must send the series again")
        jobs.audit(job_id, "retried", {"previous_reason": job.reason, **({"note": note} if note else {})})
        jobs.set_state(job_id, JobState.RECEIVED, "retried by an admin", retry_count=0, retry_at=None,
                       role=JobRole.TARGET, fusion_target=None)
        return job.series_uid
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



def _load_both(config_path: Path | None, protocol_path: Path | None,
               ) -> tuple[NodeConfig | None, ProtocolConfig | None, list[str]]:
    """Both files, each loaded even when the other is wrong, so every error is reported at once."""
    from rtcontrast.settings.node import load_node_config
    from rtcontrast.settings.protocol import load_protocol

    errors: list[str] = []
    config: NodeConfig | None = None
    protocol: ProtocolConfig | None = None
    try:
        config = load_node_config(config_path)
    except ConfigError as exc:
        errors.extend(exc.errors)
    try:
        protocol = load_protocol(protocol_path)
    except ConfigError as exc:
        errors.extend(exc.errors)
    return config, protocol, errors


def _load(config_path: Path | None, protocol_path: Path | None) -> tuple[NodeConfig, ProtocolConfig]:
    config, protocol, errors = _load_both(config_path, protocol_path)
    if errors:
        raise ConfigError(errors)
    assert config is not None and protocol is not None
    return config, protocol


def _where(path: Path | None, loc: tuple[str | int, ...]) -> str:
    """``file:line`` of ``loc`` in ``path`` (``(embedded defaults):1`` without a file)."""
    from rtcontrast.settings.node import line_of, read_yaml

    if path is None:
        return "(embedded defaults):1"
    try:
        _, lines = read_yaml(Path(path))
    except ConfigError:
        return f"{path}:1"
    return f"{path}:{line_of(lines, loc)}"


def _raw_setting(path: Path | None, key: str, default: object) -> object:
    """One top-level value of a node config that did not validate (for the checks that still can run)."""
    from rtcontrast.settings.node import read_yaml

    if path is None:
        return default
    try:
        data, _ = read_yaml(Path(path))
    except ConfigError:
        return None
    return data.get(key, default) if isinstance(data, dict) else None


def _writable_dir_problem(var_dir: Path) -> str | None:
    """Why the node could not create or write ``var_dir`` (None when it can)."""
    probe = var_dir
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        return f"var_dir {str(var_dir)!r}: {str(probe)!r} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == var_dir else f"cannot be created ({str(probe)!r} is not writable)"
        return f"var_dir {str(var_dir)!r} {what} by this user (uid {os.getuid()}); the node keeps its spool and database there"
    return None


_LOC_RE = re.compile(r"^(.*?):(\d+): ")


def _error_order(config_path: Path | None) -> Callable[[str], tuple[int, int]]:
    """Sort key: the node config's errors first, then the protocol's, each by line."""
    def key(error: str) -> tuple[int, int]:
        m = _LOC_RE.match(error)
        if m is None:
            return (2, 0)
        return (0 if config_path is not None and m.group(1) == str(config_path) else 1, int(m.group(2)))
    return key


def check_config(config_path: Path | None, protocol_path: Path | None) -> tuple[list[str], str]:
    """Validate node config, protocol, var_dir and the model: (every error, one-line summary).

    Each error reads ``file:line: field: message``.  ``None`` paths mean the embedded
    defaults.  Every check that can run does, so one run lists every problem: a bad
    ``model_path`` or an unwritable ``var_dir`` is reported beside the YAML errors.
    """
    config, protocol, errors = _load_both(config_path, protocol_path)
    var_dir = config.var_dir if config is not None else _raw_setting(config_path, "var_dir", "./var")
    if isinstance(var_dir, (str, Path)):
        problem = _writable_dir_problem(Path(var_dir))
        if problem:
            errors.append(f"{_where(config_path, ('var_dir',))}: var_dir: {problem}")
    model = None
    if config is not None and protocol is not None:
        try:
            model_file = resolve_model(config, protocol)
        except ContractError as exc:
            errors.append(f"{_where(protocol_path, ('model',))}: model: {exc}")
        else:
            provider = "cpu" if config.execution_provider == "auto" else config.execution_provider
            try:
                model = QMapModel(model_file, provider)
            except (ContractError, RuntimeError, OSError) as exc:
                errors.append(f"{_where(config_path, ('model_path',))}: model_path: {exc}")
    else:  # the node config or the protocol is wrong: still say whether the model file is usable
        raw = config.model_path if config is not None else _raw_setting(config_path, "model_path",
                                                                        "models/qmap-se.onnx")
        if isinstance(raw, (str, Path)):
            try:
                QMapModel(resolve_model_path(Path(raw)), "cpu")
            except (ContractError, RuntimeError, OSError) as exc:
                errors.append(f"{_where(config_path, ('model_path',))}: model_path: {exc}")
    if errors:
        return sorted(errors, key=_error_order(config_path)), ""
    assert config is not None and protocol is not None and model is not None
    summary = (
        f"OK: node {config_path or '(embedded defaults)'} (AE {config.ae_title}, port {config.port}, "
        f"var {config.var_dir}); protocol {protocol_path or '(embedded defaults)'} ({protocol.audit_version}, "
        f"{len(protocol.recipes)} recipe(s), destinations {', '.join(sorted(protocol.destinations))}); "
        f"model {model.info.name} {model.info.version} sha256 {model.sha256[:12]}"
    )
    return [], summary
