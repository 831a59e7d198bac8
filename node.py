#!/usr/bin/env python3
"""rtcontrast node command line.

    python node.py run [--config config/node.yaml] [--protocol config/protocol.yaml] [--port N]
    python node.py check-config [--config F] [--protocol F]
    python node.py status [--config F] [--jobs N]
    python node.py resend [--config F] [--destination D] [--job J]

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

    a = parser.parse_args(argv)
    if a.command == "run":
        return node.cmd_run(a.config, a.protocol, a.port)
    if a.command == "check-config":
        return node.cmd_check_config(a.config, a.protocol)
    if a.command == "status":
        return node.cmd_status(a.config, a.jobs)
    return node.cmd_resend(a.config, a.destination, a.job)


if __name__ == "__main__":
    sys.exit(main())
