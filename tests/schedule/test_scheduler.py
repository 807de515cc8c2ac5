"""Tests for the sparse checkpointing scheduler (paper Algorithm 1) and ScheduleManager."""

import itertools
import json
import random
from dataclasses import dataclass
from typing import List, Optional

import pytest
import torch

from megatron_moevement.config import MoEvementConfig
from megatron_moevement.schedule.manager import GROW_TOLERANCE, SHRINK_HEADROOM, ScheduleManager
from megatron_moevement.schedule.order import order_operators
from megatron_moevement.schedule.popularity import ExpertPopularity
from megatron_moevement.schedule.sparse_schedule import (
    HostMemoryBudgetError,
    SparseSchedule,
    build_schedule,
)
from megatron_moevement.schedule.window import (
    OperatorLike,
    ScheduleError,
    WindowSizeError,
    compute_slot_bytes,
    find_window_size,
    least_stall_window_size,
    partition_operators,
)


@dataclass
class FakeOp:
    """Minimal stand-in for megatron_moevement.state.operators.Operator."""

    name: str
    kind: str
    layer: Optional[int]
    expert: Optional[int]
    compute_bytes: int
    full_state_bytes: int


def make_model(
    num_layers=2, num_experts=4, expert_params=100, dense_params=300, vocab_params=400, scale=1
) -> List[FakeOp]:
    """2 bytes/param compute weights, 12 bytes/param full state (bf16 + fp32 Adam)."""

    def op(name, kind, layer, expert, params):
        params *= scale
        return FakeOp(name, kind, layer, expert, 2 * params, 12 * params)

    ops = [op("embedding", "embedding", None, None, vocab_params)]
    for layer in range(num_layers):
        ops.append(op(f"layer{layer}.dense", "dense", layer, None, dense_params))
        ops.append(op(f"layer{layer}.router", "router", layer, None, 10))
        for e in range(num_experts):
            ops.append(op(f"layer{layer}.expert{e}", "expert", layer, e, expert_params))
    ops.append(op("output_layer", "output", None, None, vocab_params))
    return ops


def test_fake_op_satisfies_the_protocol():
    assert isinstance(make_model()[0], OperatorLike)


# ------------------------------------------------------------------ FindWindowSize


def test_window_is_one_when_a_dense_snapshot_fits():
    ops = make_model()
    total_full = sum(op.full_state_bytes for op in ops)
    assert find_window_size(ops, 1.0, total_full) == 1
    assert find_window_size(ops, 2.0, total_full / 2) == 1
    assert find_window_size(ops, 1.0, total_full - 1) > 1


BANDWIDTHS = [1e9, 3e4, 2.5e4, 2e4, 1.6e4, 1.3e4]


@pytest.mark.parametrize("ordering_seed", [0, 1, 2])
def test_window_shrinks_monotonically_with_bandwidth(ordering_seed):
    ops = make_model(num_layers=3, num_experts=6)
    random.Random(ordering_seed).shuffle(ops)
    windows = [find_window_size(ops, 1.0, bw) for bw in BANDWIDTHS]
    assert windows == sorted(windows)  # lower bandwidth -> W never smaller
    assert windows[0] == 1 and windows[-1] > 2


@pytest.mark.parametrize("bandwidth", [1.4e4, 1.5e4, 2e4])
def test_window_grows_monotonically_with_model_size(bandwidth):
    by_experts = [
        find_window_size(make_model(num_experts=n), 1.0, bandwidth) for n in (1, 2, 4, 8, 16)
    ]
    assert by_experts == sorted(by_experts) and by_experts[-1] > by_experts[0]
    by_layers = [find_window_size(make_model(num_layers=n), 1.0, bandwidth) for n in (1, 2, 3)]
    assert by_layers == sorted(by_layers) and by_layers[-1] > by_layers[0]


def test_window_grows_with_bytes_per_operator():
    windows = [
        find_window_size(make_model(num_layers=2, num_experts=8, scale=s), 1.0, 4e4)
        for s in (1, 2, 3)
    ]
    assert windows == sorted(windows) and windows[-1] > windows[0]


