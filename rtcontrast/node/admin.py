"""Admin actions on a node's database and files, shared by the CLI (and testable without it).

Each opens its own connection: a running node sees the change within a scheduler tick.
"""

from __future__ import annotations

import logging
from pathlib import Path

from rtcontrast.core.contract import ContractError
from rtcontrast.core.inference import QMapModel
from rtcontrast.node.dispatch.outbox import Outbox
from rtcontrast.node.registry import resolve_model
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


def release_job(config: NodeConfig, job_id: int, note: str | None = None) -> str:
    """Release a held job: back to ``received`` with a ``released`` audit event.

    A running node's scheduler picks it up within a second and re-runs it with the QA
    hold overridden (the images are sent flagged as a QA warning); a stopped node does at
    its next start.  The job runs with the protocol in force then.  Raises ValueError
    when the job does not exist or is not held.
    """
    conn = db.connect(config.db_file)
    try:
        jobs = JobStore(conn)
        job = jobs.job(job_id)
        if job is None:
            raise ValueError(f"no job {job_id}")
        if job.state != JobState.HELD:
            raise ValueError(f"job {job_id} is {job.state}, not held: only held jobs are released")
        jobs.audit(job_id, "released", {"previous_reason": job.reason, **({"note": note} if note else {})})
        jobs.set_state(job_id, JobState.RECEIVED, "released by an admin (QA hold overridden)", hold_override=True)
        return job.series_uid
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


