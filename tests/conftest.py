"""Shared fixtures: running real multi-process Megatron-Core jobs on the local harness."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_moevement.harness.launcher import run_worker_job
from megatron_moevement.harness.worker import WorkerSpec

# Generous per-job limit: a 4-rank job takes ~15 s on 2 cores; the limit only guards hangs.
JOB_TIMEOUT_S = 240

LAYOUTS = {
    "single": dict(pp=1, dp=1, ep=1),
    "ep2": dict(pp=1, dp=2, ep=2),
    "pp2": dict(pp=2, dp=1, ep=1),
    "pp2xdp2xep2": dict(pp=2, dp=2, ep=2),
}


def load_states(out: Path, world_size: int) -> list[dict[str, torch.Tensor]]:
    """The ``capture_state()`` dumps of every rank of a finished job."""
    return [torch.load(out / f"state_rank{r}.pt") for r in range(world_size)]


def assert_states_bitwise_equal(a: list[dict], b: list[dict]) -> int:
    """Asserts two jobs' states hold the same tensors, bit for bit; returns the tensor count."""
    assert len(a) == len(b)
    count = 0
    for rank, (sa, sb) in enumerate(zip(a, b)):
        assert sa.keys() == sb.keys(), f"rank {rank}: different tensor sets"
        for key in sa:
            ta, tb = sa[key], sb[key]
            assert ta.dtype == tb.dtype and ta.shape == tb.shape, f"rank {rank} {key}"
            # Compare raw bytes: exact, and NaN-safe.
            assert torch.equal(
                ta.reshape(-1).view(torch.uint8), tb.reshape(-1).view(torch.uint8)
            ), f"rank {rank}: {key} differs"
            count += 1
    return count


@pytest.fixture
def run_job(tmp_path):
    """Runs a worker job in ``tmp_path/<name>`` and returns that folder."""

    def _run(name: str, **spec_fields) -> Path:
        spec = WorkerSpec(**spec_fields)
        out = tmp_path / name
        run_worker_job(spec, out, timeout=JOB_TIMEOUT_S)
        return out

    return _run


# The recovery tests' reference: PP2 x DP2 x EP2, bf16 + distributed optimizer, 10 iterations.
RESILIENT_LAYOUT = LAYOUTS["pp2xdp2xep2"]
RESILIENT_MODEL = dict(precision="bf16", use_distributed_optimizer=True)
RESILIENT_ITERATIONS = 10


@pytest.fixture(scope="session")
def fault_free_pp2xdp2xep2(tmp_path_factory):
    """Final states of a fault-free run that the recovery tests (local and SLURM) compare to."""
    out = tmp_path_factory.mktemp("fault_free_pp2xdp2xep2")
    spec = WorkerSpec(
        layout=RESILIENT_LAYOUT, model=RESILIENT_MODEL, iterations=RESILIENT_ITERATIONS
    )
    run_worker_job(spec, out, timeout=300)
    return load_states(out, 4)
