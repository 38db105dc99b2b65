#!/usr/bin/env bash
# Creates ./.venv with a CPU-only PyTorch and everything ortho-diffusion needs.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -c constraints.txt -e ".[app,dev,control]"
# Control preprocessors, without their declared dependencies (see pyproject.toml, extra
# "control"): mediapipe 0.10.21 bundles its face models (offline); controlnet-aux is imported
# submodule by submodule (ortho_diffusion.control.preprocess), never its package __init__.
.venv/bin/pip install -q -c constraints.txt --no-deps mediapipe==0.10.21 controlnet-aux==0.0.10
echo "ortho-diffusion installed in $(pwd)/.venv"
