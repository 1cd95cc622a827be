#!/usr/bin/env bash
# Create .venv (once) and install lsgd-ray into it with the development extras.
# Safe to run again: it reinstalls only when setup.cfg changed or something is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# Each package found, not imported: importing them all took 5-7 s at every run of run.sh.
FIND_ALL='import importlib.util as u, sys
names = "lsgd_ray ray torch torchvision sklearn tensorboard pytest mypy hypothesis".split()
sys.exit(any(u.find_spec(n) is None for n in names))'
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)" >&2
  "$PYTHON" -m venv .venv
fi
if [ ! -f .venv/.installed ] || [ setup.cfg -nt .venv/.installed ] \
   || ! .venv/bin/python -c "$FIND_ALL" 2>/dev/null; then
  echo "setup: installing lsgd-ray and its dependencies into .venv (first time: a few minutes)" >&2
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[dev]"
  touch .venv/.installed
fi
