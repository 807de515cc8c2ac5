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


def _synchronous_snapshot_job(out: str) -> None:
    """One rank, snapshot_async off: every slot is copied and sealed before
    after_optimizer_step returns, on the training thread."""
    import json

    import torch.distributed as dist

    from megatron_moevement.config import MoEvementConfig
    from megatron_moevement.harness.layout import ParallelLayout
    from megatron_moevement.harness.model import TinyMoEConfig
    from megatron_moevement.harness.trainer import HarnessTrainer
    from megatron_moevement.strategy import MoEvementStrategy

    dist.init_process_group("gloo")
    trainer = HarnessTrainer(TinyMoEConfig(), ParallelLayout())
    results = {}
    for flag in (False, True):
        strategy = MoEvementStrategy(
            trainer.gpt_model,
            trainer.optimizer,
            MoEvementConfig(window_size=2, snapshot_async=flag, replication_factor=0),
        )
        ready = []
        for it in range(3):
            trainer.train_iteration(it)
            strategy.after_optimizer_step(it)
            slot = [s for s in strategy.checkpoints[-1].slots if s is not None][-1]
            ready.append(slot.ready.is_set())
        strategy.flush()
        results[str(flag)] = dict(
            ready_on_return=ready,
            sealed=all(
                r.checksum
                for c in strategy.checkpoints
                for s in c.slots
                if s
                for r in s.records.values()
            ),
        )
        strategy.shutdown()
    Path(out, "sync.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.mark.multiproc
def test_synchronous_snapshots_are_complete_when_after_optimizer_step_returns(tmp_path):
    import json

    from megatron_moevement.launch.local import LocalJob

    with LocalJob(
        1,
        "tests.test_strategy",
        ["sync", str(tmp_path)],
        log_dir=tmp_path,
        env={"PYTHONPATH": str(REPO)},
    ) as job:
        job.check(timeout=120)
    results = json.loads((tmp_path / "sync.json").read_text())
    assert results["False"]["ready_on_return"] == [True, True, True]
    assert results["False"]["sealed"] and results["True"]["sealed"]


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
    if sys.argv[1] == "sync":
        _synchronous_snapshot_job(sys.argv[2])
    else:
        _perturbed_replica_job(sys.argv[1])
