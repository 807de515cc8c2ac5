"""Harness job ``upstream_check``: the upstream log holds exactly what the neighbours received.

Stage ``s`` logs the activations it sends downstream and the input-gradients it sends upstream.
Independently, each stage records what it *received*: the input activation its decoder was given
(forward) and the gradient arriving at its output (backward hook). The test matches them across
ranks by (iteration, microbatch) hashes, and checks that old entries are freed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def run_upstream_check(spec) -> None:
    import torch.distributed as dist

    from megatron_moevement.config import MoEvementConfig
    from megatron_moevement.harness.layout import ParallelLayout
    from megatron_moevement.harness.model import TinyMoEConfig
    from megatron_moevement.harness.trainer import HarnessTrainer
    from megatron_moevement.strategy import MoEvementStrategy

    model_cfg = TinyMoEConfig.from_dict(spec.model)
    trainer = HarnessTrainer(model_cfg, ParallelLayout(**spec.layout))
    strategy = MoEvementStrategy(
        trainer.gpt_model, trainer.optimizer, MoEvementConfig.from_dict(spec.moevement)
    )
    trainer.p2p_communicator = strategy.p2p_communicator
    trainer.pg_collection = strategy.pg_collection
    received = {"activation": {}, "gradient": {}}
    state = {"iteration": -1, "fwd": 0, "bwd": 0}
    decoder = trainer.gpt_model.decoder

    def fwd_hook(module, args):
        inp = getattr(module, "input_tensor", None)
        if inp is not None and not trainer.gpt_model.pre_process:
            received["activation"][f"{state['iteration']}/{state['fwd']}"] = _sha(inp)
        state["fwd"] += 1

    def bwd_hook(module, grad_input, grad_output):
        if not trainer.gpt_model.post_process and grad_output[0] is not None:
            received["gradient"][f"{state['iteration']}/{state['bwd']}"] = _sha(grad_output[0])
        state["bwd"] += 1

    decoder.register_forward_pre_hook(fwd_hook)
    decoder.register_full_backward_hook(bwd_hook)
    spans = []
    for it in range(spec.iterations):
        state.update(iteration=it, fwd=0, bwd=0)
        trainer.train_iteration(it)
        strategy.after_optimizer_step(it)
        spans.append(strategy.upstream_log.span())
    strategy.flush()
    log = strategy.upstream_log
    logged = {"activation": {}, "gradient": {}}
    for direction, it, mb in log.keys():
        logged[direction][f"{it}/{mb}"] = _sha(log.get(direction, it, mb))
    rank = dist.get_rank()
    report = dict(
        rank=rank,
        pp_rank=trainer.pp_rank,
        dp_rank=trainer.dp_rank,
        logged=logged,
        received=received,
        spans=spans,
        nbytes=log.nbytes,
        persisted_start=strategy.persisted_checkpoint.start_iteration,
        memory=strategy.host_memory_bytes(),
    )
    strategy.shutdown()
    (Path(spec.output_dir) / f"upstream_rank{rank}.json").write_text(json.dumps(report))