def _brute_force_min_window(ops, budget):
    n = len(ops)
    for w in range(1, n + 1):
        for cuts in itertools.combinations(range(1, n), w - 1):
            bounds = [0, *cuts, n]
            slices = [ops[a:b] for a, b in zip(bounds, bounds[1:])]
            if max(compute_slot_bytes(slices)) <= budget:
                return w
    return None


@pytest.mark.parametrize("seed", range(6))
def test_window_is_the_smallest_feasible(seed):
    rng = random.Random(seed)
    ops = []
    for i in range(8):
        compute = rng.randint(1, 20)
        ops.append(
            FakeOp(f"layer0.expert{i}", "expert", 0, i, compute, compute * rng.randint(1, 8))
        )
    budget = rng.randint(60, 250)
    expected = _brute_force_min_window(ops, budget)
    if expected is None:
        with pytest.raises(WindowSizeError):
            find_window_size(ops, 1.0, budget)
        return
    assert find_window_size(ops, 1.0, budget) == expected
    slices = partition_operators(ops, expected)
    assert len(slices) == expected and max(compute_slot_bytes(slices)) <= budget


def test_error_when_no_window_fits_says_what_to_change():
    ops = make_model()
    compute_total = sum(op.compute_bytes for op in ops)
    with pytest.raises(WindowSizeError) as info:
        find_window_size(ops, 1.0, compute_total / 2)
    message = str(info.value)
    assert "No sparse checkpoint window fits" in message
    assert "Fix:" in message and "bandwidth" in message and "window_size" in message
    with pytest.raises(ScheduleError, match="iteration_time_s"):
        find_window_size(ops, 0.0, 1e9)
    with pytest.raises(ScheduleError, match="d2h_bandwidth_bytes_per_s"):
        find_window_size(ops, 1.0, -1)


# ------------------------------------------------------------------ slot contents and bytes


def test_slot_bytes_follow_the_documented_formula():
    a = FakeOp("layer0.expert0", "expert", 0, 0, 2, 12)
    b = FakeOp("layer0.expert1", "expert", 0, 1, 2, 12)
    c = FakeOp("layer0.dense", "dense", 0, None, 4, 24)
    slices = [[a], [b, c]]
    # slot 0: full(a) + compute(b, c); slot 1: full(b, c), nothing left to capture
    assert compute_slot_bytes(slices) == [12 + 2 + 4, 12 + 24]
    assert compute_slot_bytes(slices, include_compute_in_full_slot=True) == [14 + 6, 14 + 28]
    schedule = SparseSchedule(
        slices=[["layer0.expert0"], ["layer0.expert1", "layer0.dense"]],
        compute_bytes={o.name: o.compute_bytes for o in (a, b, c)},
        full_state_bytes={o.name: o.full_state_bytes for o in (a, b, c)},
    )
    assert schedule.slot_bytes == [18, 36] and schedule.total_bytes == 54
    assert schedule.full_state_operators(0) == ["layer0.expert0"]
    assert schedule.compute_only_operators(0) == ["layer0.expert1", "layer0.dense"]
    assert schedule.compute_only_operators(1) == []
    assert schedule.host_bytes_required(replication_factor=1) == 54 * 2 * 2


@pytest.mark.parametrize("window", [1, 2, 3, 5, 7])
def test_every_operator_has_exactly_one_full_state_slot(window):
    ops = make_model(num_layers=2, num_experts=3)
    schedule = build_schedule(ops, window_size=window)
    assert schedule.window_size == window
    schedule.validate(ops)
    full_counts = {op.name: 0 for op in ops}
    for k, plan in enumerate(schedule.slots):
        for name in plan.full_state:
            full_counts[name] += 1
        # compute weights only for operators captured later in the window
        later = {n for s in schedule.slices[k + 1 :] for n in s}
        assert set(plan.compute_only) == later
        assert not set(plan.full_state) & set(plan.compute_only)
    assert set(full_counts.values()) == {1}
    assert schedule.slots[-1].compute_only == ()


