"""Tests for expert popularity tracking, ordering policies and the reorder trigger."""

import pytest
import torch

from megatron_moevement.config import MoEvementConfig
from megatron_moevement.schedule import popularity as pop_mod
from megatron_moevement.schedule.popularity import (
    ExpertPopularity,
    OrderingPolicy,
    PopularityError,
    PopularitySnapshot,
    available_ordering_policies,
    count_drifted_experts,
    expert_order,
    get_ordering_policy,
    register_ordering_policy,
    should_reorder,
)

# Two iterations of router statistics for layer 0 (4 experts) and layer 1 (3 experts).
COUNTS = {0: ([4, 1, 3, 0], [0, 5, 1, 2]), 1: ([1, 5, 2], [3, 1, 2])}
SOFT = {0: ([0.9, 0.2, 0.5, 0.1], [0.1, 0.3, 0.4, 0.2]), 1: ([0.6, 0.35, 0.05], [0.2, 0.2, 0.4])}
CAPACITY = {0: ([8, 2, 6, 4], [8, 2, 6, 4]), 1: (4, 4)}


def _tracker(ema_decay=0.75, soft=True, capacity=True):
    tracker = ExpertPopularity(ema_decay=ema_decay)
    for it in range(2):
        for layer in (0, 1):
            cap = CAPACITY[layer][it]
            tracker.update(
                layer,
                torch.tensor(COUNTS[layer][it]),
                torch.tensor(SOFT[layer][it], dtype=torch.float32) if soft else None,
                (torch.tensor(cap) if isinstance(cap, list) else cap) if capacity else None,
            )
        tracker.step()
    return tracker


def test_cumulative_counts_and_ema_values():
    snap = _tracker().snapshot()
    assert snap.iterations == 2
    assert snap.counts[0].tolist() == [4, 6, 4, 2]
    assert snap.counts[1].tolist() == [4, 6, 4]
    # ema = 0.75 * it1 + 0.25 * it2 (initialized with the first iteration)
    assert snap.ema[0].tolist() == [3.0, 2.0, 2.5, 0.5]
    assert snap.ema[1].tolist() == [1.5, 4.0, 2.0]
    assert snap.capacity[0].tolist() == [16, 4, 12, 8]
    assert snap.capacity[1].tolist() == [8, 8, 8]
    assert all(t.dtype == torch.float64 and t.device.type == "cpu" for t in snap.counts.values())


# Hand-computed orders (ties: layer, then expert id).
EXPECTED_ORDERS = {
    # counts L0 [4,6,4,2], L1 [4,6,4]
    "hard_count": [(0, 3), (0, 0), (0, 2), (1, 0), (1, 2), (0, 1), (1, 1)],
    # soft L0 [1.0,0.5,0.9,0.3], L1 [0.8,0.55,0.45]
    "soft_count": [(0, 3), (1, 2), (0, 1), (1, 1), (1, 0), (0, 2), (0, 0)],
    # ema L0 [3,2,2.5,0.5], L1 [1.5,4,2]
    "ema": [(0, 3), (1, 0), (0, 1), (1, 2), (0, 2), (0, 0), (1, 1)],
    # count/capacity L0 [0.25,1.5,0.333,0.25], L1 [0.5,0.75,0.5]
    "capacity_normalized": [(0, 0), (0, 3), (0, 2), (1, 0), (1, 2), (1, 1), (0, 1)],
}


@pytest.mark.parametrize("policy", sorted(EXPECTED_ORDERS))
def test_each_policy_gives_the_hand_computed_order(policy):
    scores = get_ordering_policy(policy).scores(_tracker().snapshot())
    assert expert_order(scores) == EXPECTED_ORDERS[policy]


def test_builtin_policies_are_registered_and_match_config():
    assert set(EXPECTED_ORDERS) <= set(available_ordering_policies())
    with pytest.raises(PopularityError, match="Unknown ordering policy"):
        get_ordering_policy("nope")


def test_tie_breaking_is_by_layer_then_expert():
    scores = {2: [1.0, 1.0], 0: [1.0, 0.5, 1.0]}
    assert expert_order(scores) == [(0, 1), (0, 0), (0, 2), (2, 0), (2, 1)]


def test_policies_report_missing_statistics():
    snap = _tracker(soft=False, capacity=False).snapshot()
    with pytest.raises(PopularityError, match="gate_prob_sum"):
        get_ordering_policy("soft_count").scores(snap)
    with pytest.raises(PopularityError, match="capacity="):
        get_ordering_policy("capacity_normalized").scores(snap)


def test_capacity_zero_handling():
    snap = PopularitySnapshot(
        iterations=1,
        counts={0: torch.tensor([0.0, 3.0, 2.0], dtype=torch.float64)},
        capacity={0: torch.tensor([0.0, 0.0, 4.0], dtype=torch.float64)},
    )
    scores = get_ordering_policy("capacity_normalized").scores(snap)[0].tolist()
    assert scores == [0.0, float("inf"), 0.5]


def test_microbatches_accumulate_until_step():
    tracker = ExpertPopularity(ema_decay=0.5)
    tracker.update(0, torch.tensor([1, 2]))
    tracker.update(0, torch.tensor([3, 0], dtype=torch.int32))
    assert tracker.snapshot().counts == {}  # not folded before step()
    tracker.step()
    tracker.step()  # an iteration without tokens decays the EMA
    snap = tracker.snapshot()
    assert snap.counts[0].tolist() == [4, 2]
    assert snap.ema[0].tolist() == [2.0, 1.0]
    assert tracker.iterations == 2


