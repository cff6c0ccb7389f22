#!/usr/bin/env bash
# The main job on the embedded default: `xmei demo` on CPU, from nothing to a report:
# synthetic corpus -> tiny models -> extract train/val/test -> train (language queries, and
# learned queries for the ablation) -> eval on test (also with the features zeroed) -> summary.
# Rerunnable: a rerun reuses what an earlier one completed in runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/xmei demo --out runs/demo
