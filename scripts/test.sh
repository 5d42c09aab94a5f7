#!/usr/bin/env bash
# The test suite, the README's second command: `python -m pytest -q` in the Python scripts/demo.sh uses (the
# project's .venv unless one with galore-train is at hand: scripts/_python.sh, which installs it if needed).
#   bash scripts/test.sh                      everything, slow end-to-end tests included (what CI runs)
#   bash scripts/test.sh -m "not slow"        arguments go to pytest (-k NAME, --co, -x, a file...)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_python.sh
exec "$PY" -m pytest -q "$@"
