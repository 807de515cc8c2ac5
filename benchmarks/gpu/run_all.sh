#!/usr/bin/env bash
# The GPU checks in one command, on one H100/H200 with that machine's own PyTorch:
#   bash benchmarks/gpu/run_all.sh [wheel folder]
# Installs megatron-moevement without touching the machine's torch (--no-deps), and Transformer
# Engine / megatron-core from a folder of wheels when one is given (machines without a package
# index). Results: results/gpu/gpu_checks.json and results/gpu/gpu_checks.log.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
WHEELS=${1:-}
if [ -n "$WHEELS" ]; then
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" transformer_engine megatron-core || true
fi
"$PY" -m pip install -q --no-deps -e . || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p results/gpu
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee results/gpu/device.txt
"$PY" benchmarks/gpu/gpu_checks.py --output results/gpu/gpu_checks.json "${@:2}" \
  2>&1 | tee results/gpu/gpu_checks.log
