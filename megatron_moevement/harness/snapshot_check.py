"""Harness job ``snapshot_check``: train with MoEvement and audit every snapshot on the way.

At every iteration, after the optimizer step and the strategy's capture, the job separately
records the live state of every operator (a synchronous copy, independent of the snapshot engine).
At the end it checks, bit for bit, that each retained slot holds the live state of its iteration;
it records which operators each slot captured with full state and which with compute weights, the
hashes of its own slots and of the replicas it holds (so a test can compare replica and owner
across ranks), how host memory evolved, and that a corrupted byte is detected.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from megatron_moevement.logging_utils import get_logger
from megatron_moevement.state.rng import RNG_PREFIX, rng_state

logger = get_logger(__name__)


def _live_state(registry) -> dict[str, torch.Tensor]:
    from megatron_moevement.state.operators import operator_tensors

    registry.refresh()
    out = {}
    for op in registry.operators:
        for key, tensor in operator_tensors(op, ("compute", "main", "optim")):
            out[key] = tensor.clone()
    return out


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _slot_hashes(slot) -> dict[str, str]:
    return {key: _sha(slot.tensor(key)) for key in sorted(slot.keys())}


def run_snapshot_check(spec) -> None:
    import torch.distributed as dist

    from megatron_moevement.config import MoEvementConfig
    from megatron_moevement.harness.layout import ParallelLayout
    from megatron_moevement.harness.model import TinyMoEConfig
    from megatron_moevement.harness.trainer import HarnessTrainer
    from megatron_moevement.snapshot.checksum import SnapshotChecksumError
    from megatron_moevement.strategy import MoEvementStrategy

    layout = ParallelLayout(**spec.layout)
    model_cfg = TinyMoEConfig.from_dict(spec.model)
    trainer = HarnessTrainer(model_cfg, layout)
    config = MoEvementConfig.from_dict(spec.moevement)
    strategy = MoEvementStrategy(trainer.gpt_model, trainer.optimizer, config)

    live: dict[int, dict[str, torch.Tensor]] = {}
    memory = []
    for it in range(spec.iterations):
        trainer.train_iteration(it)
        strategy.after_optimizer_step(it)
        live[it] = _live_state(strategy.registry)
        live[it].update({RNG_PREFIX + k: v for k, v in rng_state().items()})
        memory.append(strategy.host_memory_bytes())
    strategy.flush()

    rank = dist.get_rank()
    mismatches: list[str] = []
    windows = []
    for ckpt in strategy.checkpoints:
        slots = []
        for slot in ckpt.slots:
            if slot is None:
                continue
            slot.verify()
            for key in slot.keys():
                stored = slot.tensor(key)
                ref = live[slot.iteration][key]
                if not torch.equal(
                    stored.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8)
                ):
                    mismatches.append(f"window {ckpt.window} slot {slot.slot} {key}")
            slots.append(
                dict(
                    slot=slot.slot,
                    iteration=slot.iteration,
                    full_state_ops=list(slot.full_state_ops),
                    compute_ops=list(slot.compute_ops),
                    hashes=_slot_hashes(slot),
                )
            )
        windows.append(
            dict(
                generation=ckpt.window,
                start=ckpt.start_iteration,
                window_size=ckpt.window_size,
                persisted=ckpt.persisted,
                slices=ckpt.schedule["slices"],
                slots=slots,
            )
        )

    replicas = []
    for source, store in strategy.replicator.replicas.items():
        for generation, slots in store.windows.items():
            for slot in slots:
                if slot is None:
                    continue
                slot.verify()
                replicas.append(
                    dict(
                        source=source,
                        generation=generation,
                        slot=slot.slot,
                        hashes=_slot_hashes(slot),
                    )
                )

    # Corruption is detected with a clear error (on a private copy of a slot).
    corruption_message = None
    newest = strategy.checkpoints[-1].slots[0]
    if newest is not None and newest.records:
        from megatron_moevement.snapshot.slots import SlotSnapshot

        damaged = SlotSnapshot.from_manifest(newest.manifest(), newest.buffer.clone())
        first = next(iter(damaged.records.values()))
        damaged.buffer[first.offset] ^= 0xFF
        try:
            damaged.verify()
        except SnapshotChecksumError as exc:
            corruption_message = str(exc)

    report = dict(
        rank=rank,
        pp_rank=trainer.pp_rank,
        dp_rank=trainer.dp_rank,
        registry_operators=[op.name for op in strategy.registry.operators],
        full_state_plan=sorted(strategy.shard_plan.full_state),
        compute_plan=sorted(strategy.shard_plan.compute),
        peers=strategy.replicator.peers,
        sources=strategy.replicator.sources,
        mismatches=mismatches,
        windows=windows,
        replicas=replicas,
        memory=memory,
        pool_allocations=strategy.engine.pool.allocations,
        windows_started=strategy.windows_started,
        corruption_message=corruption_message,
        schedule=strategy.policy.scheduler.schedule.to_dict(),
    )
    strategy.shutdown()
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"snapshot_rank{rank}.json").write_text(json.dumps(report, indent=1))
