#!/usr/bin/env python3
"""rtcontrast node command line.

    python node.py run [--config config/node.yaml] [--protocol config/protocol.yaml] [--port N]
    python node.py check-config [--config F] [--protocol F]
    python node.py status [--config F] [--jobs N]
    python node.py resend [--config F] [--destination D] [--job J]
    python node.py models [--config F] [--protocol F]
    python node.py audit [--config F] [--study UID | --series UID | --job N] [--json]
    python node.py release --job N [--config F] [--note TEXT] [--user NAME]
    python node.py discard --job N --note TEXT [--config F] [--user NAME]
    python node.py purge [--config F] [--protocol F] [--dry-run]

``run`` without files uses the embedded defaults (AE RTCONTRAST, port 11112, ./var, the
shipped model, folder export to ./var/export).  ``check-config`` checks the shipped
config/node.yaml and config/protocol.yaml unless told otherwise.  A thin shim: the command line
is :mod:`rtcontrast.node.cli` (installed as the ``rtcontrast`` console script); the systemd
unit and older scripts call this file.
"""

from __future__ import annotations

import sys

from rtcontrast.node.cli import main

if __name__ == "__main__":
    sys.exit(main())
