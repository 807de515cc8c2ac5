"""Harness job ``profile``: measures the real harness model and writes a simulator profile.

Run on every rank of a normal (non-elastic) harness job; rank 0 writes ``profile.json`` (the
simulator's stage-profile format, :mod:`megatron_moevement.sim.profile`) into the output folder.
``spec.moevement`` holds the profiler's options: ``warmup`` (untimed iterations first, default 3)
and ``config``/``strategy``/``baseline`` (the checkpointing strategy whose rebuild is timed, as a
recovery rebuilds it; default MoEvement with default settings).

Measured, in order:

1. ``spec.iterations`` rounds of three interleaved iterations (so that all three see the same
   machine load): a plain one (the real loop's fault-free, checkpoint-free iteration time), an
   instrumented one (forward, point-to-point, gradient synchronization and optimizer step per
   rank, :mod:`~megatron_moevement.profiler.timers`) and one with every operator but the
   embedding frozen (input-gradient backward only, no optimizer step);
2. the per-rank snapshot throughput (copy into a host buffer + checksum, all ranks at once) and
   the gloo replication throughput (every rank sending to the next at once);
3. a recovery rehearsal, what a recovery pays besides loading state and replaying: creating a
   process group over every rank, rebuilding parallel state, model, DDP, optimizer and strategy,
   and the extra time of the first iteration after the rebuild; plus the local agent's
   failure-detection delay (its batching window and polling periods, constants of the agent).
   The survivors' teardown is not rehearsed: a ``gc.collect()`` in this process (which holds two
   trainers) takes far longer than in a worker, whose whole detect phase measures within a few
   tens of milliseconds of the agent's constants.
"""

from __future__ import annotations

import inspect
import json
import statistics
import time
from pathlib import Path

import torch

from megatron_moevement.logging_utils import get_logger

logger = get_logger(__name__)

_BANDWIDTH_BYTES = 16 << 20


def _phase_totals(calls: dict, iterations: int, microbatches: int):
    from megatron_moevement.profiler.aggregate import PhaseTotals

    def total(phase: str) -> float:
        return float(sum(calls.get(phase, ())))

    p2p = calls.get("p2p", [])
    return PhaseTotals(
        iterations=iterations,
        microbatches=microbatches,
        forward_s=total("forward"),
        forward_backward_s=total("forward_backward"),
        p2p_s=total("p2p"),
        grad_sync_s=total("grad_sync"),
        optimizer_s=total("optimizer"),
        p2p_min_s=min(p2p) if p2p else 0.0,
        iteration_s=total("iteration"),
        step_wait_s=total("step_wait"),
    )


def _measure_rounds(trainer, timers, registry, first: int, rounds: int):
    """``rounds`` rounds of (plain, instrumented, frozen) iterations, interleaved so that the
    three see the same machine load; returns the plain times and both phase-call dicts."""
    from collections import defaultdict

    from megatron_moevement.replay.frozen import frozen_operators

    frozen_names = [op.name for op in registry if op.name != "embedding"]  # the first stage
    plain, normal, frozen = [], defaultdict(list), defaultdict(list)  # still back-propagates
    it = first
    for _ in range(rounds):
        timers.enabled, timers.skip_optimizer = False, False
        start = time.perf_counter()
        timers.train_iteration(it)
        plain.append(time.perf_counter() - start)
        for calls, freeze in ((normal, False), (frozen, True)):
            timers.timer.reset()
            timers.enabled, timers.skip_optimizer = True, freeze
            if freeze:
                with frozen_operators(registry, frozen_names):
                    timers.train_iteration(it + 1)
            else:
                timers.train_iteration(it + 1)
            for phase, values in timers.timer.calls.items():
                calls[phase].extend(values)
        it += 2
    timers.enabled, timers.skip_optimizer = False, False
    return plain, normal, frozen


def _snapshot_bandwidth(checksum: str) -> float:
    """Per-rank copy+checksum throughput with every rank snapshotting at once (bytes/s)."""
    import torch.distributed as dist

    from megatron_moevement.snapshot.engine import measure_d2h_bandwidth

    dist.barrier()
    return measure_d2h_bandwidth(_BANDWIDTH_BYTES, repeats=3, checksum_algorithm=checksum)


