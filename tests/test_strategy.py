"""MoEvementStrategy construction checks that need several processes."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _perturbed_replica_job(out: str) -> None:
    """Rank 1 perturbs one dense and one expert weight, then every rank builds the strategy."""
    import json

    import torch
    import torch.distributed as dist

    from megatron_moevement.config import MoEvementConfig
    from megatron_moevement.harness.layout import ParallelLayout
    from megatron_moevement.harness.model import TinyMoEConfig
    from megatron_moevement.harness.trainer import HarnessTrainer
    from megatron_moevement.snapshot.sharding import ReplicaMismatchError
    from megatron_moevement.strategy import MoEvementStrategy

    dist.init_process_group("gloo")
    trainer = HarnessTrainer(TinyMoEConfig(), ParallelLayout(dp=2))
    MoEvementStrategy(trainer.gpt_model, trainer.optimizer, MoEvementConfig()).shutdown()
    if dist.get_rank() == 1:
        with torch.no_grad():
            trainer.gpt_model.decoder.layers[0].self_attention.linear_proj.weight.add_(1e-3)
    try:
        MoEvementStrategy(trainer.gpt_model, trainer.optimizer, MoEvementConfig())
        message = None
    except ReplicaMismatchError as exc:
        message = str(exc)
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps({"error": message}))
    dist.destroy_process_group()


@pytest.mark.multiproc
def test_diverged_replicas_are_rejected_with_a_fix(tmp_path):
    import json

    from megatron_moevement.launch.local import LocalJob

    with LocalJob(
        2, "tests.test_strategy", [str(tmp_path)], log_dir=tmp_path, env={"PYTHONPATH": str(REPO)}
    ) as job:
        job.check(timeout=120)
    for rank in (0, 1):
        error = json.loads((tmp_path / f"rank{rank}.json").read_text())["error"]
        assert error is not None, f"rank {rank} accepted diverged replicas"
        assert "layer0.dense" in error and "seed every rank identically" in error


if __name__ == "__main__":
    _perturbed_replica_job(sys.argv[1])
