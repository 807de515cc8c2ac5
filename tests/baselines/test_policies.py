"""Unit tests of the baseline policies: config, MoC rotation, lost-token ledger, retention."""

import numpy as np
import pytest
import torch

from megatron_moevement.baselines import (
    CKPT_STRATEGIES,
    BaselineConfig,
    BaselineConfigError,
    build_strategy,
)
from megatron_moevement.baselines.lost_tokens import TokenLedger
from megatron_moevement.baselines.rotation import (
    captures_by_group,
    experts_per_group,
    group_of_expert,
    group_of_window,
    latest_capture,
    num_groups,
)
from megatron_moevement.config import MoEvementConfig
from megatron_moevement.snapshot.buffers import HostBufferPool
from megatron_moevement.snapshot.replication import ReplicaStore
from megatron_moevement.snapshot.slots import SlotSnapshot


# ---------------------------------------------------------------- config
def test_config_defaults_and_shared_settings():
    cfg = BaselineConfig(strategy="gemini", interval=4)
    shared = cfg.moevement_config(MoEvementConfig(replication_factor=2, checksum="sha256"))
    assert (shared.window_size, shared.upstream_logging, shared.recovery_scope) == (
        1,
        False,
        "global",
    )
    assert shared.replication_factor == 2 and shared.checksum == "sha256"
    assert BaselineConfig.from_dict(cfg.to_dict()) == cfg
    assert CKPT_STRATEGIES == ("moevement", "gemini", "moc")


@pytest.mark.parametrize(
    "fields, name",
    [
        (dict(strategy="checkfreq"), "strategy"),
        (dict(interval=0), "interval"),
        (dict(interval=2.5), "interval"),
        (dict(interval=True), "interval"),
        (dict(expert_fraction=0.0), "expert_fraction"),
        (dict(expert_fraction=1.5), "expert_fraction"),
        (dict(expert_fraction=float("nan")), "expert_fraction"),
    ],
)
def test_config_rejects_bad_values(fields, name):
    with pytest.raises(BaselineConfigError, match=f"BaselineConfig.{name}=.*Fix"):
        BaselineConfig(**fields)


def test_config_rejects_unknown_keys():
    with pytest.raises(BaselineConfigError, match="unknown key.*intervall"):
        BaselineConfig.from_dict({"intervall": 3})


def test_factory_rejects_unknown_or_mismatched_strategy():
    with pytest.raises(BaselineConfigError, match="unknown checkpointing strategy"):
        build_strategy("checkfreq", None, None)
    with pytest.raises(BaselineConfigError, match="agree"):
        build_strategy("moc", None, None, baseline=BaselineConfig(strategy="gemini"))


# ---------------------------------------------------------------- MoC rotation
def test_rotation_groups():
    assert experts_per_group(64, 0.125) == 8 and num_groups(64, 0.125) == 8
    assert experts_per_group(4, 0.25) == 1 and num_groups(4, 0.25) == 4
    assert experts_per_group(4, 0.01) == 1  # at least one expert
    assert num_groups(4, 1.0) == 1
    assert num_groups(6, 0.25) == 3  # round(1.5) = 2 experts per group
    # strided: the experts of a group are spread over expert-parallel ranks
    assert [group_of_expert(e, 2) for e in range(4)] == [0, 1, 0, 1]
    assert [group_of_window(g, 3) for g in range(6)] == [0, 1, 2, 0, 1, 2]


def test_latest_capture_of_each_group():
    assert captures_by_group(9, 4) == {0: 8, 1: 9, 2: 6, 3: 7}
    assert captures_by_group(1, 4) == {0: 0, 1: 1, 2: None, 3: None}  # never captured yet
    assert latest_capture(2, 9, 4, available=[7, 8, 9]) is None  # evicted
    assert latest_capture(1, 9, 4, available=[6, 7, 8, 9]) == 9


# ---------------------------------------------------------------- lost tokens
def test_ledger_counts_lost_tokens_exactly():
    ledger = TokenLedger(num_layers=1, num_experts=2)
    for it in range(5):
        ledger.record(it, [[10 + it, 100]])
    # Expert 0 restored from its snapshot of iteration 1, expert 1 up to date at iteration 4.
    event = ledger.account_recovery(4, {(0, 0): 1, (0, 1): 4})
    assert event.lost_tokens == 12 + 13 + 14
    assert event.stale_experts == {"layer0.expert0": 3}
    assert ledger.total_tokens == sum(10 + it + 100 for it in range(5))
    assert ledger.proportion_lost == pytest.approx(39 / ledger.total_tokens)
    # A never-captured expert loses everything since iteration 0.
    assert ledger.lost_since(0, 1, None, 4) == (500, 5)


def test_ledger_retrained_iterations_replace_counts_and_fold():
    ledger = TokenLedger(num_layers=1, num_experts=1)
    for it in range(4):
        ledger.record(it, [[1]])
    ledger.record(3, [[5]])  # retrained after a rollback: the new execution counts
    assert ledger.total_tokens == 8
    ledger.fold_before(2)
    assert ledger.iterations == [2, 3] and ledger.total_tokens == 8
    with pytest.raises(ValueError, match="folded"):
        ledger.lost_since(0, 0, 0, 3)
    with pytest.raises(ValueError, match="folded"):
        ledger.record(1, [[1]])


def test_ledger_state_round_trip():
    ledger = TokenLedger(2, 3)
    ledger.record(0, np.arange(6).reshape(2, 3))
    ledger.account_recovery(0, {(1, 2): None})
    other = TokenLedger(2, 3)
    other.load_state_dict(ledger.state_dict())
    assert other.total_tokens == ledger.total_tokens == 15
    assert other.lost_tokens == ledger.lost_tokens == 5
    assert np.array_equal(other.history_array(0, 0), ledger.history_array(0, 0))


# ---------------------------------------------------------------- retention
def test_rotating_pool_keeps_generations_apart():
    pool = HostBufferPool(keep=3)
    bufs = [pool.get(g, 0, 16) for g in range(3)]
    assert len({b.data_ptr() for b in bufs}) == 3
    assert pool.get(3, 0, 16).data_ptr() == bufs[0].data_ptr()  # reused, not reallocated
    assert pool.allocations == 3
    with pytest.raises(ValueError):
        HostBufferPool(keep=1)


def test_retaining_replica_store_keeps_n_generations():
    store = ReplicaStore.keeping(source=1, keep=3)
    for g in range(5):
        slot = SlotSnapshot(
            window=g,
            slot=0,
            iteration=g,
            full_state_ops=(),
            compute_ops=(),
            buffer=torch.empty(1, dtype=torch.uint8),
        )
        store.put(slot, 1)
    assert sorted(store.windows) == [2, 3, 4]
