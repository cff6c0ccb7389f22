#!/usr/bin/env bash
# On one GPU, within 8 minutes: the full-size architectures with random weights (CLIP ViT-L/14,
# HuBERT-Large, Qwen2.5-7B, bf16, nothing downloaded): extraction clips/s, LoRA training tokens/s
# under ZeRO-2 and peak GPU memory, as one table. Extra arguments go to bench/gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
timeout 480 .venv/bin/python bench/gpu.py --scale full "$@"
