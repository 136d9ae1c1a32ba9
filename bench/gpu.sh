#!/usr/bin/env bash
# GPU benchmark: DPT_Large at 384x384 on CUDA, fp32 and fp16, batch 1 and 8, against eager fp32 in one run.
#
#   bench/gpu.sh [--json]
#
# Prints one line and exits 0 where no CUDA GPU is present, so CPU-only CI never fails because of it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "bench/gpu.sh: skipped, no CUDA GPU on this machine (nvidia-smi finds none)"
  exit 0
fi
exec "$PY" bench/gpu.py "$@"
