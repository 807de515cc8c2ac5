"""The profiler's output: stage times from raw timings, the simulator's profile JSON format,
the harness scenario built from it, and the accounting of a real run's timeline."""

import json

import pytest

from megatron_moevement.profiler.aggregate import (
    Measurements,
    PhaseTotals,
    RankTimings,
    build_stage_profile,
    stage_times,
)
from megatron_moevement.profiler.harness_scenario import (
    harness_model_spec,
    harness_plan,
    harness_scenario,
    harness_sim_config,
)
from megatron_moevement.profiler.run_timeline import load_real_run
from megatron_moevement.sim import Simulator
from megatron_moevement.sim.profile import PROFILE_JSON_SCHEMA, load_profile, save_profile

HARNESS_MODEL = dict(
    num_layers=4,
    hidden_size=64,
    ffn_hidden_size=128,
    num_attention_heads=4,
    num_experts=4,
    moe_router_topk=2,
    moe_aux_loss_coeff=0.01,
    vocab_size=128,
    seq_length=16,
    micro_batch_size=2,
    num_microbatches=4,
    precision="bf16",
    lr=1e-3,
    clip_grad=1.0,
    use_distributed_optimizer=True,
    hidden_dropout=0.0,
    seed=1234,
)


def check_schema(value, schema, path="$"):
    """Validates the subset of JSON Schema that PROFILE_JSON_SCHEMA uses."""
    kind = schema.get("type")
    if "const" in schema:
        assert value == schema["const"], path
    if "enum" in schema:
        assert value in schema["enum"], path
    if kind == "object":
        assert isinstance(value, dict), path
        for key in schema.get("required", []):
            assert key in value, f"{path}.{key} missing"
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(props), f"{path}: extra keys {set(value) - set(props)}"
        for key, sub in props.items():
            if key in value:
                check_schema(value[key], sub, f"{path}.{key}")
    elif kind == "array":
        assert isinstance(value, list) and len(value) >= schema.get("minItems", 0), path
        for i, item in enumerate(value):
            check_schema(item, schema["items"], f"{path}[{i}]")
    elif kind == "integer":
        assert isinstance(value, int) and value >= schema.get("minimum", value), path
    elif kind == "number":
        assert isinstance(value, (int, float)) and value >= schema.get("minimum", value), path


def totals(fwd, fb, p2p, sync, opt=0.0, n=2, m=4, p2p_min=0.001):
    return PhaseTotals(
        iterations=n,
        microbatches=m,
        forward_s=fwd,
        forward_backward_s=fb,
        p2p_s=p2p,
        grad_sync_s=sync,
        optimizer_s=opt,
        p2p_min_s=p2p_min,
    )


def rank(r, stage, **normal):
    frozen = dict(normal, fb=normal["fb"] - 0.16, opt=0.0)  # no weight gradients: 20 ms/mb less
    return RankTimings(rank=r, stage=stage, normal=totals(**normal), frozen=totals(**frozen))


def measurements():
    return Measurements(
        iteration_s=0.25,
        snapshot_bandwidth=3e9,
        replication_bandwidth=1e9,
        rebuild_s=0.3,
        group_init_s=0.02,
        detect_s=0.55,
        resume_s=0.01,
    )


def sample_profile():
    ranks = [
        rank(0, 0, fwd=0.16, fb=0.80, p2p=0.2, sync=0.04, opt=0.03),
        rank(1, 0, fwd=0.16, fb=0.80, p2p=0.2, sync=0.04, opt=0.03),
        rank(2, 1, fwd=0.24, fb=0.88, p2p=0.1, sync=0.06, opt=0.05),
        rank(3, 1, fwd=0.24, fb=0.88, p2p=0.1, sync=0.06, opt=0.05),
    ]
    return build_stage_profile(
        ranks,
        2,
        16,
        metadata=dict(
            model=HARNESS_MODEL,
            layout=dict(tp=1, pp=2, dp=2, ep=2),
            measurements=measurements().to_dict(),
        ),
    )


