"""Input specs: validation, parameter counts, JSON round trips, profile files."""

from __future__ import annotations

import json

import pytest

from megatron_moevement.sim import (
    PROFILE_JSON_SCHEMA,
    ClusterSpec,
    ModelSpec,
    ParallelPlan,
    Scenario,
    SimSpecError,
    SimulationConfig,
    StageProfile,
    StageTimes,
    get_preset,
    load_profile,
    load_scenario_file,
    save_profile,
)
from megatron_moevement.sim.specs import PRECISIONS, get_precision
from megatron_moevement.sim.units import GBPS, format_duration, parse_bandwidth, parse_duration


def test_units():
    assert parse_duration("2h") == 7200
    assert parse_duration("30m") == 1800
    assert parse_duration("90s") == 90
    assert parse_duration("600") == 600
    assert format_duration(7200) == "2h" and format_duration(600) == "10m"
    assert parse_bandwidth("80Gbps") == pytest.approx(80 * GBPS)
    assert parse_bandwidth("12.5GB/s") == pytest.approx(12.5e9)
    with pytest.raises(SimSpecError):
        parse_duration("-1h")
    with pytest.raises(SimSpecError):
        parse_duration("3 fortnights")


def test_precision_presets_match_table7():
    assert get_precision("fp16-fp32").full_state_bytes == 12  # 4 master + 8 Adam (§3.2)
    assert get_precision("fp8-fp8-fp8+fp16").full_state_bytes == 4
    assert set(PRECISIONS) >= {"bf16-fp32", "fp8-fp32-fp32x2", "fp16-fp16-fp16x2"}
    with pytest.raises(SimSpecError):
        get_precision("fp4")


@pytest.mark.parametrize(
    "name,total,active",
    [
        ("moe-llava", 2.9e9, 2.0e9),
        ("gpt-moe", 7.3e9, 1.6e9),
        ("qwen-moe", 14.3e9, 2.7e9),
        ("deepseek-moe", 16.4e9, None),
        ("deepseek-moe-32b", 32e9, None),
        ("deepseek-moe-67b", 67e9, None),
        ("deepseek-moe-145b", 145e9, None),
        ("deepseek-moe-671b", 671e9, 37e9),
    ],
)
def test_preset_parameter_counts(name, total, active):
    model = get_preset(name).model
    assert model.total_params == pytest.approx(total, rel=0.03)
    if active is not None:
        assert model.active_params == pytest.approx(active, rel=0.05)


def test_paper_presets_use_the_paper_plans():
    plans = {n: get_preset(n).plan for n in ("moe-llava", "gpt-moe", "qwen-moe", "deepseek-moe")}
    assert [(p.pp, p.dp, p.ep) for p in plans.values()] == [
        (6, 2, 8),
        (3, 4, 8),
        (6, 2, 8),
        (12, 1, 8),
    ]
    scale = [get_preset(f"deepseek-moe-{s}") for s in ("32b", "67b", "145b", "671b")]
    assert [(s.cluster.num_gpus, s.plan.pp, s.plan.dp) for s in scale] == [
        (512, 16, 4),
        (1536, 24, 8),
        (4096, 32, 16),
        (16384, 64, 32),
    ]


def test_validation_messages_name_field_and_fix():
    with pytest.raises(SimSpecError, match=r"ModelSpec.top_k.*Fix"):
        ModelSpec(
            name="x",
            num_layers=2,
            hidden_size=8,
            num_experts=2,
            top_k=3,
            expert_ffn_hidden_size=8,
            vocab_size=10,
            seq_length=4,
        )
    with pytest.raises(SimSpecError, match="ClusterSpec.d2h_bandwidth"):
        ClusterSpec(
            num_gpus=8,
            gpus_per_node=8,
            d2h_bandwidth=0,
            inter_node_bandwidth=1,
            storage_bandwidth=1,
        )
    with pytest.raises(SimSpecError, match="unknown field"):
        SimulationConfig.from_dict({"restart": 3})
    with pytest.raises(SimSpecError, match="ettr_model"):
        SimulationConfig(ettr_model="magic")


def test_scenario_checks_gpu_count_and_timing_source(toy):
    with pytest.raises(SimSpecError, match="GPUs"):
        toy.replace(plan=ParallelPlan(pp=2, dp=1, ep=4, num_microbatches=4, micro_batch_size=1))
    with pytest.raises(SimSpecError, match="exactly one timing source"):
        toy.replace(iteration_time_s=None)


def test_scenario_json_round_trip(tmp_path, toy):
    spec = toy.to_dict()
    spec["sim"] = {"restart_s": 12.0}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    scenario, config = load_scenario_file(path)
    assert scenario == toy
    assert config is not None and config.restart_s == 12.0
    cluster = dict(spec["cluster"], inter_node_bandwidth="80Gbps")
    assert ClusterSpec.from_dict(cluster).inter_node_bandwidth == pytest.approx(80 * GBPS)


def test_profile_round_trip_and_schema(tmp_path):
    profile = StageProfile(
        stages=(StageTimes(0.01, 0.01, 0.01, optimizer_s=0.002),) * 2,
        micro_batch_size=2,
        seq_length=128,
        source="measured",
        metadata={"device": "cpu"},
    )
    path = save_profile(profile, tmp_path / "p" / "profile.json")
    assert load_profile(path) == profile
    data = json.loads(path.read_text())
    assert data["schema"] == PROFILE_JSON_SCHEMA["properties"]["schema"]["const"]
    assert set(data["stages"][0]) <= set(
        PROFILE_JSON_SCHEMA["properties"]["stages"]["items"]["properties"]
    )
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(SimSpecError, match="version"):
        load_profile(path)
    path.write_text("{not json")
    with pytest.raises(SimSpecError, match="not valid JSON"):
        load_profile(path)


def test_profile_path_in_spec_is_resolved_relative_to_spec(tmp_path, toy):
    profile = StageProfile(stages=(StageTimes(0.01, 0.01, 0.01),) * toy.plan.pp)
    save_profile(profile, tmp_path / "prof.json")
    spec = toy.to_dict()
    del spec["iteration_time_s"]
    spec["profile_path"] = "prof.json"
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    scenario, _ = load_scenario_file(tmp_path / "spec.json")
    assert scenario.profile == profile
    wrong = StageProfile(stages=(StageTimes(0.01, 0.01, 0.01),))
    with pytest.raises(SimSpecError, match="stages"):
        Scenario(name="x", model=toy.model, cluster=toy.cluster, plan=toy.plan, profile=wrong)
