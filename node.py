#!/usr/bin/env python3
"""rtcontrast node command line.

    python node.py run [--config config/node.yaml] [--protocol config/protocol.yaml] [--port N]
    python node.py check-config [--config F] [--protocol F]
    python node.py status [--config F] [--jobs N]
    python node.py resend [--config F] [--destination D] [--job J]
    python node.py models [--config F] [--protocol F]
    python node.py audit [--config F] [--study UID | --series UID | --job N] [--json]
    python node.py release --job N [--config F] [--note TEXT]
    python node.py purge [--config F] [--protocol F] [--dry-run]

``run`` without files uses the embedded defaults (AE RTCONTRAST, port 11112, ./var, the
shipped model, folder export to ./var/export).  ``check-config`` checks the shipped
config/node.yaml and config/protocol.yaml unless told otherwise.  The commands live in
rtcontrast.node; this file is argument parsing only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rtcontrast import node


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="node.py", description="rtcontrast DICOM node")
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

    release = sub.add_parser("release", help="send a job held by QA (re-run with the hold overridden)")
    release.add_argument("--config", type=Path, help="node config (default: embedded defaults)")
    release.add_argument("--job", type=int, required=True, help="the held job's id (node.py status)")
    release.add_argument("--note", help="why (recorded in the audit trail; no patient data)")

    purge = sub.add_parser("purge", help="remove spool/export/job files older than retention_days")
    purge.add_argument("--config", type=Path, help="node config (default: embedded defaults)")
    purge.add_argument("--protocol", type=Path, help="protocol (its folder destinations are purged too)")
    purge.add_argument("--dry-run", action="store_true", help="only say what would be removed")

    models = sub.add_parser("models", help="list models/*.onnx with their cards; * marks the one in use")
    models.add_argument("--config", type=Path, help="node config (default: embedded defaults)")
    models.add_argument("--protocol", type=Path, help="protocol, for a model pin (default: config/protocol.yaml if present)")

    a = parser.parse_args(argv)
    if a.command == "run":
        return node.cmd_run(a.config, a.protocol, a.port)
    if a.command == "check-config":
        return node.cmd_check_config(a.config, a.protocol)
    if a.command == "models":
        proto = a.protocol or (Path("config/protocol.yaml") if Path("config/protocol.yaml").exists() else None)
        return node.cmd_models(a.config, proto)
    if a.command == "status":
        return node.cmd_status(a.config, a.jobs)
    if a.command == "audit":
        return node.cmd_audit(a.config, a.study, a.series, a.job, a.limit, a.json)
    if a.command == "release":
        return node.cmd_release(a.config, a.job, a.note)
    if a.command == "purge":
        return node.cmd_purge(a.config, a.protocol, a.dry_run)
    return node.cmd_resend(a.config, a.destination, a.job)


if __name__ == "__main__":
    sys.exit(main())
