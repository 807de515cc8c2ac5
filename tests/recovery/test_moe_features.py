"""Scoped recovery from a real SIGKILL with the MoE features that replay alone does not prove:
grouped-GEMM experts, the router's expert bias, dropout (Megatron-LM's default 0.1) and tensor
parallelism with sequence parallelism, on multi-stage layouts.

Each job kills one rank mid-iteration; a spare takes it, only the failed stage's ranks roll back
and replay (fed by the other stage's upstream logs), and the final state — parameters, main
params, optimizer state, buffers and RNG states — must equal a fault-free run of the same job.
"""

import json

import pytest

from megatron_moevement.harness.launcher import run_elastic_job, run_worker_job
from megatron_moevement.harness.layout import ParallelLayout
from megatron_moevement.harness.worker import WorkerSpec
from tests.conftest import JOB_TIMEOUT_S, assert_states_bitwise_equal, load_states

pytestmark = pytest.mark.multiproc

ITERATIONS = 9

CASES = {
    # PP2 x EP2 (dp 2): grouped experts, expert bias with sigmoid scores, dropout.
    "pp2xep2-grouped-bias-dropout": (
        dict(pp=2, dp=2, ep=2),
        dict(
            precision="bf16",
            moe_grouped_gemm=True,
            moe_router_score_function="sigmoid",
            moe_router_enable_expert_bias=True,
            hidden_dropout=0.1,
        ),
        dict(rank=2, iteration=5, phase="microbatch1"),
    ),
    # PP2 x TP2 x EP2 (dp 1, expert TP 1): sequence parallelism, dropout, kill in stage 0.
    "pp2xtp2xep2-sp-dropout": (
        dict(pp=2, tp=2, dp=1, ep=2, etp=1),
        dict(hidden_dropout=0.1),
        dict(rank=1, iteration=6, phase="microbatch2"),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_scoped_recovery_is_bitwise_with_moe_features(tmp_path, case):
    layout, model, fault = CASES[case]
    world = ParallelLayout(**layout).world_size
    reference = tmp_path / "reference"
    run_worker_job(
        WorkerSpec(layout=layout, model=model, iterations=ITERATIONS),
        reference,
        timeout=JOB_TIMEOUT_S,
    )
    spec = WorkerSpec(
        job="resilient",
        layout=layout,
        model=model,
        iterations=ITERATIONS,
        moevement=dict(window_size=3, replication_factor=1, faults=[fault]),
        timeout_s=60,
    )
    out = tmp_path / "recovered"
    agent = run_elastic_job(spec, out, timeout=600, spares=1)
    assert [(f["rank"], f["code"]) for f in agent.failures] == [(fault["rank"], -9)]
    final = load_states(out, world)
    assert_states_bitwise_equal(final, load_states(reference, world))
    assert any(k.startswith("rng/") for k in final[0])
    reports = [json.loads((out / f"recovery_rank{r}.json").read_text()) for r in range(world)]
    scope = reports[0]["reports"][-1]["scope_ranks"]
    for rep in reports:
        last = rep["reports"][-1]
        assert last["scope"] == "scoped", last["reason"]
        if rep["rank"] in scope:
            assert last["iterations_replayed"]
        else:
            assert last["iterations_replayed"] == []
    assert fault["rank"] in scope and len(scope) == world // layout["pp"]
