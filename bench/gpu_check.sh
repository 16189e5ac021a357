#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py has the table's format): one table of the pipeline on one NVIDIA GPU, in under
# 8 minutes. Without CUDA it prints "gpu_check: no CUDA, skipped" and runs the CPU-safe tests.
#   cp -r ../shared/datasets/hymenoptera data/gpu_check/   # the data must be on the machine
#   bench/gpu_check.sh [--data DIR] [--steps N] [--device cpu --smoke]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
exec "$PY" bench/gpu_check.py "$@"
