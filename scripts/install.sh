#!/usr/bin/env bash
# Install (or upgrade) rtcontrast as a systemd service.  Run as root from a checkout or an
# unpacked release:   sudo bash scripts/install.sh     (or: sudo make install)
#
# What it does (idempotent; see docs/admin.md):
#   1. creates the system user `rtcontrast` (no login, no home):
#        useradd --system --user-group --no-create-home --home-dir /var/lib/rtcontrast \
#                --shell /usr/sbin/nologin rtcontrast
#   2. installs this release into /opt/rtcontrast/releases/<version>/ (app/ = code, models,
#      shipped configs, LICENSE, NOTICE and THIRD-PARTY-LICENCES.txt; venv/ = its own Python
#      environment, checked to hold no GPL code) and points the symlink
#      /opt/rtcontrast/current at it (the switch is one atomic rename);
#   3. copies config/node.yaml and config/protocol.yaml to /etc/rtcontrast/ ONLY where no file
#      exists yet (your edited configuration is never overwritten; the shipped versions are
#      always left beside them as *.yaml.dist for comparison), with var_dir set to
#      /var/lib/rtcontrast and model_path to the installed model;
#   4. installs systemd/rtcontrast.service into /etc/systemd/system/ and runs daemon-reload.
#   It does not start or restart the service: `systemctl enable --now rtcontrast` the first
#   time, `systemctl restart rtcontrast` after an upgrade.
#
# Environment:
#   PREFIX=/opt/rtcontrast  ETC=/etc/rtcontrast  UNIT_DIR=/etc/systemd/system
#   VERSION=<name>          release name (default: package version + git commit)
#   PYTHON=python3          the interpreter the venv is made from (>= 3.11)
#   VENV_ARGS="..."         extra `python -m venv` arguments (e.g. --system-site-packages)
#   PIP_ARGS="..."          extra pip arguments, e.g. an offline wheelhouse:
#                           PIP_ARGS="--no-index --find-links /media/wheels"
#   PIP=0                   install no packages (the venv must already see them, e.g. with
#                           VENV_ARGS=--system-site-packages; used by the tests)
#   KEEP_RELEASES=3         older releases beyond this many are removed (never `current`)
#   NO_SYSTEMD=1            skip user creation and systemctl (packaging, containers, tests)
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=$(pwd)

PREFIX=${PREFIX:-/opt/rtcontrast}
ETC=${ETC:-/etc/rtcontrast}
UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
PY=${PYTHON:-python3}
KEEP_RELEASES=${KEEP_RELEASES:-3}
STATE=${STATE:-/var/lib/rtcontrast}   # = StateDirectory in the unit; override only for tests

if [ "${NO_SYSTEMD:-0}" != 1 ] && [ "$(id -u)" != 0 ]; then
  echo "install.sh must run as root (sudo bash scripts/install.sh)" >&2; exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "rtcontrast needs Python >= 3.11 (found $("$PY" --version 2>&1))" >&2; exit 1
fi
[ -f models/qmap-se.onnx ] || { echo "models/qmap-se.onnx missing: not a complete release" >&2; exit 1; }

pkg_version=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
commit=$(git rev-parse --short HEAD 2>/dev/null || echo nogit)
VERSION=${VERSION:-$pkg_version-$commit}
REL=$PREFIX/releases/$VERSION

# 1. the service user
if [ "${NO_SYSTEMD:-0}" != 1 ] && ! id rtcontrast >/dev/null 2>&1; then
  echo "creating system user rtcontrast"
  useradd --system --user-group --no-create-home --home-dir "$STATE" --shell /usr/sbin/nologin rtcontrast
fi

