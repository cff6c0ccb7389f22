#!/usr/bin/env bash
# The main job on the embedded default: `xmei demo` on CPU, from nothing to a report:
# synthetic corpus -> tiny models -> extract train/val/test -> train the seed's table (A+V+T, V+T,
# A+T, the learned-query Q-Former) -> eval on test (labels constrained; A+V+T also freely, without
# descriptions, with the features zeroed) -> summary, modality and label-probability checks, elapsed time (~22 min).
# Rerunnable: a rerun reuses what an earlier one completed in runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/xmei demo --out runs/demo
