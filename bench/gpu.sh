#!/usr/bin/env bash
# The GPU bench in one command (under 8 minutes on one GPU): ours vs diffusers' identical network (bf16, eager and
# compiled, NCHW and channels_last), train.py's step with data.on_device=true, sampling, the 256×256 model's peak
# memory; writes bench/results/<gpu>.json. `bench/gpu.sh --smoke` runs every part on CPU in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
exec env PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" "$PY" bench/gpu.py "$@"
