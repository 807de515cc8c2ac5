"""The overhead benchmark's copy floor: a bare background copy + checksum of optimizer state."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from megatron_moevement.harness.copy_floor import BareCopyLoad


def _optimizer(sizes=(1000, 300, 50)):
    """A Megatron-like wrapper (``.optimizer``) around a torch Adam that has stepped once."""
    params = [torch.nn.Parameter(torch.randn(n)) for n in sizes]
    adam = torch.optim.Adam(params)
    for p in params:
        p.grad = torch.ones_like(p)
    adam.step()
    return SimpleNamespace(optimizer=adam), params, adam


def test_each_iteration_copies_the_target_bytes_walking_through_the_state():
    wrapper, params, adam = _optimizer()
    # Sources in order: each param, then its exp_avg and exp_avg_sq (step is a 0-d tensor).
    sources = []
    for p in params:
        sources += [p, adam.state[p]["exp_avg"], adam.state[p]["exp_avg_sq"]]
    total = sum(t.numel() * t.element_size() for t in sources)
    load = BareCopyLoad(wrapper, bytes_per_iteration=5000)
    copied = [load.after_optimizer_step() for _ in range(6)]
    load.shutdown()
    assert all(c >= 5000 for c in copied)
    # Whole tensors, so at most one tensor past the target, and the state is walked in a cycle.
    assert all(c < 5000 + 4000 for c in copied)
    assert load.bytes_copied == sum(copied) and sum(copied) > total
    assert load.background_s > 0 and load.stall_s >= 0


def test_the_buffer_holds_the_copied_bytes():
    wrapper, params, _ = _optimizer(sizes=(64,))
    load = BareCopyLoad(wrapper, bytes_per_iteration=1)
    load.after_optimizer_step()  # picks the first tensor: the FP32 parameter itself
    load.shutdown()
    expected = params[0].detach().view(torch.uint8)
    assert torch.equal(load._buffer[: expected.numel()], expected)


def test_bad_input_is_refused():
    wrapper, _, _ = _optimizer()
    with pytest.raises(ValueError, match=">= 0"):
        BareCopyLoad(wrapper, bytes_per_iteration=-1)
    empty = SimpleNamespace(optimizer=torch.optim.Adam([torch.nn.Parameter(torch.empty(0))]))
    with pytest.raises(ValueError, match="no state yet"):
        BareCopyLoad(empty, bytes_per_iteration=10)
    zero = BareCopyLoad(wrapper, bytes_per_iteration=0)
    assert zero.after_optimizer_step() == 0
    zero.shutdown()


@pytest.mark.multiproc
def test_the_overhead_job_runs_the_copy_floor(run_job):
    """``copy_floor`` trains with no strategy and copies the asked bytes per rank per
    iteration; the job reports them summed over ranks, with each rank's background seconds."""
    floor_bytes = 200_000
    out = run_job(
        "floor",
        job="overhead",
        layout=dict(dp=2),
        iterations=3,
        moevement=dict(mode="copy_floor", floor_bytes=floor_bytes),
    )
    data = json.loads((out / "overhead.json").read_text())
    assert data["mode"] == "copy_floor" and data["window_size"] is None
    per_iteration = data["snapshot_bytes_per_iteration"]
    assert len(per_iteration) == 3
    assert all(2 * floor_bytes <= b for b in per_iteration)
    assert [r["background"] > 0 for r in data["floor_seconds_per_rank"]] == [True, True]
