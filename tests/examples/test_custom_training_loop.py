"""The custom-loop example trains with Megatron-Core directly and replays bit-exactly."""

from pathlib import Path

import pytest

from megatron_moevement.launch.local import LocalJob

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "nprocs,extra",
    [(1, []), (2, []), (4, ["--pp", "2", "--ep", "2"])],
    ids=["single", "ep2", "pp2-ep2"],
)
def test_example_runs_and_replays_bitwise(tmp_path, nprocs, extra):
    job = LocalJob(
        nprocs,
        "examples.custom_training_loop",
        ["--iterations", "8", *extra],
        log_dir=tmp_path,
        env={"PYTHONPATH": str(REPO)},
    )
    with job:
        job.check(timeout=300)
    logs = [(tmp_path / f"proc{i}.log").read_text() for i in range(nprocs)]
    assert any("iteration 7 loss" in log for log in logs)
    for rank, log in enumerate(logs):
        assert (
            f"rank {rank}: replayed iterations [4, 5, 6, 7] from window starting at 3; "
            "parameters bitwise equal: True" in log
        ), log[-2000:]
