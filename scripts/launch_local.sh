#!/usr/bin/env bash
# Runs a Megatron-LM pretrain script on local processes with MoEvement and spare processes.
#
# Usage: scripts/launch_local.sh --nprocs N [--spares S] [--log-dir DIR] [--timeout SECONDS]
#            [--ckpt-strategy moevement|gemini|moc] [--window-size auto|W]
#            [--replication-factor R] [--host-memory-budget 64GiB|none]
#            [--no-moevement] [--] SCRIPT [SCRIPT ARGS...]
#
# Example (Megatron-LM at core_v0.16.1 with the MoEvement patch applied):
#   scripts/launch_local.sh --nprocs 8 --spares 1 --log-dir /tmp/run1 -- \
#       /opt/Megatron-LM/pretrain_gpt.py --num-layers 4 --num-experts 8 ...
#
# Uses $PYTHON if set, else this repository's .venv, else python on PATH. See
# python -m megatron_moevement.megatron.launch_local --help for details.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then
        PYTHON="$ROOT/.venv/bin/python"
    else
        PYTHON=python
    fi
fi
exec "$PYTHON" -m megatron_moevement.megatron.launch_local "$@"
