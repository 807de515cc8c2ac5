"""A warm spare's throwaway iteration leaves no trace in what the spare then builds and trains."""

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _build_and_train(out: str, warm: bool) -> None:
    """Optionally warms up like a spare, then builds the job's model and trains two iterations;
    writes the losses and a checksum of every tensor of training state."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    from megatron_moevement.harness.layout import ParallelLayout
    from megatron_moevement.harness.model import TinyMoEConfig
    from megatron_moevement.harness.resilient import _throwaway_iteration
    from megatron_moevement.harness.trainer import HarnessTrainer
    from megatron_moevement.recovery.warm_spare import warm_up_spare
    from megatron_moevement.runtime import ensure_runtime
    from megatron_moevement.snapshot.checksum import checksum

    ensure_runtime()
    cfg = TinyMoEConfig(precision="bf16", use_distributed_optimizer=True, num_layers=3)
    record = {}
    if warm:
        # Shaped for a rank of PP2 x EP2: fewer layers and experts than the model below.
        record["warm_up_s"] = warm_up_spare(
            lambda: _throwaway_iteration(cfg, ParallelLayout(pp=2, dp=2, ep=2))
        )
        record["left_behind"] = [
            name
            for name, present in (
                ("process group", dist.is_initialized()),
                ("parallel state", parallel_state.model_parallel_is_initialized()),
                ("MoE logging tracker", bool(get_moe_layer_wise_logging_tracker())),
            )
            if present
        ]
    dist.init_process_group("gloo")
    trainer = HarnessTrainer(cfg, ParallelLayout())
    record["losses"] = [trainer.train_iteration(it).loss for it in range(2)]
    # Every tensor of training state (params, main params, optimizer state, buffers, RNG).
    record["state"] = {
        k: checksum(v.detach().contiguous().cpu()) for k, v in trainer.capture_state().items()
    }
    Path(out, f"{'warm' if warm else 'cold'}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


@pytest.mark.multiproc
def test_warm_spare_builds_and_trains_bitwise_like_a_cold_one(tmp_path):
    from megatron_moevement.launch.local import LocalJob

    for mode in ("cold", "warm"):
        with LocalJob(
            1,
            "tests.recovery.test_warm_spare",
            [str(tmp_path), mode],
            log_dir=tmp_path / mode,
            env={"PYTHONPATH": str(REPO)},
        ) as job:
            job.check(timeout=180)
    cold = json.loads((tmp_path / "cold.json").read_text())
    warm = json.loads((tmp_path / "warm.json").read_text())
    assert warm["warm_up_s"] is not None and warm["warm_up_s"] > 0
    assert warm["left_behind"] == []
    assert cold["state"] and warm["state"] == cold["state"]
    assert warm["losses"] == cold["losses"]


def test_a_failed_warm_up_is_logged_and_cleaned_up(caplog):
    import torch.distributed as dist

    from megatron_moevement.recovery.warm_spare import warm_up_spare

    def broken():
        assert dist.get_world_size() == 1  # the private single-process group
        raise RuntimeError("no memory for the throwaway model")

    with caplog.at_level("WARNING", logger="megatron_moevement"):
        assert warm_up_spare(broken) is None
    assert not dist.is_initialized()
    assert "no memory for the throwaway model" in caplog.text and "starts cold" in caplog.text


def test_a_warm_up_that_exits_is_logged_and_cleaned_up(caplog):
    import torch.distributed as dist

    from megatron_moevement.recovery.warm_spare import warm_up_spare

    def exits():
        raise SystemExit(2)  # what Megatron's argument parser does on a bad value

    with caplog.at_level("WARNING", logger="megatron_moevement"):
        assert warm_up_spare(exits) is None
    assert not dist.is_initialized()
    assert "SystemExit" in caplog.text and "starts cold" in caplog.text


def test_warm_up_never_replaces_an_existing_process_group(caplog):
    import torch.distributed as dist

    from megatron_moevement.recovery.warm_spare import warm_up_spare

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ran = []
        with caplog.at_level("WARNING", logger="megatron_moevement"):
            assert warm_up_spare(lambda: ran.append(1)) is None
        assert ran == [] and dist.is_initialized() and "already initialized" in caplog.text
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    _build_and_train(sys.argv[1], sys.argv[2] == "warm")
