"""Harness job ``overhead``: iteration time and snapshot bytes of one checkpointing mode.

Modes: ``none`` (no checkpointing), ``dense`` (a full in-memory snapshot of every operator every
iteration through the same engine: window size 1, Gemini-style), ``moevement`` (sparse snapshots
with the configured window), ``gemini`` and ``moc`` (the baselines of
:mod:`megatron_moevement.baselines`, policy fields under ``baseline``), ``copy_floor`` (no
strategy: :class:`~megatron_moevement.harness.copy_floor.BareCopyLoad` copies and checksums
``floor_bytes`` bytes per rank per iteration in the background, the host's floor for that much
snapshot traffic). Every rank times each iteration end to end (forward/backward,
optimizer step including any wait for a pending copy, and the snapshot call); rank 0 writes the
job-wide maximum per iteration, which is what the slowest rank imposes on everyone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from megatron_moevement.snapshot.stage_times import PROFILER_RANGES as STAGES


def run_overhead(spec) -> None:
    import torch.distributed as dist

    from megatron_moevement.baselines import build_strategy
    from megatron_moevement.config import MoEvementConfig
    from megatron_moevement.harness.layout import ParallelLayout
    from megatron_moevement.harness.model import TinyMoEConfig
    from megatron_moevement.harness.trainer import HarnessTrainer

    mode = spec.moevement.get("mode", "moevement")
    layout = ParallelLayout(**spec.layout)
    trainer = HarnessTrainer(TinyMoEConfig.from_dict(spec.model), layout)
    strategy = None
    floor = None  # the copy_floor mode's BareCopyLoad, built once the optimizer has state
    if mode not in ("none", "copy_floor"):
        fields = {k: v for k, v in spec.moevement.items() if k not in ("mode", "baseline")}
        if mode == "dense":
            fields["window_size"] = 1
        name = mode if mode in ("gemini", "moc") else "moevement"
        strategy = build_strategy(
            name,
            trainer.gpt_model,
            trainer.optimizer,
            MoEvementConfig.from_dict(fields),
            spec.moevement.get("baseline"),
        )
    times, snap_bytes, expert_bytes, windows = [], [], [], []
    # Per iteration, the seconds of each snapshot stage on this rank (stall and background).
    stage_names = tuple(STAGES) if strategy is not None else ()
    stage_rows: list[list[float]] = []
    last = strategy.stage_times.totals() if stage_names else {}
    for it in range(spec.iterations):
        dist.barrier()
        start = time.perf_counter()
        trainer.train_iteration(it)
        if strategy is not None:
            before = strategy.snapshot_bytes_total
            before_expert = strategy.snapshot_bytes_by_part.get("expert_full", 0)
            strategy.after_optimizer_step(it)
            snap_bytes.append(strategy.snapshot_bytes_total - before)
            expert_bytes.append(
                strategy.snapshot_bytes_by_part.get("expert_full", 0) - before_expert
            )
        elif mode == "copy_floor":
            if floor is None:
                from megatron_moevement.harness.copy_floor import BareCopyLoad

                floor = BareCopyLoad(trainer.optimizer, int(spec.moevement["floor_bytes"]))
            snap_bytes.append(floor.after_optimizer_step())
            expert_bytes.append(0)
        else:
            snap_bytes.append(0)
            expert_bytes.append(0)
        times.append(time.perf_counter() - start)
        # W per iteration: an ``auto`` window moves with the measured budget and bandwidth.
        windows.append(strategy.stats()["window_size"] if strategy is not None else None)
        if stage_names:
            now = strategy.stage_times.totals()
            stage_rows.append([now[k] - last[k] for k in stage_names])
            last = now
    if strategy is not None:
        strategy.flush()
    floor_seconds = torch.zeros(2, dtype=torch.float64)
    if floor is not None:
        floor.shutdown()
        floor_seconds = torch.tensor([floor.stall_s, floor.background_s], dtype=torch.float64)
    floor_gathered = [torch.zeros_like(floor_seconds) for _ in range(dist.get_world_size())]
    dist.all_gather(floor_gathered, floor_seconds)
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    b = torch.tensor([snap_bytes, expert_bytes], dtype=torch.float64)
    dist.all_reduce(b, op=dist.ReduceOp.SUM)
    # The experts' full state (FP32 main weights + optimizer state) of the whole job, and the
    # bytes of the compute weights by dtype: what one iteration's expert share is measured
    # against, and what an FP8 model's compute weights cost.
    experts = {"expert_full": 0, "compute": 0}
    if strategy is not None:
        from megatron_moevement.state.operators import operator_tensors

        for op in strategy.registry.of_kind("expert"):
            for _, tensor in operator_tensors(op, ("main", "optim")):
                experts["expert_full"] += tensor.numel() * tensor.element_size()
        for op in strategy.registry:
            for _, tensor in operator_tensors(op, ("compute",)):
                experts["compute"] += tensor.numel() * tensor.element_size()
    # Host memory the strategy holds at the end (snapshot buffers, peer replicas, upstream logs)
    # against the model's training state (compute weights, FP32 main params, optimizer state).
    from megatron_moevement.state.operators import model_and_optimizer_bytes

    state_bytes = sum(model_and_optimizer_bytes(trainer.gpt_model, trainer.optimizer).values())
    host = strategy.host_memory_bytes() if strategy is not None else {}
    totals = torch.tensor(
        [
            experts["expert_full"],
            experts["compute"],
            state_bytes,
            host.get("snapshots", 0),
            host.get("replicas", 0),
            host.get("upstream_log", 0),
        ],
        dtype=torch.float64,
    )
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    # Every rank's stage times to rank 0 (flushed copies land in the last iteration's row).
    if stage_names:
        now = strategy.stage_times.totals()
        stage_rows[-1] = [r + now[k] - last[k] for r, k in zip(stage_rows[-1], stage_names)]
    mine = torch.tensor(stage_rows or [[0.0]], dtype=torch.float64)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    rates = torch.tensor(
        [
            strategy.d2h_bandwidth if strategy is not None else 0.0,
            float(strategy is not None and strategy.idle_core_for_snapshots),
        ],
        dtype=torch.float64,
    )
    all_rates = [torch.zeros_like(rates) for _ in range(dist.get_world_size())]
    dist.all_gather(all_rates, rates)
    window = strategy.stats()["window_size"] if strategy is not None else None
    if strategy is not None:
        strategy.shutdown()
    if dist.get_rank() == 0:
        out = Path(spec.output_dir)
        (out / "overhead.json").write_text(
            json.dumps(
                dict(
                    mode=mode,
                    window_size=window,
                    window_size_per_iteration=windows,
                    iteration_times=t.tolist(),
                    snapshot_bytes_per_iteration=b[0].tolist(),
                    expert_snapshot_bytes_per_iteration=b[1].tolist(),
                    expert_full_state_bytes=totals[0].item(),
                    compute_weight_bytes=totals[1].item(),
                    training_state_bytes=totals[2].item(),
                    stage_seconds_per_rank=[
                        {k: g[:, i].tolist() for i, k in enumerate(stage_names)} for g in gathered
                    ],
                    probe_bandwidth_per_rank=[r[0].item() for r in all_rates],
                    idle_core_for_snapshots=bool(all_rates[0][1].item()),
                    # copy_floor: per rank, the whole run's stall and background seconds.
                    floor_seconds_per_rank=[
                        dict(stall=g[0].item(), background=g[1].item()) for g in floor_gathered
                    ],
                    host_memory_bytes=dict(
                        snapshots=totals[3].item(),
                        replicas=totals[4].item(),
                        upstream_log=totals[5].item(),
                        total=float(totals[3:].sum()),
                    ),
                )
            )
        )
