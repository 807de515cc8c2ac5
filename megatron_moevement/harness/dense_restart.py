"""Harness jobs for the restart baseline: a dense on-disk checkpoint, and a restart from it.

``dense_save``: train ``iterations`` iterations and write every tensor of each rank's training
state (``capture_state`` layout) with ``torch.save`` — what a CheckFreq-style durable tier holds.
``dense_restart``: a fresh job loads those files into a newly built model and optimizer (timed)
and recomputes iterations ``moevement["resume_from"] .. iterations-1``; it writes the load and
recompute times.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def _build(spec):
    from megatron_moevement.harness.layout import ParallelLayout
    from megatron_moevement.harness.model import TinyMoEConfig
    from megatron_moevement.harness.trainer import HarnessTrainer

    return HarnessTrainer(TinyMoEConfig.from_dict(spec.model), ParallelLayout(**spec.layout))


def run_dense_save(spec) -> None:
    import torch.distributed as dist

    trainer = _build(spec)
    for it in range(spec.iterations):
        trainer.train_iteration(it)
    path = Path(spec.moevement["checkpoint_dir"])
    path.mkdir(parents=True, exist_ok=True)
    torch.save(trainer.capture_state(), path / f"dense_rank{dist.get_rank()}.pt")


def run_dense_restart(spec) -> None:
    import torch.distributed as dist

    from megatron_moevement.state.optim_view import ensure_optimizer_state
    from megatron_moevement.state.rng import set_rng_state

    t0 = time.perf_counter()
    trainer = _build(spec)
    ensure_optimizer_state(trainer.optimizer)
    t_build = time.perf_counter() - t0
    t1 = time.perf_counter()
    saved = torch.load(Path(spec.moevement["checkpoint_dir"]) / f"dense_rank{dist.get_rank()}.pt")
    live = {}
    for name, param in trainer.named_parameters():
        live[f"param/{name}"] = param
        pstate = trainer.optimizer_view.get(param)
        if pstate is not None and pstate.main_param is not None:
            live[f"main/{name}"] = pstate.main_param
            for key, value in pstate.optimizer_state.items():
                live[f"optim/{name}/{key}"] = value
    for name, buffer in trainer.gpt_model.named_buffers():
        live[f"buffer/{name}"] = buffer
    rng = {k[len("rng/") :]: v for k, v in saved.items() if k.startswith("rng/")}
    missing = sorted(k for k in saved if not k.startswith("rng/") and k not in live)
    if missing:
        raise KeyError(f"the dense checkpoint has state this model lacks: {missing[:5]}")
    with torch.no_grad():
        for key, tensor in saved.items():
            if not key.startswith("rng/"):
                live[key].copy_(tensor)
    set_rng_state(rng)
    t_load = time.perf_counter() - t1
    t2 = time.perf_counter()
    for it in range(spec.moevement["resume_from"], spec.iterations):
        trainer.train_iteration(it)
    t_recompute = time.perf_counter() - t2
    times = torch.tensor([t_build, t_load, t_recompute], dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)
    torch.save(trainer.capture_state(), Path(spec.output_dir) / f"state_rank{dist.get_rank()}.pt")
    if dist.get_rank() == 0:
        (Path(spec.output_dir) / "restart.json").write_text(
            json.dumps(
                dict(build_s=float(times[0]), load_s=float(times[1]), recompute_s=float(times[2]))
            )
        )
