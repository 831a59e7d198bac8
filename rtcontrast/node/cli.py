"""The ``rtcontrast`` command line (also ``python node.py``): run the node and the admin commands.

Argument parsing and the exit codes live here; the commands' work lives in
:mod:`rtcontrast.node.service`, :mod:`rtcontrast.node.admin`, :mod:`rtcontrast.node.ops.status`
and :mod:`rtcontrast.node.registry`, so each is testable without a shell.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from rtcontrast import __version__
from rtcontrast.core.contract import ContractError
from rtcontrast.node.admin import (
    _SHIPPED_NODE,
    _SHIPPED_PROTOCOL,
    _load,
    check_config,
    discard_job,
    release_job,
    retry_job,
    resend_dead_letters,
)
from rtcontrast.node.dispatch.destinations import node_destinations
from rtcontrast.node.ops.status import export_dirs, read_status
from rtcontrast.node.registry import list_models, resolve_model, resolve_model_path
from rtcontrast.node.service import Node
from rtcontrast.settings.node import ConfigError, NodeConfig

log = logging.getLogger(__name__)

def _config_errors(exc: ConfigError) -> int:
    """Print every configuration error (file:line: field: message); the exit code 2."""
    for e in exc.errors:
        print(e, file=sys.stderr)
    return 2


def _admin_config(config_path: Path | None, need_db: bool = True) -> NodeConfig | int:
    """The node config for an admin command, or the exit code after printing why not.

    2: the configuration is invalid (every error printed); 1: the node has no database
    yet (it never ran with this configuration), when the command needs one.
    """
    try:
        config, _ = _load(config_path, None)
    except ConfigError as exc:
        return _config_errors(exc)
    if need_db and not config.db_file.exists():
        print(f"no database at {config.db_file}: the node has not run with this configuration yet", file=sys.stderr)
        return 1
    return config


def cmd_check_config(config_path: Path | None, protocol_path: Path | None) -> int:
    """``node.py check-config``: shipped files by default; exit 1 and every error when wrong."""
    if config_path is None and _SHIPPED_NODE.exists():
        config_path = _SHIPPED_NODE
    if protocol_path is None and _SHIPPED_PROTOCOL.exists():
        protocol_path = _SHIPPED_PROTOCOL
    errors, summary = check_config(config_path, protocol_path)
    if errors:
        for e in errors:
            print(e, file=sys.stderr)
        print(f"{len(errors)} error(s)", file=sys.stderr)
        return 1
    print(summary)
    return 0


def cmd_run(config_path: Path | None, protocol_path: Path | None, port: int | None = None) -> int:
    """``node.py run``: embedded defaults unless files are given; blocks until SIGTERM/SIGINT."""
    from rtcontrast.node.ops.logs import setup_logging

    try:
        config, protocol = _load(config_path, protocol_path)
    except ConfigError as exc:
        return _config_errors(exc)
    if port is not None:
        config.port = port
    setup_logging(config.log_format, config.log_level)
    log.info(
        "rtcontrast %s starting: node config %s, protocol %s",
        __version__, config_path or "(embedded defaults)", protocol_path or "(embedded defaults)",
    )
    try:
        node = Node(config, protocol, protocol_path=protocol_path)
    except (ContractError, RuntimeError) as exc:
        log.error("model refused: %s", exc)
        return 3
    try:
        node.run_forever()
    except OSError as exc:  # e.g. the port is taken
        log.error("cannot run: %s", exc)
        return 1
    return 0


def cmd_status(config_path: Path | None, n_jobs: int = 10) -> int:
    """``node.py status``: queues, recent jobs, dead letters, spool free space."""
    config = _admin_config(config_path)
    if isinstance(config, int):
        return config
    print(read_status(config, n_jobs).render())
    return 0


def cmd_resend(config_path: Path | None, destination: str | None, job_id: int | None) -> int:
    """``node.py resend``: dead letters back to pending (optionally one destination / job)."""
    config = _admin_config(config_path)
    if isinstance(config, int):
        return config
    n = resend_dead_letters(config, destination, job_id)
    print(f"{n} dead letter(s) put back to pending"
          + (f" for destination {destination}" if destination else "") + (f" of job {job_id}" if job_id else ""))
    return 0


def cmd_release(config_path: Path | None, job_id: int, note: str | None = None, user: str | None = None) -> int:
    """``node.py release --job N``: send a held job (re-run with the QA hold overridden)."""
    config = _admin_config(config_path)
    if isinstance(config, int):
        return config
    try:
        series = release_job(config, job_id, note, user)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"job {job_id} (series {series}) released: the running node re-runs it within seconds "
          "(or at its next start) and sends it marked as released after QA review")
    return 0


def cmd_discard(config_path: Path | None, job_id: int, note: str | None, user: str | None = None) -> int:
    """``node.py discard --job N --note WHY``: a held job is never sent; its received files and preview go."""
    config = _admin_config(config_path)
    if isinstance(config, int):
        return config
    try:
        result = discard_job(config, job_id, note, user)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"job {job_id} (series {result.job.series_uid}) discarded: never sent; {result.files} file(s) "
          f"({result.bytes / 1024**2:.1f} MiB) removed; the audit keeps the decision")
    return 0


def cmd_retry(config_path: Path | None, job_id: int, note: str | None = None) -> int:
    """``node.py retry --job N``: re-run a failed job from the spool (its cause is fixed)."""
    config = _admin_config(config_path)
    if isinstance(config, int):
        return config
    try:
        series = retry_job(config, job_id, note)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"job {job_id} (series {series}) will be re-run from the spool by the running node within seconds "
          "(or at its next start)")
    return 0


def cmd_purge(config_path: Path | None, protocol_path: Path | None, dry_run: bool) -> int:
    """``node.py purge [--dry-run]``: retention now (the node also runs it hourly)."""
    from rtcontrast.node.ops.retention import purge

    try:
        config, protocol = _load(config_path, protocol_path)
    except ConfigError as exc:
        return _config_errors(exc)
    if not config.db_file.exists():
        print(f"no database at {config.db_file}", file=sys.stderr)
        return 1
    dests = node_destinations(protocol, config.ae_title, config.export_path)
    report = purge(
        config.db_file, spool_root=config.spool_path, outbox_root=config.outbox_path,
        jobs_root=config.var_dir / "jobs", export_dirs=export_dirs(dests),
        retention_days=config.retention_days, held_retention_days=config.held_retention_days, dry_run=dry_run,
    )
    print(report.render())
    return 0


def cmd_audit(
    config_path: Path | None,
    study: str | None = None,
    series: str | None = None,
    job_id: int | None = None,
    limit: int = 20,
    as_json: bool = False,
) -> int:
    """``node.py audit``: per job, what came from where, what was made, where it went."""
    import json

    from rtcontrast.node.ops.audit import audit_trail, render_trails

    config = _admin_config(config_path)
    if isinstance(config, int):
        return config
    trails = audit_trail(config.db_file, study_uid=study, series_uid=series, job_id=job_id, limit=limit)
    if as_json:
        print(json.dumps([t.to_json() for t in trails], indent=2, sort_keys=True))
    else:
        print(render_trails(trails))
    return 0 if trails else 1


def cmd_models(config_path: Path | None, protocol_path: Path | None) -> int:
    """``node.py models``: models/*.onnx with their cards; ``*`` marks the one the node would use."""
    try:
        config, protocol = _load(config_path, protocol_path)
    except ConfigError as exc:
        return _config_errors(exc)
    default = resolve_model_path(config.model_path)
    in_use: Path | None = None
    problem = None
    try:
        in_use = resolve_model(config, protocol)
    except ContractError as exc:
        problem = str(exc)
    entries = list_models(default.parent) if default.parent.is_dir() else []
    print(f"models in {default.parent} (config model_path {config.model_path}"
          + (f"; protocol pins {protocol.model.name} sha256 {protocol.model.sha256[:12]}" if protocol.model else "")
          + ")")
    if not entries:
        print("  (none)")
    for e in entries:
        mark = "*" if in_use is not None and e.path.resolve() == in_use.resolve() else " "
        if e.error:
            print(f"{mark} {e.path.name}: unreadable: {e.error}")
            continue
        card = e.card or {}
        created = str(card.get("created", "-"))[:19]
        print(f"{mark} {e.path.name}: {e.name} {e.version} [{e.contract}] sha256 {e.sha256[:12]} created {created}")
        if e.card is None:
            print("      no model card (NAME.json)")
        elif card.get("sha256") and card["sha256"] != e.sha256:
            print(f"      WARNING: card sha256 {card['sha256'][:12]} differs from the file")
        summ = (card.get("evaluation") or {}).get("summary")
        if summ:
            met = summ.get("met", {})
            print(f"      evaluation: min cross SSIM {summ.get('min_cross_ssim', float('nan')):.3f}, "
                  f"min PSNR {summ.get('min_cross_psnr_db', float('nan')):.1f} dB, "
                  f"max tissue MAE {summ.get('max_tissue_mae_pct', float('nan')):.1f} %, "
                  f"targets met {sum(bool(v) for v in met.values())}/{len(met)}")
        real = (card.get("data") or {}).get("real")
        if real:
            print(f"      fine-tuned on {real.get('series')} real series of {real.get('patients')} patient(s)")
        if card.get("report"):
            print(f"      report: {default.parent / card['report']}")
    if in_use is not None and in_use.parent.resolve() != default.parent.resolve():
        print(f"* in use: {in_use} (outside {default.parent})")
    if problem:
        print(f"ERROR: {problem}", file=sys.stderr)
        return 1
    return 0


def _quiet_on_closed_pipe(fn: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """``node.py audit ... | head``: when the reader goes away, end quietly (exit 141 as a
    shell tool killed by SIGPIPE would) instead of printing a BrokenPipeError traceback."""
    @functools.wraps(fn)
    def wrapper(argv: list[str] | None = None) -> int:
        try:
            rc = fn(argv)
            sys.stdout.flush()  # a closed pipe shows here for output still in the buffer
            return rc
        except BrokenPipeError:
            # Python flushes stdout again at exit: point it at /dev/null so that fails quietly too.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 141
    return wrapper


@_quiet_on_closed_pipe
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rtcontrast", description="rtcontrast DICOM node")
    parser.add_argument("--version", action="version", version=f"rtcontrast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the node until SIGTERM/SIGINT")
    run.add_argument("--config", type=Path, help="node config (default: embedded defaults)")
    run.add_argument("--protocol", type=Path, help="protocol (default: embedded defaults)")
    run.add_argument("--port", type=int, help="DICOM port, overrides the config")

    check = sub.add_parser("check-config", help="validate node config, protocol and model")
    check.add_argument("--config", type=Path, help="node config (default: config/node.yaml if present)")
    check.add_argument("--protocol", type=Path, help="protocol (default: config/protocol.yaml if present)")

    status = sub.add_parser("status", help="queues, recent jobs, dead letters, spool free space")
    status.add_argument("--config", type=Path, help="node config (default: embedded defaults)")
    status.add_argument("--jobs", type=int, default=10, help="how many recent jobs to list")

    resend = sub.add_parser("resend", help="put dead letters back to pending")
    resend.add_argument("--config", type=Path, help="node config (default: embedded defaults)")
    resend.add_argument("--destination", help="only this destination")
    resend.add_argument("--job", type=int, help="only this job id")

    audit = sub.add_parser("audit", help="what came from where, what was made, where it went (per job)")
    audit.add_argument("--config", type=Path, help="node config (default: embedded defaults)")
    audit.add_argument("--study", help="only jobs of this StudyInstanceUID")
    audit.add_argument("--series", help="only jobs of this (received) SeriesInstanceUID")
    audit.add_argument("--job", type=int, help="only this job id")
    audit.add_argument("--limit", type=int, default=20, help="at most this many jobs (most recent)")
    audit.add_argument("--json", action="store_true", help="machine-readable output")

    retry = sub.add_parser("retry", help="re-run a failed job from the spool (after its cause was fixed)")
    retry.add_argument("--config", type=Path, help="node config (default: embedded defaults)")
    retry.add_argument("--job", type=int, required=True, help="the failed job's id (node.py status)")
    retry.add_argument("--note", help="why (recorded in the audit trail; no patient data)")
    release = sub.add_parser("release", help="send a job held by QA (re-run with the hold overridden)")
    release.add_argument("--config", type=Path, help="node config (default: embedded defaults)")
    release.add_argument("--job", type=int, required=True, help="the held job's id (node.py status)")
    release.add_argument("--note", help="why (recorded in the audit trail and the DICOM; no patient data)")
    release.add_argument("--user", help="the reviewer (default: the login name, $SUDO_USER under sudo)")

    discard = sub.add_parser("discard", help="discard a job held by QA: never sent, its files removed")
    discard.add_argument("--config", type=Path, help="node config (default: embedded defaults)")
    discard.add_argument("--job", type=int, required=True, help="the held job's id (node.py status)")
    discard.add_argument("--note", required=True, help="why (recorded in the audit trail; no patient data)")
    discard.add_argument("--user", help="the reviewer (default: the login name, $SUDO_USER under sudo)")

    purge = sub.add_parser("purge", help="remove spool/export/job files older than retention_days; "
                                         "discard holds older than held_retention_days")
    purge.add_argument("--config", type=Path, help="node config (default: embedded defaults)")
    purge.add_argument("--protocol", type=Path, help="protocol (its folder destinations are purged too)")
    purge.add_argument("--dry-run", action="store_true", help="only say what would be removed")

    models = sub.add_parser("models", help="list models/*.onnx with their cards; * marks the one in use")
    models.add_argument("--config", type=Path, help="node config (default: embedded defaults)")
    models.add_argument("--protocol", type=Path, help="protocol, for a model pin (default: config/protocol.yaml if present)")

    a = parser.parse_args(argv)
    if a.command == "run":
        return cmd_run(a.config, a.protocol, a.port)
    if a.command == "check-config":
        return cmd_check_config(a.config, a.protocol)
    if a.command == "models":
        proto = a.protocol or (Path("config/protocol.yaml") if Path("config/protocol.yaml").exists() else None)
        return cmd_models(a.config, proto)
    if a.command == "status":
        return cmd_status(a.config, a.jobs)
    if a.command == "audit":
        return cmd_audit(a.config, a.study, a.series, a.job, a.limit, a.json)
    if a.command == "release":
        return cmd_release(a.config, a.job, a.note, a.user)
    if a.command == "discard":
        return cmd_discard(a.config, a.job, a.note, a.user)
    if a.command == "retry":
        return cmd_retry(a.config, a.job, a.note)
    if a.command == "purge":
        return cmd_purge(a.config, a.protocol, a.dry_run)
    return cmd_resend(a.config, a.destination, a.job)


if __name__ == "__main__":
    sys.exit(main())
