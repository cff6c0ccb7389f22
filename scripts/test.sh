#!/usr/bin/env bash
# The test command: set up .venv when needed, then run the whole suite and list its 15 slowest tests
# (extra args go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q --durations=15 "$@"
