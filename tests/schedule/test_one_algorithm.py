"""Algorithm 1 exists once: the strategy's scheduler and the simulator choose the same window
and cut the same slices for the same operator sizes and budget."""

from dataclasses import dataclass

import numpy as np
import pytest

from megatron_moevement.schedule.window import (
    SlotCost,
    find_window_size,
    least_stall_window,
    partition_operators,
)
from megatron_moevement.sim.operators import KIND_EXPERT, StageOperators
from megatron_moevement.sim.specs import Precision
from megatron_moevement.sim.window import job_windows

PRECISION = Precision()  # 2-byte compute weights, 4 + 8 bytes of full state per parameter


@dataclass
class Op:
    name: str
    kind: str
    layer: int
    expert: int
    compute_bytes: int
    full_state_bytes: int


def _both(params, budget_bytes, bandwidth=1e9):
    ops = [
        Op(f"layer0.expert{i}", "expert", 0, i, int(2 * p), int(12 * p))
        for i, p in enumerate(params)
    ]
    stage = StageOperators(
        stage=0,
        labels=tuple(op.name for op in ops),
        params=np.asarray(params, dtype=np.float64),
        activation=np.arange(len(params), dtype=np.float64),  # already in snapshot order
        kind=np.full(len(params), KIND_EXPERT),
        wgrad_work=np.asarray(params, dtype=np.float64),
    )
    budget_s = budget_bytes / bandwidth
    [sim] = job_windows([stage], PRECISION, 1.0, bandwidth, budget_s, max_window=len(ops))
    return ops, sim, budget_s, bandwidth


@pytest.mark.parametrize("seed", range(8))
def test_scheduler_and_simulator_agree_on_window_and_slices(seed):
    rng = np.random.default_rng(seed)
    params = rng.integers(1_000, 50_000, size=int(rng.integers(4, 40))).tolist()
    total_full = 12 * sum(params)
    budget = float(rng.uniform(0.15, 0.9)) * total_full
    ops, sim, budget_s, bandwidth = _both(params, budget)
    w = find_window_size(ops, budget_s, bandwidth)
    assert sim.window == w
    slices = partition_operators(ops, w)
    expected = np.concatenate([np.full(len(s), k) for k, s in enumerate(slices)])
    assert np.array_equal(sim.slot_of_operator, expected)
    assert sim.fits


def test_when_nothing_fits_both_take_the_least_stalling_window():
    params = [100_000, 10, 10, 10]  # the first operator alone exceeds the budget
    ops, sim, _, _ = _both(params, budget_bytes=12 * 1_000)
    cost = SlotCost([op.full_state_bytes for op in ops], [op.compute_bytes for op in ops])
    assert sim.window == least_stall_window(cost) and not sim.fits
