#!/usr/bin/env bash
# Creates ./.venv with a CPU-only PyTorch and everything ortho-diffusion needs.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -c constraints.txt -e ".[app,dev]"
echo "ortho-diffusion installed in $(pwd)/.venv"
