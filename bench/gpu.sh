#!/usr/bin/env bash
# The GPU acceptance check (bench/gpu.py): full-size XMEI-Qwen with random weights (CLIP ViT-L/14,
# HuBERT-Large, Qwen2.5-7B with its 28 layers; LQ-Formers 768 wide, LoRA r64) through `xmei
# extract | train | eval`, within 8 minutes on one H100, one PASS/FAIL line per stage with its
# figures; exit status 1 on any FAIL. Everything, the commands' own output too, goes to
# ${OUT:-/tmp}/gpu.log, the figures to ${OUT:-/tmp}/gpu.json.
#
#   here (PyPI):      bash bench/gpu_wheels.sh           # fills .whl/ (~60 MiB), once
#   GPU, no network:  bash bench/gpu.sh                  # a device call with carry [".whl"], timeout_s 600
#   a CPU check:      bash bench/gpu.sh --scale tiny     # the same stages on tiny models, a few minutes
#
# Which Python: $PYTHON when set, else .venv/bin/python when there is one (scripts/bootstrap.sh made
# it: this machine, or a GPU machine with PyPI), else python3 (a GPU machine's own, holding CUDA
# torch). The last two without .venv install .whl/*.whl into $XMEI_SITE (default /tmp/site) and put
# it and the repository first on PYTHONPATH: the machine's packages stay, the wheels add what it lacks.
#
# Estimates on one H100, 16 cores (not measured yet; each stage's limit is about twice its own):
#   wheels 20 s, preflight 20 s, models 60 s (the 7B's 15 GB written; the corpus renders beside it),
#   extract 60 s, train_deepspeed 75 s, train_torch 60 s, resume 45 s, eval 40 s: ~6.5 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp}
mkdir -p "$out"
log=$out/gpu.log
: > "$log"
budget=480  # seconds for everything, this setup included
for arg in "$@"; do case $arg in tiny | --scale=tiny) budget=1200 ;; esac; done
start=$SECONDS

if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
  py=.venv/bin/python
else
  py=${PYTHON:-python3}
  if ! compgen -G ".whl/*.whl" > /dev/null; then
    echo "FAIL  setup            no .venv and no .whl/: run bash bench/gpu_wheels.sh where PyPI is reachable (or scripts/bootstrap.sh)" | tee -a "$log"
    exit 1
  fi
  site=${XMEI_SITE:-/tmp/site}
  if ! "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl >> "$log" 2>&1; then
    echo "FAIL  setup            pip could not install .whl/ into $site (see $log)" | tee -a "$log"
    exit 1
  fi
  export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  echo "setup: $(ls .whl/*.whl | wc -l) wheels installed into $site for $py in $((SECONDS - start)) s" | tee -a "$log"
  "$py" -m pip list >> "$log" 2>&1  # every version, for the log
fi
export PYTHONUNBUFFERED=1
# the stages keep to the budget themselves; this outer limit only catches a hang of the runner
timeout -k 10 $((budget + 60)) "$py" bench/gpu.py --log "$log" --summary "$out/gpu.json" \
  --elapsed $((SECONDS - start)) --budget "$budget" "$@"
