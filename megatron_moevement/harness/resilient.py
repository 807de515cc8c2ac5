"""Harness job ``resilient``: MoEvement training that survives SIGKILLed ranks.

Faults are injected by the victim process itself sending SIGKILL to its own pid at a precise
point: ``{"rank": r, "iteration": i, "phase": p, "generation": g}`` with phase one of
``before`` (start of the iteration), ``microbatch<k>`` (mid-iteration, before microbatch k's
forward), ``after_step`` (optimizer step done, snapshot not yet taken), ``after_snapshot``
(snapshot copy and replication just launched, in flight), ``replay`` (during a recovery's
replay, ranks in scope) or ``recovery_wait`` (while a rank outside the scope waits for the
replay; ``iteration`` is then its last committed one). ``generation`` (default 0) selects which incarnation of the rank dies.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import torch

from megatron_moevement.logging_utils import get_logger

logger = get_logger(__name__)


def run_resilient(spec) -> None:
    import torch.distributed as dist

    from megatron_moevement.config import MoEvementConfig
    from megatron_moevement.harness.layout import ParallelLayout
    from megatron_moevement.harness.model import TinyMoEConfig
    from megatron_moevement.harness.trainer import HarnessTrainer
    from megatron_moevement.recovery import ElasticContext, RecoveryDriver
    from megatron_moevement.runtime import ensure_runtime
    from megatron_moevement.strategy import MoEvementStrategy

    ensure_runtime()
    fields = dict(spec.moevement)
    faults = fields.pop("faults", [])
    config = MoEvementConfig.from_dict(fields)
    layout = ParallelLayout(**spec.layout)
    model_cfg = TinyMoEConfig.from_dict(spec.model)
    ctx = ElasticContext.from_env(timeout_s=spec.timeout_s)

    def fault_hook(iteration: int, phase: str, driver) -> None:
        for f in faults:
            if (f["rank"] == driver.ctx.rank and f["iteration"] == iteration
                    and f["phase"] == phase and f.get("generation", 0) == driver.ctx.generation):
                logger.warning("fault injection: SIGKILL rank %d at iteration %d (%s)",
                               driver.ctx.rank, iteration, phase)
                os.kill(os.getpid(), signal.SIGKILL)

    def build():
        trainer = HarnessTrainer(model_cfg, layout)
        trainer.microbatch_hook = lambda it, mb: fault_hook(it, f"microbatch{mb}", driver)
        strategy = MoEvementStrategy(trainer.gpt_model, trainer.optimizer, config)
        trainer.p2p_communicator = strategy.p2p_communicator
        trainer.pg_collection = strategy.pg_collection
        return trainer, strategy

    driver = RecoveryDriver(ctx, build, fault_hook)
    driver.start()
    driver.train(spec.iterations)
    rank = dist.get_rank()
    out = Path(spec.output_dir)
    torch.save(driver.trainer.capture_state(), out / f"state_rank{rank}.pt")
    (out / f"recovery_rank{rank}.json").write_text(json.dumps(dict(
        rank=rank, generation=ctx.generation, joined_as_spare=driver.joined_as_spare,
        reports=[r.to_dict() for r in driver.reports],
    ), indent=1))
    driver.strategy.shutdown()
    dist.destroy_process_group()
