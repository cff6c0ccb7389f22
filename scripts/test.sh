#!/usr/bin/env bash
# The test command: set up .venv when needed, then run the whole suite on 2 pytest-xdist workers
# (a test file to a worker) and list its 15 slowest tests. Extra args go to pytest
# (`-n 0`: one process).
# One OpenMP thread per process: two workers (and the processes their tests start) share the 2 cores,
# and torch's OpenMP threads spin while they wait for a core they do not get (a training test took
# 12.7 s alone and 193 s beside another job with 2 threads each).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile --durations=15 "$@"
