"""Harness job ``replay_check``: sparse-to-dense conversion against the fault-free trajectory.

1. Train ``iterations`` iterations with MoEvement, recording the live state after every step.
2. Scramble every parameter, main parameter and optimizer tensor (nothing may leak from the live
   state), roll back to the persisted sparse checkpoint and convert it to dense (replay to the
   window's last iteration); compare with the recorded state there.
3. Scramble again, roll back and replay to the last trained iteration; compare.
4. Optionally (``replay_without_log``) do 3 with the grad norm recomputed from partial gradients,
   which must diverge; then redo it properly.
5. Keep training ``extra_iterations`` more iterations; the test compares the final state with a
   fault-free run's.

During replays a probe checks that frozen operators get no gradient writes at all.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_moevement.harness.snapshot_check import _live_state
from megatron_moevement.state.rng import rng_state, set_rng_state


def _scramble(registry, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for key, tensor in _live_state(registry).items():
        del tensor
    registry.refresh()
    from megatron_moevement.state.operators import operator_tensors

    with torch.no_grad():
        for op in registry.operators:
            for _, live in operator_tensors(op, ("compute", "main", "optim")):
                noise = torch.randn(live.shape, generator=gen).to(live.dtype)
                live.copy_(noise)
    # The generators too: replay must bring back the ones the original run drew from.
    scrambled = {
        name: torch.Generator().manual_seed(seed * 7919 + i).get_state()
        for i, name in enumerate(rng_state())
    }
    set_rng_state(scrambled)


def _diff(state, ref) -> list[str]:
    return [
        k
        for k in ref
        if not torch.equal(
            state[k].reshape(-1).view(torch.uint8), ref[k].reshape(-1).view(torch.uint8)
        )
    ]


def run_replay_check(spec) -> None:
    import torch.distributed as dist

    from megatron_moevement.config import MoEvementConfig
    from megatron_moevement.harness.layout import ParallelLayout
    from megatron_moevement.harness.model import TinyMoEConfig
    from megatron_moevement.harness.trainer import HarnessTrainer
    from megatron_moevement.strategy import MoEvementStrategy

    fields = dict(spec.moevement)
    extra = fields.pop("extra_iterations", 2)
    without_log = fields.pop("replay_without_log", False)
    layout = ParallelLayout(**spec.layout)
    trainer = HarnessTrainer(TinyMoEConfig.from_dict(spec.model), layout)
    strategy = MoEvementStrategy(
        trainer.gpt_model, trainer.optimizer, MoEvementConfig.from_dict(fields)
    )
    registry = strategy.registry
    ref = {}
    last = spec.iterations - 1
    for it in range(spec.iterations):
        trainer.train_iteration(it)
        strategy.after_optimizer_step(it)
        ref[it] = trainer.capture_state()
    strategy.flush()
    ckpt = strategy.persisted_checkpoint
    dense_at = ckpt.start_iteration + ckpt.window_size - 1

    probe = {"frozen_checked": 0, "frozen_grad_writes": 0, "active_with_grads": 0}

    def replay_probe(iteration, frozen_mains):
        frozen_ids = {id(m) for m in frozen_mains}
        for op in registry.operators:
            for p in op.params:
                main_grad = getattr(p.param, "main_grad", None)
                is_frozen = p.state is not None and id(p.state.main_param) in frozen_ids
                if is_frozen:
                    probe["frozen_checked"] += 1
                    wrote = p.param.grad is not None or (
                        main_grad is not None and bool(torch.count_nonzero(main_grad))
                    )
                    probe["frozen_grad_writes"] += int(wrote)
                elif main_grad is not None and bool(torch.count_nonzero(main_grad)):
                    probe["active_with_grads"] += 1

    strategy.replay.probe = replay_probe
    result = {
        "rank": dist.get_rank(),
        "window": ckpt.window,
        "start": ckpt.start_iteration,
        "window_size": ckpt.window_size,
        "dense_at": dense_at,
        "target": last,
    }

    _scramble(registry, 1)
    result["conversion"] = strategy.rollback_and_replay(
        dense_at, trainer.train_iteration, ckpt
    ).to_dict()
    result["dense_mismatches"] = _diff(trainer.capture_state(), ref[dense_at])

    if without_log:
        strategy.replay.use_logged_norm = False
        _scramble(registry, 2)
        strategy.rollback_and_replay(last, trainer.train_iteration, ckpt)
        result["no_log_mismatches"] = len(_diff(trainer.capture_state(), ref[last]))
        strategy.replay.use_logged_norm = True

    _scramble(registry, 3)
    result["replay"] = strategy.rollback_and_replay(last, trainer.train_iteration, ckpt).to_dict()
    result["target_mismatches"] = _diff(trainer.capture_state(), ref[last])
    strategy.replay.probe = None
    result["probe"] = probe

    for it in range(spec.iterations, spec.iterations + extra):
        trainer.train_iteration(it)
        strategy.after_optimizer_step(it)
    strategy.shutdown()
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank()
    torch.save(trainer.capture_state(), out / f"state_rank{rank}.pt")
    (out / f"replay_rank{rank}.json").write_text(json.dumps(result, indent=1))
