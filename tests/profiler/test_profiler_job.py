"""The profiler on the real harness model (2 processes, PP2): a valid measured profile that the
simulator accepts."""

import pytest

from megatron_moevement.profiler import profile_harness
from megatron_moevement.profiler.harness_scenario import harness_scenario, harness_sim_config
from megatron_moevement.sim import Simulator
from megatron_moevement.sim.profile import load_profile
from tests.profiler.test_profile_format import check_schema

pytestmark = pytest.mark.multiproc


def test_profiler_writes_a_measured_profile(tmp_path):
    from megatron_moevement.sim.profile import PROFILE_JSON_SCHEMA

    out = tmp_path / "profile.json"
    profile = profile_harness(
        "pp2",
        dict(precision="bf16"),
        iterations=2,
        warmup=1,
        output=out,
        config=dict(window_size=2, replication_factor=1),
    )
    check_schema(profile.to_dict(), PROFILE_JSON_SCHEMA)
    assert load_profile(out).stages == profile.stages
    assert profile.source == "measured" and profile.num_stages == 2
    for stage in profile.stages:
        assert stage.forward_s > 0 and stage.backward_s > 0 and stage.optimizer_s > 0
        assert stage.weight_grad_s >= 0 and stage.p2p_s > 0
    m = profile.metadata["measurements"]
    assert m["iteration_s"] > 0 and m["snapshot_bandwidth"] > 0 and m["rebuild_s"] > 0
    assert m["restart_s"] >= m["detect_s"] + m["rebuild_s"]
    assert profile.metadata["layout"]["pp"] == 2
    assert len(profile.metadata["rank_timings"]) == 2
    sim = Simulator(harness_scenario(profile), harness_sim_config(profile, fixed_window=2))
    evaluation = sim.evaluate(60.0, ["moevement"])[0]
    assert evaluation.window_iterations == 2 and 0 < evaluation.ettr < 1
