"""Harness jobs ``durable_save_check`` and ``durable_verify_check``: the durable tier end to end.

``durable_save_check``
    Trains ``spec.iterations`` iterations with MoEvement and the periodic durable saver
    (``durable_dir``/``durable_interval`` in ``spec.moevement``), records the fault-free state at
    ``reference_iterations``, saves through Megatron's asynchronous path
    (``async_sharded_save=True`` + ``AsyncCallsQueue``) after iteration ``async_after`` into
    ``async_dir`` and, at the end, synchronously with ``sharded_strategy=("moevement", 1)`` into
    ``sync_dir``.
``durable_verify_check``
    In fresh processes: optionally loads a converted dense checkpoint (``dense_dir``) with plain
    Megatron-Core ``dist_checkpointing.load`` (torch_dist) into a new model and optimizer, before
    anything of the durable tier is imported; then, for each of ``checks``, loads a durable
    checkpoint with a plain ``dist_checkpointing.load``, replays to ``target`` and compares with
    the reference (optionally trains on to ``continue_to`` and compares again), or records the
    error a check expects. ``no_model`` skips building a model (world-size mismatch checks).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def _diff(state: dict, ref: dict) -> list[str]:
    """Keys whose tensors differ in dtype, shape or any bit (scalars show both values)."""
    if state.keys() != ref.keys():
        return sorted(set(state) ^ set(ref))
    out = []
    for key, want in ref.items():
        got = state[key]
        if got.dtype != want.dtype or got.shape != want.shape:
            out.append(f"{key}: {got.dtype}{tuple(got.shape)} != {want.dtype}{tuple(want.shape)}")
        elif not torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)):
            out.append(f"{key}: {got.item()} != {want.item()}" if want.numel() == 1 else key)
    return out


def _reference(ref_dir: str, iteration: int, rank: int) -> dict:
    return torch.load(Path(ref_dir) / f"reference_it{iteration}_rank{rank}.pt")


def run_durable_save_check(spec) -> None:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    from megatron_moevement.config import MoEvementConfig
    from megatron_moevement.durable import moevement_sharded_state_dict
    from megatron_moevement.harness.layout import ParallelLayout
    from megatron_moevement.harness.model import TinyMoEConfig
    from megatron_moevement.harness.trainer import HarnessTrainer, replay_job_metadata
    from megatron_moevement.strategy import MoEvementStrategy

    opts = dict(spec.moevement)
    refs = set(opts.pop("reference_iterations", []))
    sync_dir = opts.pop("sync_dir", None)
    async_dir = opts.pop("async_dir", None)
    async_after = opts.pop("async_after", None)
    trainer = HarnessTrainer(TinyMoEConfig.from_dict(spec.model), ParallelLayout(**spec.layout))
    strategy = MoEvementStrategy(
        trainer.gpt_model, trainer.optimizer, MoEvementConfig.from_dict(opts)
    )
    strategy.durable.metadata["job"] = replay_job_metadata(trainer.model_config, trainer.layout)
    rank = dist.get_rank()
    out = Path(spec.output_dir)
    queue = AsyncCallsQueue()
    for it in range(spec.iterations):
        trainer.train_iteration(it)
        strategy.after_optimizer_step(it)
        if it in refs:
            torch.save(trainer.capture_state(), out / f"reference_it{it}_rank{rank}.pt")
        if async_dir and it == async_after:
            Path(async_dir).mkdir(parents=True, exist_ok=True)
            dist.barrier()
            request = dist_checkpointing.save(
                {"iteration": it, **moevement_sharded_state_dict()},
                async_dir,
                sharded_strategy=("moevement", 1),
                async_sharded_save=True,
            )
            queue.schedule_async_request(request)
    queue.maybe_finalize_async_calls(blocking=True)
    queue.close()
    if sync_dir:
        Path(sync_dir).mkdir(parents=True, exist_ok=True)
        dist.barrier()
        dist_checkpointing.save(
            {"iteration": spec.iterations - 1, **moevement_sharded_state_dict(strategy)},
            sync_dir,
            sharded_strategy=("moevement", 1),
        )
    saver = strategy.durable.saver
    strategy.shutdown()
    result = dict(
        rank=rank,
        completed=[str(p) for p in saver.completed] if saver else [],
        errors=[str(e) for e in saver.errors] if saver else [],
    )
    (out / f"save_rank{rank}.json").write_text(json.dumps(result, indent=1))


def _load_dense_plain(trainer, dense_dir: str, with_optimizer: bool) -> dict:
    """Plain Megatron-Core: torch_dist load into a fresh model and optimizer."""
    from megatron.core import dist_checkpointing

    metadata = dist_checkpointing.load_content_metadata(dense_dir)
    model_sd = trainer.gpt_model.sharded_state_dict(metadata=metadata)
    request = {"model": model_sd}
    if with_optimizer:
        # Megatron 0.16.1 without TE/Apex: a fresh DistributedOptimizer has no Adam "step" yet and
        # its state_dict() asserts on it; Megatron's own dummy-state initialization creates it.
        for leaf in getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer]):
            if hasattr(leaf, "_init_optimizer_states_with_dummy_values"):
                leaf._init_optimizer_states_with_dummy_values()
        request["optimizer"] = trainer.optimizer.sharded_state_dict(
            model_sd, is_loading=True, metadata=metadata
        )
    backend = json.loads((Path(dense_dir) / "metadata.json").read_text())["sharded_backend"]
    loaded = dist_checkpointing.load(request, dense_dir)
    trainer.gpt_model.load_state_dict(loaded["model"])
    if with_optimizer:
        trainer.optimizer.load_state_dict(loaded["optimizer"])
        _repair_torch_adam_steps(trainer.optimizer)
    return dict(backend=backend, iteration=loaded.get("iteration"))


def _repair_torch_adam_steps(optimizer) -> None:
    """Works around Megatron-Core 0.16.1's DistributedOptimizer.load_state_dict on the torch-Adam
    path (no TE/Apex): it sets every parameter's Adam ``step`` to one shared tensor and then
    overwrites it with the *local* (pre-load) per-parameter step. The loaded step is in the
    param groups; give every parameter its own tensor with that value. Any torch_dist checkpoint
    with a distributed optimizer needs this on that path, not only converted ones."""
    for leaf in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not hasattr(leaf, "_init_optimizer_states_with_dummy_values"):
            continue  # not a DistributedOptimizer: its step is restored correctly
        inner = leaf.optimizer
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for param in group["params"]:
                state = inner.state.get(param)
                if state and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)


def run_durable_verify_check(spec) -> None:
    import torch.distributed as dist

    from megatron_moevement.harness.layout import ParallelLayout
    from megatron_moevement.harness.model import TinyMoEConfig
    from megatron_moevement.harness.trainer import HarnessTrainer

    opts = dict(spec.moevement)
    rank = dist.get_rank()
    ref_dir = opts.get("reference_dir")
    result: dict = {"rank": rank, "checks": {}}
    trainer = None
    if not opts.get("no_model"):
        trainer = HarnessTrainer(TinyMoEConfig.from_dict(spec.model), ParallelLayout(**spec.layout))
    if opts.get("dense_dir"):
        durable_before = "megatron_moevement.durable" in sys.modules
        info = _load_dense_plain(trainer, opts["dense_dir"], opts.get("dense_optimizer", True))
        state = trainer.capture_state()
        ref = _reference(ref_dir, opts["dense_reference"], rank)
        if not opts.get("dense_optimizer", True):
            state = {k: v for k, v in state.items() if k.startswith("param/")}
            ref = {k: v for k, v in ref.items() if k.startswith("param/")}
        result["dense"] = dict(
            info, durable_imported=durable_before, tensors=len(ref), mismatches=_diff(state, ref)
        )
        # The durable checks start from a fresh model too.
        del trainer
        trainer = HarnessTrainer(TinyMoEConfig.from_dict(spec.model), ParallelLayout(**spec.layout))

    from megatron.core import dist_checkpointing

    from megatron_moevement.config import MoEvementConfig
    from megatron_moevement.durable import moevement_sharded_state_dict
    from megatron_moevement.strategy import MoEvementStrategy

    strategy = None
    if trainer is not None:
        config = {
            **dict(
                replication_factor=0,
                upstream_logging=False,
                iteration_time_s=1.0,
                d2h_bandwidth_bytes_per_s=1e10,
            ),
            **opts.get("config", {}),
        }
        strategy = MoEvementStrategy(
            trainer.gpt_model, trainer.optimizer, MoEvementConfig.from_dict(config)
        )
    for check in opts.get("checks", []):
        name = check["name"]
        entry: dict = {}
        try:
            loaded = dist_checkpointing.load(moevement_sharded_state_dict(strategy), check["dir"])
            state = loaded["moevement"]
            entry.update(
                iteration=state.iteration,
                window_start=state.window_start,
                window_end=state.window_end,
                common_iteration=loaded.get("iteration"),
            )
            if strategy is not None:
                report = state.restore(strategy, trainer.train_iteration, check.get("target"))
                entry["replayed"] = report.iterations_replayed
                entry["frozen"] = report.frozen_operators
                target = report.target_iteration
                entry["target"] = target
                entry["mismatches"] = _diff(
                    trainer.capture_state(), _reference(ref_dir, target, rank)
                )
                for it in range(target + 1, check.get("continue_to", target) + 1):
                    trainer.train_iteration(it)
                    strategy.after_optimizer_step(it)
                if check.get("continue_to"):
                    entry["continued_mismatches"] = _diff(
                        trainer.capture_state(), _reference(ref_dir, check["continue_to"], rank)
                    )
        except Exception as exc:  # the test decides whether this was expected
            entry["error"] = type(exc).__name__
            entry["message"] = str(exc)
        result["checks"][name] = entry
    if strategy is not None:
        strategy.shutdown()
    (Path(spec.output_dir) / f"verify_rank{rank}.json").write_text(json.dumps(result, indent=1))