def test_schedule_validation_rejects_broken_schedules():
    kw = dict(compute_bytes={"a": 1, "b": 1}, full_state_bytes={"a": 6, "b": 6})
    with pytest.raises(ScheduleError, match="exactly one full-state slot"):
        SparseSchedule(slices=[["a", "b"], ["a"]], **kw)
    with pytest.raises(ScheduleError, match="no full-state operator"):
        SparseSchedule(slices=[["a", "b"], []], **kw)
    with pytest.raises(ScheduleError, match="does not match"):
        SparseSchedule(slices=[["a"]], **kw)
    ok = SparseSchedule(slices=[["a"], ["b"]], **kw)
    with pytest.raises(ScheduleError, match="without a full-state slot"):
        ok.validate([FakeOp(n, "dense", 0, None, 1, 6) for n in ("a", "b", "c")])


def test_fixed_window_partition_is_balanced_and_contiguous():
    ops = order_operators(make_model(num_layers=2, num_experts=8))
    slices = partition_operators(ops, 4)
    assert [op.name for s in slices for op in s] == [op.name for op in ops]
    assert all(slices)
    with pytest.raises(ScheduleError, match="window_size"):
        partition_operators(ops, len(ops) + 1)
    with pytest.raises(ScheduleError, match="window_size"):
        partition_operators(ops, 0)


def test_fixed_window_that_does_not_fit_warns(caplog):
    ops = make_model()
    total_full = sum(op.full_state_bytes for op in ops)
    schedule = build_schedule(
        ops, window_size=1, iteration_time_s=1.0, d2h_bandwidth_bytes_per_s=total_full / 4
    )
    assert schedule.fits is False
    assert "does not fit" in caplog.text


def test_auto_window_needs_measurements():
    with pytest.raises(ScheduleError, match="iteration_time_s"):
        build_schedule(make_model(), window_size="auto")


def test_host_memory_budget_is_enforced():
    ops = make_model()
    schedule = build_schedule(ops, window_size=2)
    need = schedule.host_bytes_required(replication_factor=1)
    build_schedule(ops, window_size=2, host_memory_budget_bytes=need)
    with pytest.raises(HostMemoryBudgetError, match="host_memory_budget_bytes"):
        build_schedule(ops, window_size=2, host_memory_budget_bytes=need - 1)


def test_schedule_dict_round_trip_and_describe():
    ops = make_model()
    schedule = build_schedule(
        ops, window_size="auto", iteration_time_s=1.0, d2h_bandwidth_bytes_per_s=2e4
    )
    restored = SparseSchedule.from_dict(json.loads(json.dumps(schedule.to_dict())))
    assert restored == schedule
    text = schedule.describe()
    assert f"W={schedule.window_size}" in text and "slot 0" in text and "fits" in text
    with pytest.raises(ScheduleError, match="unknown keys"):
        SparseSchedule.from_dict({**schedule.to_dict(), "bogus": 1})
    with pytest.raises(ScheduleError, match="format_version"):
        SparseSchedule.from_dict({**schedule.to_dict(), "format_version": 99})


# ------------------------------------------------------------------ OrderOperators


def _popularity(counts_by_layer, soft=None, capacity=None):
    tracker = ExpertPopularity(ema_decay=0.5)
    for layer, counts in counts_by_layer.items():
        tracker.update(
            layer,
            torch.tensor(counts),
            None if soft is None else torch.tensor(soft[layer], dtype=torch.float64),
            None if capacity is None else torch.tensor(capacity[layer]),
        )
    tracker.step()
    return tracker.snapshot()


NON_EXPERT_ORDER = [
    "output_layer",
    "layer1.router",
    "layer1.dense",
    "layer0.router",
    "layer0.dense",
    "embedding",
]


