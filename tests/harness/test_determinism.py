"""Determinism: the ground every recovery test stands on.

Two fault-free runs of real Megatron-Core MoE training on the same layout must end with every
parameter, FP32 main parameter, optimizer tensor and RNG state bitwise equal.
"""

import json

import pytest

from tests.conftest import LAYOUTS, assert_states_bitwise_equal, load_states

pytestmark = pytest.mark.multiproc


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(dict(precision="fp32"), id="fp32"),
        pytest.param(dict(precision="bf16", use_distributed_optimizer=True), id="bf16-distopt"),
    ],
)
def test_pp2_dp2_ep2_runs_are_bitwise_equal(run_job, model):
    layout = LAYOUTS["pp2xdp2xep2"]
    first = run_job("first", layout=layout, model=model, iterations=8)
    second = run_job("second", layout=layout, model=model, iterations=8)
    states_a, states_b = load_states(first, 4), load_states(second, 4)
    compared = assert_states_bitwise_equal(states_a, states_b)
    kinds = {key.split("/")[0] for state in states_a for key in state}
    assert kinds == {"param", "main", "optim", "rng"}
    assert compared > 300
    # Training really progressed: the last stage's loss fell over 8 iterations.
    results = json.loads((first / "result_rank2.json").read_text())
    assert len(results) == 8
    assert results[-1]["loss"] < results[0]["loss"]
