"""Harness job ``replay_cost``: time of normal iterations vs sparse-to-dense replay iterations.

Trains with MoEvement, then rolls back to the persisted checkpoint several times and times each
replayed iteration by how many operators were frozen in it. Rank 0 writes the job-wide maxima.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def run_replay_cost(spec) -> None:
    import torch.distributed as dist

    from megatron_moevement.config import MoEvementConfig
    from megatron_moevement.harness.layout import ParallelLayout
    from megatron_moevement.harness.model import TinyMoEConfig
    from megatron_moevement.harness.trainer import HarnessTrainer
    from megatron_moevement.strategy import MoEvementStrategy

    fields = dict(spec.moevement)
    repeats = fields.pop("repeats", 3)
    trainer = HarnessTrainer(TinyMoEConfig.from_dict(spec.model), ParallelLayout(**spec.layout))
    strategy = MoEvementStrategy(
        trainer.gpt_model, trainer.optimizer, MoEvementConfig.from_dict(fields)
    )
    normal = []
    for it in range(spec.iterations):
        dist.barrier()
        start = time.perf_counter()
        trainer.train_iteration(it)
        normal.append(time.perf_counter() - start)
        strategy.after_optimizer_step(it)
    strategy.flush()
    ckpt = strategy.persisted_checkpoint
    timings: dict[int, list[float]] = {}

    def timed(iteration: int) -> None:
        dist.barrier()
        start = time.perf_counter()
        trainer.train_iteration(iteration)
        timings.setdefault(iteration, []).append(time.perf_counter() - start)

    reports = [
        strategy.rollback_and_replay(spec.iterations - 1, timed, ckpt) for _ in range(repeats)
    ]
    frozen = reports[-1].frozen_operators
    rows = []
    for iteration, values in sorted(timings.items()):
        t = torch.tensor(sorted(values)[len(values) // 2], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        rows.append(
            dict(
                iteration=iteration,
                frozen_operators=frozen[iteration],
                operators=len(strategy.registry),
                seconds=float(t),
            )
        )
    steady = sorted(normal[2:])
    t = torch.tensor(steady[len(steady) // 2], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    strategy.shutdown()
    if dist.get_rank() == 0:
        (Path(spec.output_dir) / "replay_cost.json").write_text(
            json.dumps(dict(normal_iteration_s=float(t), window_size=ckpt.window_size, replay=rows))
        )
