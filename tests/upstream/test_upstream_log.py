"""Upstream logging: each stage's host log holds exactly what its neighbours received."""

import json

import pytest
import torch

from megatron_moevement.upstream.communicator import check_schedule_supported
from megatron_moevement.upstream.log import ACTIVATION, GRADIENT, UpstreamLog, UpstreamLogError
from tests.conftest import LAYOUTS


@pytest.mark.multiproc
def test_logs_match_what_neighbours_received(run_job):
    out = run_job(
        "up",
        job="upstream_check",
        layout=LAYOUTS["pp2xdp2xep2"],
        model=dict(precision="bf16", use_distributed_optimizer=True),
        iterations=8,
        moevement=dict(window_size=3, replication_factor=1),
    )
    reps = [json.loads((out / f"upstream_rank{r}.json").read_text()) for r in range(4)]
    by_stage = {(r["pp_rank"], r["dp_rank"]): r for r in reps}
    checked = 0
    for dp in range(2):
        first, last = by_stage[(0, dp)], by_stage[(1, dp)]
        # Forward: stage 0 logged what stage 1's decoder received as input.
        assert first["logged"][ACTIVATION] and not first["logged"][GRADIENT]
        for key, digest in first["logged"][ACTIVATION].items():
            assert last["received"]["activation"][key] == digest
            checked += 1
        # Backward: stage 1 logged the input gradients stage 0's output received.
        assert last["logged"][GRADIENT] and not last["logged"][ACTIVATION]
        for key, digest in last["logged"][GRADIENT].items():
            assert first["received"]["gradient"][key] == digest
            checked += 1
    assert checked >= 2 * 2 * 4 * 2  # dp x directions x microbatches x retained iterations
    for rep in reps:
        # Entries older than the oldest kept sparse checkpoint are freed.
        iterations = {int(k.split("/")[0]) for d in rep["logged"].values() for k in d}
        assert min(iterations) >= rep["persisted_start"]
        assert rep["memory"]["upstream_log"] == rep["nbytes"] > 0


def test_bound_missing_entries_and_gc_are_explicit():
    log = UpstreamLog(max_bytes=3 * 64)
    for it in range(3):
        log.put(ACTIVATION, it, 0, torch.ones(16))  # 64 bytes each
    with pytest.raises(UpstreamLogError, match="bound"):
        log.put(ACTIVATION, 3, 0, torch.ones(16))
    log.discard_before(2)
    assert log.keys() == [(ACTIVATION, 2, 0)] and log.nbytes == 64
    log.put(GRADIENT, 3, 1, torch.full((16,), 2.0))
    assert torch.equal(log.get(GRADIENT, 3, 1), torch.full((16,), 2.0))
    with pytest.raises(UpstreamLogError, match="global rollback"):
        log.get(ACTIVATION, 0, 0)


def test_interleaved_schedule_is_rejected_clearly():
    class Cfg:
        virtual_pipeline_model_parallel_size = 2

    with pytest.raises(UpstreamLogError, match="interleaved"):
        check_schedule_supported(Cfg())
