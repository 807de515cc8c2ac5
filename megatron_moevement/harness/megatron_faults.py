"""Fault injection into Megatron-LM ranks that run in an elastic session (tests and demos).

Installed through ``MOEVEMENT_WORKER_HOOK=megatron_moevement.harness.megatron_faults:install``;
the faults come from ``MOEVEMENT_FAULT_INJECTION``: a JSON list of
:mod:`megatron_moevement.harness.faults` specs. The victim kills itself (SIGKILL by default, or
``"signal"``) when it reaches its point: ``before``, ``microbatch<k>``, ``after_step`` or
``after_snapshot`` of a 0-based ``iteration`` (Megatron's ``args.curr_iteration``), the
build's ``model`` and ``build`` (``iteration`` 0: before and after the strategy is built in
``pretrain()``), or the recovery's ``fetch``, ``replay`` and ``recovery_wait``;
``generation`` (default 0) selects which incarnation of the rank dies, ``with`` kills other ranks
at the same moment (a node failure).
Every fault that fires is recorded in ``faults.jsonl`` of ``MOEVEMENT_REPORT_DIR``.
"""

from __future__ import annotations

import json
import os
import signal

from megatron_moevement.constants import REPORT_DIR_ENV
from megatron_moevement.harness.faults import record_fired, validate_faults
from megatron_moevement.logging_utils import get_logger
from megatron_moevement.recovery.protocol import StoreKeys, _get_json

logger = get_logger(__name__)

FAULTS_ENV = "MOEVEMENT_FAULT_INJECTION"
"""The faults to inject (JSON list)."""
HOOK = f"{__name__}:install"
"""The value of ``MOEVEMENT_WORKER_HOOK`` that installs this module."""


def install(session) -> None:
    """Installs the faults of ``MOEVEMENT_FAULT_INJECTION`` as the session's fault hook."""
    faults = json.loads(os.environ.get(FAULTS_ENV, "[]") or "[]")
    if not faults:
        return
    # Megatron-LM's iteration count and microbatches are not known yet: any are accepted.
    faults = validate_faults(faults, session.ctx.world_size, 10**9, 10**6)
    fired: set[int] = set()

    def hook(iteration, phase: str, session) -> None:
        ctx = session.ctx
        for index, f in enumerate(faults):
            if index in fired or f["phase"] != phase or f["rank"] != ctx.rank:
                continue
            if f["iteration"] not in (iteration, "*") or f.get("generation", 0) != ctx.generation:
                continue
            fired.add(index)
            record_fired(os.environ.get(REPORT_DIR_ENV), f)
            sig = getattr(signal, f.get("signal", "SIGKILL"))
            for other in f.get("with", []):
                os.kill(_get_json(ctx.store, StoreKeys.heartbeat(other))["pid"], sig)
            logger.warning(
                "fault injection: %s rank %d at iteration %s (%s)",
                sig.name,
                ctx.rank,
                iteration,
                phase,
            )
            os.kill(os.getpid(), sig)

    session.fault_hook = hook