# 2. the release: code + models + shipped configs, and its own venv
echo "installing release $VERSION into $REL"
mkdir -p "$PREFIX/releases"
tmp=$(mktemp -d "$PREFIX/releases/.partial.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/app"
cp -a rtcontrast node.py pyproject.toml "$tmp/app/"
cp -a models config systemd "$tmp/app/"
[ -d docs ] && cp -a docs "$tmp/app/"
[ -f README.md ] && cp -a README.md "$tmp/app/"
cp -a LICENSE NOTICE "$tmp/app/"
find "$tmp/app" -name __pycache__ -type d -prune -exec rm -rf {} +
# shellcheck disable=SC2086
"$PY" -m venv ${VENV_ARGS:-} "$tmp/venv"
# The code runs from app/ (node.py puts it first on sys.path); the venv holds the dependencies
# listed in pyproject.toml.
"$PY" -c 'import tomllib, sys; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' \
  pyproject.toml > "$tmp/app/requirements.txt"
if [ "${PIP:-1}" != 0 ]; then
  # shellcheck disable=SC2086
  "$tmp/venv/bin/python" -m pip install -q ${PIP_ARGS:-} -r "$tmp/app/requirements.txt"
fi
# the venv was made at $tmp: fix its recorded location before moving it into place
grep -rlI -- "$tmp" "$tmp/venv/bin" "$tmp/venv/pyvenv.cfg" | xargs -r sed -i "s#$tmp#$REL#g"
rm -rf "$REL"
mv "$tmp" "$REL"
trap - EXIT
chmod 0755 "$REL"
chmod -R go-w,go+rX "$REL"
(cd "$REL/app" && "$REL/venv/bin/python" -c "import rtcontrast.node.service, onnxruntime, pynetdicom, prometheus_client") \
  || { echo "the new release's environment is incomplete; 'current' was not switched" >&2; exit 1; }
# The release redistributes its venv: refuse one whose dependency closure holds GPL code
# (pylibjpeg-libjpeg is an opt-in extra only; see NOTICE).
(cd "$REL/app" && "$REL/venv/bin/python" -m rtcontrast.node.ops.licences > "$REL/app/THIRD-PARTY-LICENCES.txt") \
  || { cat "$REL/app/THIRD-PARTY-LICENCES.txt" >&2
       echo "the new release's environment holds GPL-licensed code; 'current' was not switched" >&2; exit 1; }
ln -sfn "releases/$VERSION" "$PREFIX/current.new"
mv -T "$PREFIX/current.new" "$PREFIX/current"
echo "current -> releases/$VERSION"

# 3. configuration (never overwrite the admin's files)
mkdir -p "$ETC"
for f in node.yaml protocol.yaml; do
  cp config/$f "$ETC/$f.dist"
done
if [ ! -e "$ETC/node.yaml" ]; then
  sed -e "s#^var_dir: .*#var_dir: $STATE#" \
      -e "s#^model_path: [^ ]*#model_path: $PREFIX/current/app/models/qmap-se.onnx#" \
      config/node.yaml > "$ETC/node.yaml"
  echo "wrote $ETC/node.yaml (edit ae_title, port, allowed_calling_aes, ...)"
else
  echo "kept existing $ETC/node.yaml (the shipped version is $ETC/node.yaml.dist)"
fi
if [ ! -e "$ETC/protocol.yaml" ]; then
  sed -e "s#path: ./var/export#path: $STATE/export#" config/protocol.yaml > "$ETC/protocol.yaml"
  echo "wrote $ETC/protocol.yaml (add your planning system under destinations)"
else
  echo "kept existing $ETC/protocol.yaml (the shipped version is $ETC/protocol.yaml.dist)"
fi
if [ "${NO_SYSTEMD:-0}" != 1 ]; then
  chown root:rtcontrast "$ETC" "$ETC"/*.yaml*
  chmod 0750 "$ETC"; chmod 0640 "$ETC"/*.yaml*
fi

# 4. the unit
mkdir -p "$UNIT_DIR"
install -m 0644 systemd/rtcontrast.service "$UNIT_DIR/rtcontrast.service"
if [ "${NO_SYSTEMD:-0}" != 1 ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi

# old releases (never the current one)
if [ -d "$PREFIX/releases" ]; then
  cur=$(readlink "$PREFIX/current" | sed 's#^releases/##')
  { ls -1t "$PREFIX/releases" | grep -vx -- "$cur" || true; } | tail -n +"$KEEP_RELEASES" | while read -r old; do
    echo "removing old release $old"; rm -rf "${PREFIX:?}/releases/$old"
  done
fi

"$REL/venv/bin/python" "$REL/app/node.py" check-config --config "$ETC/node.yaml" --protocol "$ETC/protocol.yaml" \
  || echo "WARNING: the configuration in $ETC does not check out; fix it before (re)starting the service" >&2
cat <<EOF

Installed rtcontrast $VERSION.
  first install:  systemctl enable --now rtcontrast
  after upgrade:  systemctl restart rtcontrast      (rollback: ln -sfn releases/<old> $PREFIX/current; restart)
  protocol edit:  systemctl reload rtcontrast
  watch:          journalctl -u rtcontrast -f; $PREFIX/current/venv/bin/python $PREFIX/current/app/node.py status --config $ETC/node.yaml
EOF