@pytest.mark.parametrize(
    "policy,expected_experts",
    [
        # counts L0 [5,1,3,2], L1 [0,9,9,1]; ties -> layer, expert
        ("hard_count", ["1.0", "0.1", "1.3", "0.3", "0.2", "0.0", "1.1", "1.2"]),
        ("ema", ["1.0", "0.1", "1.3", "0.3", "0.2", "0.0", "1.1", "1.2"]),
        # soft L0 [0.4,0.3,0.2,0.1], L1 [0.05,0.5,0.15,0.35]
        ("soft_count", ["1.0", "0.3", "1.2", "0.2", "0.1", "1.3", "0.0", "1.1"]),
        # count/capacity L0 [5/10,1/1,3/6,2/8] = [.5,1,.5,.25], L1 [0/4,9/9,9/18,1/2]
        ("capacity_normalized", ["1.0", "0.3", "0.0", "0.2", "1.2", "1.3", "0.1", "1.1"]),
    ],
)
def test_order_follows_ascending_popularity_for_each_policy(policy, expected_experts):
    snapshot = _popularity(
        {0: [5, 1, 3, 2], 1: [0, 9, 9, 1]},
        soft={0: [0.4, 0.3, 0.2, 0.1], 1: [0.05, 0.5, 0.15, 0.35]},
        capacity={0: [10, 1, 6, 8], 1: [4, 9, 18, 2]},
    )
    ops = make_model(num_layers=2, num_experts=4)
    random.Random(7).shuffle(ops)
    names = [op.name for op in order_operators(ops, snapshot, policy)]
    expected = [f"layer{x.split('.')[0]}.expert{x.split('.')[1]}" for x in expected_experts]
    assert names == expected + NON_EXPERT_ORDER


def test_order_without_statistics_and_non_expert_position():
    ops = make_model(num_layers=2, num_experts=2)
    names = [op.name for op in order_operators(ops)]
    assert names[:4] == ["layer0.expert0", "layer0.expert1", "layer1.expert0", "layer1.expert1"]
    assert names[4:] == NON_EXPERT_ORDER
    first = [op.name for op in order_operators(ops, non_expert_position="first")]
    assert first[:6] == NON_EXPERT_ORDER
    # identical on every "rank": independent of the input order
    shuffled = list(ops)
    random.Random(3).shuffle(shuffled)
    assert [op.name for op in order_operators(shuffled)] == names


def test_order_reports_missing_scores_and_bad_operators():
    ops = make_model(num_layers=2, num_experts=2)
    with pytest.raises(ScheduleError, match=r"ExpertPopularity.update\(layer=1"):
        order_operators(ops, {0: [1.0, 2.0]})
    with pytest.raises(ScheduleError, match="unique"):
        order_operators(ops + [ops[0]])
    with pytest.raises(ScheduleError, match="kind"):
        order_operators([FakeOp("x", "attention", 0, None, 1, 1)])
    with pytest.raises(ScheduleError, match="int layer and expert"):
        order_operators([FakeOp("x", "expert", None, 0, 1, 1)])
    with pytest.raises(ScheduleError, match="compute_bytes"):
        order_operators([FakeOp("x", "dense", 0, None, -1, 1)])
    with pytest.raises(ScheduleError, match="No operators"):
        order_operators([])


# ------------------------------------------------------------------ ScheduleManager


def _manager_model():
    return make_model(num_layers=1, num_experts=4)


def _expert_order(schedule):
    return [n for n in schedule.order if ".expert" in n]


def test_manager_changes_schedule_only_at_window_boundaries():
    ops = _manager_model()
    tracker = ExpertPopularity()
    manager = ScheduleManager(ops, MoEvementConfig(window_size=2), tracker)

    def run_iteration(t, counts):
        tracker.update(0, torch.tensor(counts))
        tracker.step()
        return manager.slot_for_iteration(t)

    versions, slots, starts = [], [], []
    # slot_for_iteration(t) runs after iteration t's step, so it sees iteration t's counts.
    feed = {0: [8, 1, 4, 2], 1: [8, 1, 4, 2], 2: [8, 1, 4, 2], 3: [0, 200, 0, 0], 4: [0, 0, 0, 0]}
    feed.update({t: [24, 203, 12, 6] for t in (5, 6, 7)})
    orders = {}
    for t in range(8):
        a = run_iteration(t, feed[t])
        versions.append(a.schedule.version)
        slots.append(a.slot)
        starts.append(a.window_start)
        orders[t] = _expert_order(a.schedule)
        assert a.is_window_start == (a.slot == 0) and a.is_window_end == (a.slot == 1)
    assert slots == [0, 1] * 4
    assert starts == [0, 0, 2, 2, 4, 4, 6, 6]
    # Reorders at boundary 2 (first statistics) and 4 (the drift of iteration 3, mid-window,
    # does not change the schedule of iteration 3).
    assert versions == [0, 0, 1, 1, 2, 2, 2, 2]
    assert orders[0] == ["layer0.expert0", "layer0.expert1", "layer0.expert2", "layer0.expert3"]
    # cumulative counts at 2: [24, 3, 12, 6]
    assert orders[2] == ["layer0.expert1", "layer0.expert3", "layer0.expert2", "layer0.expert0"]
    assert orders[3] == orders[2]
    # cumulative counts at 4: [24, 203, 12, 6]
    assert orders[4] == ["layer0.expert3", "layer0.expert2", "layer0.expert0", "layer0.expert1"]
    # iterations 5-7 keep the shares: no drift, no reorder at 6
    assert orders[6] == orders[4]
    assert [h[:2] for h in manager.history] == [(0, 0), (2, 1), (4, 2)]


