"""Frozen execution across expert-parallel ranks whose frozen sets differ (no deadlock)."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _asymmetric_frozen_job(out: str) -> None:
    """Everything up to layer 0's experts is frozen; rank 0's layer-0 experts are frozen too,
    rank 1's are active, so only rank 1 has weight gradients inside the layer's all-to-alls."""
    from datetime import timedelta

    import torch.distributed as dist

    from megatron_moevement.harness.layout import ParallelLayout
    from megatron_moevement.harness.model import TinyMoEConfig
    from megatron_moevement.harness.trainer import HarnessTrainer
    from megatron_moevement.replay.frozen import frozen_operators
    from megatron_moevement.state.operators import OperatorRegistry

    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    trainer = HarnessTrainer(TinyMoEConfig(), ParallelLayout(dp=2, ep=2))
    registry = OperatorRegistry(
        trainer.gpt_model,
        trainer.optimizer,
        trainer.ep_rank,
        trainer.gpt_model.config.num_moe_experts,
    )
    experts = [op for op in registry.operators if op.kind == "expert" and op.layer == 0]
    frozen = ["embedding", "layer0.dense", "layer0.router"]
    if dist.get_rank() == 0:
        frozen += [op.name for op in experts]
    trainer.train_iteration(0)  # creates optimizer state; the replayed-style iteration follows
    for chunk in trainer.model_chunks:
        chunk.zero_grad_buffer()
    with frozen_operators(registry, frozen):
        trainer.train_iteration(1)
    grads = {
        op.name: any(float(p.param.main_grad.abs().sum()) > 0 for p in op.params) for op in experts
    }
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(grads))
    dist.destroy_process_group()


@pytest.mark.multiproc
def test_expert_ranks_with_different_frozen_sets_do_not_deadlock(tmp_path):
    from megatron_moevement.launch.local import LocalJob

    with LocalJob(
        2,
        "tests.replay.test_frozen_execution",
        [str(tmp_path)],
        log_dir=tmp_path,
        env={"PYTHONPATH": str(REPO)},
    ) as job:
        job.check(timeout=120)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0 and not any(rank0.values()), f"frozen experts got gradients: {rank0}"
    assert rank1 and all(rank1.values()), f"active experts got no gradients: {rank1}"


if __name__ == "__main__":
    _asymmetric_frozen_job(sys.argv[1])
