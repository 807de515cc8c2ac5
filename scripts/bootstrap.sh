#!/usr/bin/env bash
# Creates ./.venv (if missing) and installs megatron-moevement with its test extras and what
# Megatron-LM's own pretrain_gpt.py imports (the tests run it) into it.
# torch is pinned to 2.13.0 and installed first, on its own: a bare `torch` requirement would
# pull several GB of CUDA wheels on a CPU machine. On machines without a local CPU wheel of
# torch 2.13.0, set TORCH_INDEX_URL to PyTorch's CPU wheel index.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "${PIP[@]}" install "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
  else
    "${PIP[@]}" install "torch==2.13.0"
  fi
fi
"${PIP[@]}" install -e ".[test,megatron-lm]" 2> >(grep -v "^WARNING: Location" >&2)
