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
# The app's browser test drives Debian's Chromium with Playwright (Playwright's own browser
# download cannot be used here).  Installed with apt when running as root (as CI does);
# otherwise this says how, and the test fails with the same advice.
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the browser test (apt-get)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: tests/test_app_browser.py needs Chromium: sudo apt-get install -y chromium" >&2
  fi
fi
echo "ortho-diffusion installed in $(pwd)/.venv"