def test_manager_reorders_only_past_threshold_and_fraction():
    ops = _manager_model()
    tracker = ExpertPopularity()
    config = MoEvementConfig(window_size=1, reorder_threshold=0.4, reorder_fraction=0.5)
    manager = ScheduleManager(ops, config, tracker)
    tracker.update(0, torch.tensor([40, 30, 20, 10]))
    tracker.step()
    manager.slot_for_iteration(0)
    manager.slot_for_iteration(1)  # boundary with the first statistics -> reorder
    assert manager.schedule.version == 1
    first_order = ["layer0.expert3", "layer0.expert2", "layer0.expert1", "layer0.expert0"]
    assert _expert_order(manager.schedule) == first_order
    # Shares move from [.4,.3,.2,.1] to [.3,.35,.2,.15] (relative changes .25,.17,0,.5): the
    # ranking of experts 0 and 1 flips, but only 1 of 4 experts drifted by more than 40%,
    # below the 50% fraction -> no reorder.
    tracker.update(0, torch.tensor([20, 40, 20, 20]))
    tracker.step()
    manager.slot_for_iteration(2)
    assert manager.schedule.version == 1
    assert _expert_order(manager.schedule) == first_order
    # Shares [.15,.175,.35,.325] vs the reference [.4,.3,.2,.1]: all 4 drifted -> reorder.
    tracker.update(0, torch.tensor([0, 0, 100, 100]))
    tracker.step()
    manager.slot_for_iteration(3)
    assert manager.schedule.version == 2
    assert _expert_order(manager.schedule) == [
        "layer0.expert0",
        "layer0.expert1",
        "layer0.expert3",
        "layer0.expert2",
    ]


def test_manager_auto_window_follows_measurements_at_boundaries():
    ops = _manager_model()
    ordered = order_operators(ops)
    fast, slow = 1.5e4, 8e3
    w_fast = find_window_size(ordered, 1.0, fast)
    w_slow = find_window_size(ordered, 1.0, slow)
    assert w_slow > w_fast > 1
    manager = ScheduleManager(
        ops, MoEvementConfig(), iteration_time_s=1.0, d2h_bandwidth_bytes_per_s=fast
    )
    assert manager.schedule.window_size == w_fast
    assert manager.slot_for_iteration(0).slot == 0
    manager.update_measurements(d2h_bandwidth_bytes_per_s=slow)
    for t in range(1, w_fast):  # rest of the first window: unchanged
        assert manager.slot_for_iteration(t).schedule.window_size == w_fast
    a = manager.slot_for_iteration(w_fast)
    assert a.slot == 0 and a.window_start == w_fast
    # W grows as far as needed for every slot to fit within GROW_TOLERANCE of its budget.
    w_grown = find_window_size(ordered, 1.0 + GROW_TOLERANCE, slow)
    assert w_fast < w_grown <= w_slow
    assert a.schedule.window_size == w_grown


