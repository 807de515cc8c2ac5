"""Rollback-and-replay is bit-exact for the Megatron-Core MoE features users train with.

Each case trains with MoEvement (W=3), scrambles every live tensor (parameters, main params,
optimizer state, buffers) and every RNG state, rolls back to the persisted sparse checkpoint and
replays; parameters, main params, optimizer state, buffers and RNG states must equal the recorded
fault-free ones bit for bit, at the window's end and at the last iteration, and training on must
equal an uninterrupted run without MoEvement.

The combined case and TP2 run by default; one case per feature runs with ``-m slow``.
"""

import json

import pytest

from megatron_moevement.harness.layout import ParallelLayout
from tests.conftest import assert_states_bitwise_equal, load_states

ITERATIONS = 8
EXTRA = 2

EP2 = dict(dp=2, ep=2)
FEATURES = {
    "grouped_gemm": (EP2, dict(precision="bf16", moe_grouped_gemm=True)),
    "shared_experts_gate": (
        EP2,
        dict(moe_shared_expert_intermediate_size=64, moe_shared_expert_gate=True),
    ),
    "expert_bias": (
        EP2,
        dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True),
    ),
    "dense_first_layers": (dict(pp=2), dict(dense_first_layers=1)),
    "capacity_factor": (EP2, dict(moe_expert_capacity_factor=1.0)),
    "dropout": (dict(pp=2), dict(hidden_dropout=0.1, attention_dropout=0.1)),
    "mtp": (EP2, dict(mtp_num_layers=1)),
    "allgather_dispatcher": (EP2, dict(moe_token_dispatcher_type="allgather")),
    "tp2_sequence_parallel": (dict(tp=2, dp=2, ep=2), dict(hidden_dropout=0.1)),
    "tp2_expert_tp1": (dict(tp=2, dp=1, ep=2, etp=1), dict(precision="bf16")),
}
COMBINED = (
    EP2,
    dict(
        precision="bf16",
        moe_grouped_gemm=True,
        moe_shared_expert_intermediate_size=64,
        moe_shared_expert_gate=True,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        dense_first_layers=1,
        moe_expert_capacity_factor=1.5,
        hidden_dropout=0.1,
        mtp_num_layers=1,
    ),
)
DEFAULT = {"combined": COMBINED, "tp2_sequence_parallel": FEATURES["tp2_sequence_parallel"]}
SLOW = {k: v for k, v in FEATURES.items() if k not in DEFAULT}


def _check(run_job, layout, model):
    world = ParallelLayout(**layout).world_size
    replay_dir = run_job(
        "replay",
        job="replay_check",
        layout=layout,
        model=model,
        iterations=ITERATIONS,
        moevement=dict(window_size=3, replication_factor=0, extra_iterations=EXTRA),
    )
    reference = run_job("reference", layout=layout, model=model, iterations=ITERATIONS + EXTRA)
    for rank in range(world):
        rep = json.loads((replay_dir / f"replay_rank{rank}.json").read_text())
        assert rep["dense_at"] == 5
        assert rep["dense_mismatches"] == [], f"rank {rank} after conversion"
        assert rep["target_mismatches"] == [], f"rank {rank} after replay to the target"
        assert rep["conversion"]["frozen_operators"]["4"] > 0  # replay ran sparse
    final = load_states(replay_dir, world)
    count = assert_states_bitwise_equal(final, load_states(reference, world))
    # The comparison covers buffers and RNG states, not only parameters and optimizer state.
    keys = set(final[0])
    assert any(k.startswith("rng/") for k in keys)
    if model.get("moe_router_enable_expert_bias"):
        assert any(k.endswith("expert_bias") for k in keys)
    assert count > 0


@pytest.mark.multiproc
@pytest.mark.parametrize("feature", sorted(DEFAULT))
def test_replay_is_bitwise_for_moe_features(run_job, feature):
    layout, model = DEFAULT[feature]
    _check(run_job, layout, model)


@pytest.mark.slow
@pytest.mark.parametrize("feature", sorted(SLOW))
def test_replay_is_bitwise_for_each_moe_feature(run_job, feature):
    layout, model = SLOW[feature]
    _check(run_job, layout, model)