def _replication_bandwidth(group) -> float:
    """Per-rank gloo throughput, every rank sending to the next one at once (bytes/s)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    if world == 1:
        return float("inf")
    send = torch.zeros(_BANDWIDTH_BYTES, dtype=torch.uint8)
    recv = torch.empty_like(send)
    samples = []
    for _ in range(3):
        dist.barrier(group=group)
        start = time.perf_counter()
        ops = [
            dist.P2POp(dist.isend, send, (rank + 1) % world, group),
            dist.P2POp(dist.irecv, recv, (rank - 1) % world, group),
        ]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        samples.append(_BANDWIDTH_BYTES / max(time.perf_counter() - start, 1e-9))
    return statistics.median(samples)


def _prepare_restore(trainer, strategy) -> None:
    """What a recovery does after the rebuild before loading state (optimizer state created,
    registry refreshed)."""
    from megatron_moevement.state.optim_view import ensure_optimizer_state

    ensure_optimizer_state(trainer.optimizer)
    strategy.registry.refresh()


def _detect_s() -> float:
    """The local agent's failure-detection delay: its batching window plus half of each
    polling period (the agent's and the workers'), read from the code that implements them."""
    from megatron_moevement.launch.local import ElasticAgent
    from megatron_moevement.recovery.protocol import POLL_S

    window = inspect.signature(ElasticAgent.__init__).parameters["batch_window_s"].default
    return float(window) + 0.5 * (POLL_S + POLL_S)  # the agent's and the workers' polls


def run_profile(spec) -> None:
    """Profiles the harness job of ``spec`` (see the module docstring)."""
    import torch.distributed as dist

    from megatron_moevement.baselines import build_strategy
    from megatron_moevement.config import MoEvementConfig
    from megatron_moevement.harness.layout import ParallelLayout
    from megatron_moevement.harness.model import TinyMoEConfig
    from megatron_moevement.harness.trainer import HarnessTrainer
    from megatron_moevement.profiler.aggregate import (
        Measurements,
        RankTimings,
        build_stage_profile,
    )
    from megatron_moevement.profiler.timers import PhaseTimer, TrainerTimers
    from megatron_moevement.state.operators import OperatorRegistry

    options = dict(spec.moevement)
    warmup = int(options.get("warmup", 3))
    config = MoEvementConfig.from_dict(options.get("config", {}))
    layout = ParallelLayout(**spec.layout)
    model_cfg = TinyMoEConfig.from_dict(spec.model)
    m, n = model_cfg.num_microbatches, spec.iterations
    rank = dist.get_rank()

    trainer = HarnessTrainer(model_cfg, layout)
    timers = TrainerTimers(trainer, PhaseTimer())
    timers.enabled = False
    for it in range(warmup):
        timers.train_iteration(it)
    registry = OperatorRegistry(
        trainer.gpt_model, trainer.optimizer, trainer.ep_rank, model_cfg.num_experts
    )
    timers.enabled = True
    timers.train_iteration(warmup)  # one untimed instrumented iteration (first-call costs)
    plain, normal_calls, frozen_calls = _measure_rounds(trainer, timers, registry, warmup + 1, n)
    timers.uninstall()
    plain_t = torch.tensor(plain, dtype=torch.float64)
    dist.all_reduce(plain_t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    iteration_s = float(plain_t.mean())
    logger.info("fault-free iteration %.4f s (mean of %d)", iteration_s, n)
    normal = _phase_totals(normal_calls, n, m)
    frozen = _phase_totals(frozen_calls, n, m)

    snapshot_bw = _snapshot_bandwidth(config.checksum)
    start = time.perf_counter()
    group = dist.new_group(backend="gloo")
    group_init = time.perf_counter() - start
    replication_bw = _replication_bandwidth(group)

    dist.barrier()
    start = time.perf_counter()
    rebuilt = HarnessTrainer(model_cfg, layout)
    strategy = build_strategy(
        options.get("strategy", "moevement"),
        rebuilt.gpt_model,
        rebuilt.optimizer,
        config,
        options.get("baseline"),
    )
    rebuilt.p2p_communicator = strategy.p2p_communicator
    rebuilt.pg_collection = strategy.pg_collection
    _prepare_restore(rebuilt, strategy)
    rebuild = time.perf_counter() - start
    # The first iteration of a rebuilt job pays first-touch costs a steady iteration does not.
    next_it = warmup + 1 + 2 * n
    start = time.perf_counter()
    rebuilt.train_iteration(next_it)
    strategy.after_optimizer_step(next_it)
    first_after = time.perf_counter() - start
    start = time.perf_counter()
    rebuilt.train_iteration(next_it + 1)
    strategy.after_optimizer_step(next_it + 1)
    second_after = time.perf_counter() - start
    strategy.shutdown()

    local = dict(
        timings=RankTimings(
            rank=rank, stage=trainer.pp_rank, normal=normal, frozen=frozen
        ).to_dict(),
        snapshot_bw=snapshot_bw,
        replication_bw=replication_bw,
        group_init=group_init,
        rebuild=rebuild,
        first_after_rebuild=first_after,
        second_after_rebuild=second_after,
    )
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    if rank != 0:
        return
    measurements = Measurements(
        iteration_s=iteration_s,
        snapshot_bandwidth=statistics.median(g["snapshot_bw"] for g in gathered),
        replication_bandwidth=statistics.median(g["replication_bw"] for g in gathered),
        rebuild_s=max(g["rebuild"] for g in gathered),
        group_init_s=max(g["group_init"] for g in gathered),
        detect_s=_detect_s(),
        resume_s=max(
            0.0,
            max(g["first_after_rebuild"] for g in gathered)
            - max(g["second_after_rebuild"] for g in gathered),
        ),
        extra=dict(
            iteration_samples_s=plain_t.tolist(),
            per_rank=[{k: v for k, v in g.items() if k != "timings"} for g in gathered],
        ),
    )
    ranks = [RankTimings.from_dict(g["timings"]) for g in gathered]
    profile = build_stage_profile(
        ranks,
        model_cfg.micro_batch_size,
        model_cfg.seq_length,
        metadata=dict(
            device="cpu",
            tool="megatron_moevement.profiler",
            torch=torch.__version__,
            layout=layout.to_dict(),
            model=model_cfg.to_dict(),
            checkpoint_config=config.to_dict(),
            measurements=measurements.to_dict(),
            rank_timings=[r.to_dict() for r in ranks],
        ),
    )
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(profile.to_dict(), indent=1) + "\n")
    logger.info("wrote %s", out / "profile.json")