def test_stage_times_from_timings():
    st = stage_times([rank(0, 0, fwd=0.16, fb=0.80, p2p=0.2, sync=0.04, opt=0.03)])
    # per microbatch: forward 0.16/8; backward = (0.80 - 0.16 - 0.2 - 0.04)/8 = 0.05, of which
    # the frozen run (0.16 s less per 8 microbatches) leaves 0.03 input-gradient.
    assert st.forward_s == pytest.approx(0.02)
    assert st.backward_s == pytest.approx(0.03)
    assert st.weight_grad_s == pytest.approx(0.02)
    assert st.optimizer_s == pytest.approx(0.015) and st.grad_sync_s == pytest.approx(0.02)
    assert st.p2p_s == pytest.approx(0.001)
    with pytest.raises(ValueError):
        stage_times([])


def test_profile_json_follows_the_simulators_schema(tmp_path):
    profile = sample_profile()
    assert profile.source == "measured" and profile.num_stages == 2
    doc = json.loads(json.dumps(profile.to_dict()))
    check_schema(doc, PROFILE_JSON_SCHEMA)
    loaded = load_profile(save_profile(profile, tmp_path / "profile.json"))
    assert loaded.stages == profile.stages
    assert loaded.metadata["measurements"]["restart_s"] == pytest.approx(0.88)


def test_missing_stage_is_rejected():
    with pytest.raises(ValueError, match="every stage"):
        build_stage_profile([rank(0, 1, fwd=0.1, fb=0.5, p2p=0.1, sync=0.0)], 2, 16)


def test_harness_scenario_and_simulation():
    model = harness_model_spec(HARNESS_MODEL)
    # 4 layers x (attention 4h^2 + router h*E + 4 experts x 2 h*ffn) + embedding + output
    assert model.total_params == 4 * (4 * 64**2 + 64 * 4 + 4 * 2 * 64 * 128) + 2 * 128 * 64
    assert model.precision.compute_weight_bytes == 2 and model.precision.full_state_bytes == 12
    plan = harness_plan(dict(tp=1, pp=2, dp=2, ep=2), HARNESS_MODEL)
    assert (plan.pp, plan.dp, plan.ep, plan.num_gpus) == (2, 1, 2, 4)
    profile = sample_profile()
    scenario = harness_scenario(profile)
    config = harness_sim_config(profile, fixed_window=3, horizon_s=60.0)
    assert config.restart_s == config.global_restart_s == pytest.approx(0.88)
    sim = Simulator(scenario, config)
    (trace,) = sim.replay_trace([20.0, 40.0], 60.0, ["moevement"])
    assert trace.failures == 2 and 0.5 < trace.ettr < 1.0
    assert sim.evaluate(60.0, ["moevement"])[0].window_iterations == 3


def _write_run(tmp_path, commits, kills, world=2):
    for r in range(world):
        (tmp_path / f"recovery_rank{r}.json").write_text(
            json.dumps(
                dict(
                    rank=r,
                    timeline=dict(start=0.0, commits=[[it, t + 0.001 * r] for it, t in commits]),
                    reports=(
                        [
                            dict(
                                generation=1,
                                failed_ranks=[1],
                                scope="scoped",
                                iterations_replayed=[4, 5],
                                times_s=dict(detect=0.5, rebuild=0.2),
                            )
                        ]
                        if kills
                        else []
                    ),
                )
            )
        )
    (tmp_path / "faults.jsonl").write_text(
        "".join(json.dumps(dict(rank=1, iteration=6, time=k)) + "\n" for k in kills)
    )


def test_real_run_accounting(tmp_path):
    # Iterations every second; iteration 6 is interrupted at t=6.5 and commits at t=9.
    commits = [(it, float(it)) for it in range(6)] + [(it, it + 3.0) for it in range(6, 10)]
    _write_run(tmp_path, commits, kills=[6.5])
    run = load_real_run(tmp_path, world_size=2, iterations=10, warmup=3)
    assert run.iterations == 7 and run.wall_s == pytest.approx(10.0)
    assert run.failures_s == pytest.approx([4.499], abs=1e-3)
    assert run.iteration_s == pytest.approx(1.0) and run.interrupted_gaps_s == pytest.approx([4.0])
    assert run.lost_per_failure_s == pytest.approx([3.0])
    assert run.ettr() == pytest.approx(0.7)
    assert run.ettr(0.5) == pytest.approx(0.35)
    assert run.recoveries[0]["total_s"] == pytest.approx(0.7)
    with pytest.raises(ValueError):
        load_real_run(tmp_path, world_size=2, iterations=10, warmup=0)
