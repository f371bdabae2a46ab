#!/usr/bin/env bash
# Create .venv with the locked environment (requirements.lock) and cnnrun installed in editable mode.
# Chainer 7.8.1 is built from source and needs setuptools<81 in its build environment: pip >= 25.3 takes that
# as a build constraint (constraints/build.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q 'pip>=25.3'
.venv/bin/python -m pip install -q --build-constraint constraints/build.txt -r requirements.lock
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
echo "installed in .venv: $(.venv/bin/cnnrun --version 2>/dev/null | sed -n 1p || echo cnnrun)"