def test_update_from_routing_map_and_probs():
    tracker = ExpertPopularity()
    routing = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 0, 0]], dtype=torch.bool)
    probs = torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.0, 1.0], [0.25, 0.0, 0.0]])
    tracker.update_from_routing(3, routing, probs, capacity=2)
    tracker.step()
    snap = tracker.snapshot()
    assert snap.counts[3].tolist() == [2, 0, 2]
    assert snap.soft_counts[3].tolist() == [0.75, 0.0, 1.5]
    assert snap.capacity[3].tolist() == [2, 2, 2]


def test_hot_path_does_not_sync_with_the_host(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("host sync on the hot path")

    tracker = ExpertPopularity()
    tokens = torch.tensor([3, 1, 4, 1])
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for _ in range(3):
        tracker.update(0, tokens, probs, capacity=torch.tensor(8.0))
        tracker.step()
    monkeypatch.undo()
    assert tracker.snapshot().counts[0].tolist() == [9, 3, 12, 3]


def test_update_rejects_bad_input_with_fixes():
    tracker = ExpertPopularity()
    with pytest.raises(PopularityError, match="1-D"):
        tracker.update(0, torch.ones(2, 3))
    tracker.update(0, torch.ones(4))
    with pytest.raises(PopularityError, match="had 4 experts"):
        tracker.update(0, torch.ones(5))
    with pytest.raises(PopularityError, match="one value per expert"):
        tracker.update(0, torch.ones(4), gate_prob_sum=torch.ones(3))
    with pytest.raises(PopularityError, match="layer"):
        tracker.update("0", torch.ones(4))
    with pytest.raises(PopularityError, match="ema_decay"):
        ExpertPopularity(ema_decay=1.0)
    with pytest.raises(PopularityError, match="init_process_group"):
        tracker.snapshot(group=object())


def test_state_dict_round_trip():
    tracker = _tracker()
    restored = ExpertPopularity()
    restored.load_state_dict(tracker.state_dict())
    a, b = tracker.snapshot(), restored.snapshot()
    assert a.iterations == b.iterations and restored.ema_decay == tracker.ema_decay
    for kind in ("counts", "soft_counts", "capacity", "ema"):
        assert {k: v.tolist() for k, v in getattr(a, kind).items()} == {
            k: v.tolist() for k, v in getattr(b, kind).items()
        }


# ------------------------------------------------------------------ reorder trigger


def test_reorder_without_previous_order():
    assert should_reorder(None, {0: [1.0, 2.0]})


def test_reorder_only_past_threshold_and_fraction():
    old = {0: [10.0, 10.0, 10.0, 10.0]}
    at_threshold = {0: [11.0, 10.0, 10.0, 10.0]}  # exactly 10%: not "more than"
    past_threshold = {0: [11.5, 10.0, 10.0, 10.0]}  # 15% for 1 of 4 experts
    kw = dict(threshold=0.10, normalize=False)
    assert not should_reorder(old, at_threshold, fraction=0.25, **kw)
    assert should_reorder(old, past_threshold, fraction=0.25, **kw)
    assert not should_reorder(old, past_threshold, fraction=0.3, **kw)
    assert not should_reorder(old, past_threshold, threshold=0.2, fraction=0.25, normalize=False)
    assert count_drifted_experts(old, past_threshold, 0.10, normalize=False) == (1, 4)


def test_reorder_compares_shares_so_growing_counts_are_not_drift():
    old = {0: [10.0, 20.0, 30.0], 1: [5.0, 5.0, 0.0]}
    scaled = {0: [100.0, 200.0, 300.0], 1: [50.0, 50.0, 0.0]}
    assert not should_reorder(old, scaled)
    assert count_drifted_experts(old, scaled, 0.1, normalize=False) == (5, 6)
    assert should_reorder(old, scaled, normalize=False, fraction=0.8)


def test_reorder_handles_zero_and_shape_changes():
    assert count_drifted_experts({0: [0.0, 5.0]}, {0: [1.0, 5.0]}, 0.1, normalize=False) == (1, 2)
    assert count_drifted_experts({0: [0.0, 5.0]}, {0: [0.0, 5.0]}, 0.1) == (0, 2)
    assert should_reorder({0: [1.0, 1.0]}, {0: [1.0, 1.0], 1: [1.0]})
    assert should_reorder({0: [1.0, 1.0]}, {0: [1.0, 1.0, 1.0]})
    with pytest.raises(PopularityError, match="threshold"):
        should_reorder(None, {0: [1.0]}, threshold=0)
    with pytest.raises(PopularityError, match="fraction"):
        should_reorder(None, {0: [1.0]}, fraction=0)
    with pytest.raises(PopularityError, match="NaN"):
        expert_order({0: [float("nan")]})


# ------------------------------------------------------------------ registry


def test_custom_policy_registration(monkeypatch):
    monkeypatch.setattr(pop_mod, "_POLICIES", dict(pop_mod._POLICIES))

    @register_ordering_policy
    class Descending(OrderingPolicy):
        name = "descending_count"

        def scores(self, snapshot):
            return {layer: -t for layer, t in snapshot.counts.items()}

    assert "descending_count" in available_ordering_policies()
    assert MoEvementConfig(ordering="descending_count").ordering == "descending_count"
    scores = get_ordering_policy("descending_count").scores(_tracker().snapshot())
    assert expert_order(scores)[:2] == [(0, 1), (1, 1)]

    with pytest.raises(PopularityError, match="already registered"):

        @register_ordering_policy
        class Clash(OrderingPolicy):
            name = "hard_count"

            def scores(self, snapshot):
                return {}
