#!/usr/bin/env bash
# GPU benchmark for a CUDA machine: NCCL, bf16, the base, large and xl models under ZeRO-2 and
# ZeRO-3 on every visible GPU; per case the median step time, tokens/s and an MFU estimate from
# the model's FLOP count (peak: GPU_PEAK_TFLOPS, else the device's bf16 dense peak by name).
# Results: runs/bench/gpu-<time>.json and a table.
#   bash bench/gpu.sh              on the GPU machine (uses .venv if present, else python3)
#   bash bench/gpu.sh --dry-run    on a CPU: the same script path with tiny sizes, 1 process, fp32
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" -m tools.bench gpu "$@"
