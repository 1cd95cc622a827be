#!/usr/bin/env bash
# Lint and type-check, then the whole test suite (pure, local-Ray, multi-node and CLI tests). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m ruff check lsgd_ray tests scripts experiments
.venv/bin/python -m ruff format --check lsgd_ray tests scripts experiments
.venv/bin/python -m mypy  # the package's type hints (pyproject.toml [tool.mypy])
exec .venv/bin/python -m pytest "$@"
