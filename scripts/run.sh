#!/usr/bin/env bash
# The main job: LSGD, 2 groups x 2 workers on an embedded local Ray, offline digits dataset.
# Any `lsgd-ray train` flag may follow, e.g. --dataset fashion-mnist --data-dir ../shared/data
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m lsgd_ray train "$@"
