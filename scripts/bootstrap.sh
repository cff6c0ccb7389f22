#!/usr/bin/env bash
# Creates .venv when missing and installs everything the project needs into it.
# Quick (a hash check) when nothing changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv
stamp=$venv/.xmei-installed
want=$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/xmei" ]; then
  exit 0
fi

python=${PYTHON:-$(command -v python3.11 || command -v python3)}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
echo "installing into $venv (about 2 minutes on a fresh machine)..." >&2
# torch first, alone: the CPU wheel on disk. Letting another package pull torch in would
# fetch a multi-GB CUDA build.
"$venv/bin/pip" install -q torch==2.13.0
DS_BUILD_OPS=0 "$venv/bin/pip" install -q -r requirements.txt
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
