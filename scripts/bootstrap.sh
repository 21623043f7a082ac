#!/usr/bin/env bash
# Set up what the README's commands need, skipping what is already there:
#   - .venv with the package and its test extra (re-installed only when pyproject.toml changes)
#   - redis-server (apt-get, only when absent)
#   - chromium, headless, for the dashboard's browser test (apt-get, only when absent)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else 1)'; then
    echo "bootstrap: Python 3.11 is required (found $("$PYTHON" --version 2>&1))" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv"
    "$PYTHON" -m venv .venv
fi

stamp=.venv/.moefleet-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "bootstrap: installing moe-fleet[test] into .venv (first run takes a few minutes)"
    .venv/bin/pip install --quiet --upgrade pip
    # torch==2.13.0 is pinned in pyproject.toml: pip takes the CPU build, never a CUDA one.
    .venv/bin/pip install --quiet -e ".[test]"
    echo "$want" > "$stamp"
fi

if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
apt_updated=""
apt_update() {
    if [ -z "$apt_updated" ]; then $SUDO apt-get update -qq; apt_updated=1; fi
}

if ! command -v redis-server >/dev/null 2>&1; then
    echo "bootstrap: installing redis-server"
    apt_update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
    # the package starts a system-wide server; the project starts its own on loopback
    ($SUDO service redis-server stop || true) >/dev/null 2>&1
fi

if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    echo "bootstrap: installing chromium (headless, for the dashboard test)"
    apt_update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
