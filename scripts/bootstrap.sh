#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine, and is quick when
# nothing is missing: Debian packages, a virtual environment in .venv, the project with
# its test extras. The tpm2-pytss wheel (a 25 s C build) is cached outside the checkout.
set -euo pipefail
cd "$(dirname "$0")/.."

DEB_PACKAGES=(swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config gcc openssl curl
              strongswan-pki libstrongswan-extra-plugins libstrongswan-standard-plugins
              mosquitto mosquitto-clients softhsm2 libfaketime postgresql
              rabbitmq-server systemd logrotate curl sqlite3)
VENV=.venv
STAMP="$VENV/.devtrust-installed"
WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/devtrust/wheels"
PY="${PYTHON:-python3}"

missing=()
for p in "${DEB_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "==> installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt scripts/bootstrap.sh ]; then
  exit 0
fi

"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
[ -x "$VENV/bin/python" ] || { echo "==> creating $VENV"; "$PY" -m venv "$VENV"; }
"$VENV/bin/python" -m pip install -q --upgrade pip wheel
mkdir -p "$WHEELS"
if ! ls "$WHEELS"/tpm2_pytss-3.0.0-*.whl >/dev/null 2>&1; then
  echo "==> building the tpm2-pytss wheel once (about 25 s), cached in $WHEELS"
  "$VENV/bin/python" -m pip wheel -q --no-deps -w "$WHEELS" "tpm2-pytss==3.0.0"
fi
echo "==> installing the project into $VENV"
"$VENV/bin/python" -m pip install -q --find-links "$WHEELS" -e ".[test]"
touch "$STAMP"
