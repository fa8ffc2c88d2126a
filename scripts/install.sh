#!/usr/bin/env bash
# Create .venv (Python 3.10-3.12: onnxruntime-training has no wheels for newer) and install edgeft with
# every extra. The pins live in pyproject.toml only.
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-}"
if [ -z "$py" ]; then
  for candidate in python3.11 python3.12 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))'; then
      py="$candidate"; break
    fi
  done
fi
if [ -z "$py" ]; then
  echo "edgeft needs Python 3.10, 3.11 or 3.12 (set PYTHON=/path/to/python)" >&2
  exit 1
fi
# PostgreSQL for the coordinator's database tests (tests/server, marker postgres: each run starts a throwaway
# cluster of its own on a free loopback port, so whether the package's own cluster started does not matter).
# Installed only where it is missing, we are root and apt-get exists (CI: a clean Debian machine as root); elsewhere
# those tests skip and say why.
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 &&
   [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
           postgresql; } >/tmp/edgeft-apt.log 2>&1; then
    echo "warning: could not install PostgreSQL (see /tmp/edgeft-apt.log); its tests will be skipped" >&2
  fi
fi
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[all]"
echo "edgeft installed in .venv ($(.venv/bin/python --version))"
