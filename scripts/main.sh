#!/usr/bin/env bash
# The main job on the embedded default: a synthetic corpus, its validation, the tiny model set,
# and the stage-1 feature stores of its three splits.
# Rerunnable: it replaces only what it wrote itself (data/xmei_dataset, models/tiny); the stores
# resume, so a rerun on the same corpus skips their finished shards.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
xmei=.venv/bin/xmei
$xmei synth data/xmei_dataset --n 200 --seed 0 --overwrite
for split in train val test; do
  $xmei validate data/xmei_dataset/annotations/$split.json --config configs/tiny.yaml
done
$xmei models tiny models/tiny --seed 0
$xmei config --config configs/tiny.yaml --models models/tiny --check > /dev/null
for split in train val test; do
  $xmei extract --config configs/tiny.yaml --models models/tiny \
      --annotations data/xmei_dataset/annotations/$split.json --out data/stores/$split
  $xmei stores verify data/stores/$split
done