def test_manager_auto_window_does_not_grow_for_an_overrun_within_tolerance():
    ops = _manager_model()
    ordered = order_operators(ops)
    fast = 1.5e4
    w_fast = find_window_size(ordered, 1.0, fast)
    manager = ScheduleManager(
        ops, MoEvementConfig(), iteration_time_s=1.0, d2h_bandwidth_bytes_per_s=fast
    )
    # A bandwidth at which W would grow without the tolerance, but not with it.
    noisy = next(
        bw
        for bw in range(int(fast), 0, -50)
        if find_window_size(ordered, 1.0, bw) > w_fast
        and find_window_size(ordered, 1.0 + GROW_TOLERANCE, bw) == w_fast
    )
    manager.update_measurements(d2h_bandwidth_bytes_per_s=noisy)
    sizes = {manager.slot_for_iteration(t).schedule.window_size for t in range(4 * w_fast)}
    assert sizes == {w_fast}


def test_manager_auto_window_shrinks_only_with_headroom_and_survives_bad_measurements(caplog):
    ops = _manager_model()
    ordered = order_operators(ops)
    slow = 8e3
    w_slow = find_window_size(ordered, 1.0, slow)
    # the smallest bandwidth at which a smaller window would just fit (no headroom)
    barely = next(
        bw for bw in range(8000, 40000, 50) if find_window_size(ordered, 1.0, bw) < w_slow
    )
    assert find_window_size(ordered, 1.0 - SHRINK_HEADROOM, barely) >= w_slow
    manager = ScheduleManager(
        ops, MoEvementConfig(), iteration_time_s=1.0, d2h_bandwidth_bytes_per_s=slow
    )
    assert manager.schedule.window_size == w_slow
    t = 0
    manager.update_measurements(d2h_bandwidth_bytes_per_s=barely)
    for t in range(t, t + 2 * w_slow):
        assert manager.slot_for_iteration(t).schedule.window_size == w_slow  # no flapping
    fast = 2.5e4
    manager.update_measurements(d2h_bandwidth_bytes_per_s=fast)
    t += 1
    while not manager.is_window_boundary(t):
        t += 1
    a = manager.slot_for_iteration(t)
    expected = max(
        find_window_size(ordered, 1.0, fast), find_window_size(ordered, 1.0 - SHRINK_HEADROOM, fast)
    )
    assert a.schedule.window_size == expected < w_slow and a.slot == 0
    # A measurement under which nothing fits does not fail training: from the next boundary on,
    # the window with the least stall per iteration runs (and the stall is logged).
    manager.update_measurements(d2h_bandwidth_bytes_per_s=10.0)
    least = least_stall_window_size(ordered)
    assert least > expected
    sizes = {manager.slot_for_iteration(i).schedule.window_size for i in range(t + 1, t + 40)}
    assert sizes <= {expected, least} and least in sizes
    assert "No sparse checkpoint window fits" in caplog.text


def test_manager_agreement_hook_and_iteration_checks():
    ops = _manager_model()
    calls = []

    def agree(w):
        calls.append(w)
        return w + 1  # e.g. another rank needs one more slot

    manager = ScheduleManager(
        ops,
        MoEvementConfig(),
        iteration_time_s=1.0,
        d2h_bandwidth_bytes_per_s=2e5,
        agree_window_size=agree,
        start_iteration=10,
    )
    assert manager.schedule.window_size == calls[0] + 1
    with pytest.raises(ScheduleError, match="precedes the current window"):
        manager.slot_for_iteration(9)
    # skipping iterations advances whole windows
    w = manager.schedule.window_size
    a = manager.slot_for_iteration(10 + 3 * w + 1)
    assert a.window_start == 10 + 3 * w and a.slot == 1


def test_manager_state_dict_round_trip():
    ops = _manager_model()
    tracker = ExpertPopularity()
    manager = ScheduleManager(ops, MoEvementConfig(window_size=2), tracker)
    for t in range(3):
        tracker.update(0, torch.tensor([1, 2, 3, 4]))
        tracker.step()
        manager.slot_for_iteration(t)
    state = json.loads(json.dumps(manager.state_dict()))
    other = ScheduleManager(ops, MoEvementConfig(window_size=2), ExpertPopularity())
    other.load_state_dict(state)
    assert other.schedule == manager.schedule and other.window_start == manager.window_start
    assert other.slot_for_iteration(3).slot == manager.slot_for_iteration(3).slot == 1
    with pytest.raises(ScheduleError, match="does not cover"):
        ScheduleManager(make_model(num_experts=2), MoEvementConfig(window_size=2)).load_state_dict(
            state
        )
