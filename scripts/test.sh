#!/usr/bin/env bash
# Install, lint, type-check and run the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh
echo "== installing the docs tools (the docs extra)"
"$PY" -m pip install --progress-bar on -e ".[docs]"
"$PY" -m ruff check .
"$PY" -m ruff format --check .
"$PY" -m mypy
# the reference site: a broken link, a missing page or a bad docstring fails the build
NO_MKDOCS_2_WARNING=1 "$PY" -m mkdocs build --strict --site-dir "$(mktemp -d)"
"$PY" -m pytest -q
