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
[ -x .venv/bin/python ] || "$py" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[all]"
echo "edgeft installed in .venv ($(.venv/bin/python --version))"
