"""Iteration time (1F1B), the analytic estimator and Algorithm 1's window."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_moevement.sim import ComputeSpec, Simulator, StageProfile, StageTimes, get_preset
from megatron_moevement.sim.estimator import estimate_profile
from megatron_moevement.sim.operators import expert_popularity, normalized_hhi
from megatron_moevement.sim.pipeline import iteration_times, localized_iteration_s
from megatron_moevement.sim.profile import uniform_profile
from megatron_moevement.sim.window import job_windows, stage_window

from .conftest import toy_scenario


def test_1f1b_uniform_is_m_plus_p_minus_1():
    t = StageTimes(forward_s=1.0, backward_s=1.0, weight_grad_s=1.0, optimizer_s=0.5)
    times = iteration_times(StageProfile(stages=(t,) * 4), num_microbatches=8)
    assert times.pipeline_s == pytest.approx((8 + 4 - 1) * 3.0)
    assert times.iteration_s == pytest.approx(33.0 + 0.5)
    assert times.bubble_s == pytest.approx(3 * 3.0)
    interleaved = iteration_times(StageProfile(stages=(t,) * 4), 8, virtual_pipeline_stages=3)
    assert interleaved.pipeline_s == pytest.approx(8 * 3.0 + 3 * 3.0 / 3)


def test_1f1b_slowest_stage_sets_the_rhythm():
    fast = StageTimes(1.0, 1.0, 1.0)
    slow = StageTimes(2.0, 2.0, 2.0)
    times = iteration_times(StageProfile(stages=(fast, slow, fast)), num_microbatches=5)
    assert times.pipeline_s == pytest.approx((5 - 1) * 6.0 + (3 + 6 + 3))


def test_localized_replay_has_no_bubble_and_frozen_ops_skip_wgrad():
    t = StageTimes(1.0, 1.0, 1.0, optimizer_s=0.4)
    assert localized_iteration_s(t, 8) == pytest.approx(8 * 3 + 0.4)
    assert localized_iteration_s(t, 8, 0.5, 0.5) == pytest.approx(8 * 2.5 + 0.2)
    assert localized_iteration_s(t, 8, log_transfer_s=100.0) == 100.0


def test_uniform_profile_hits_the_requested_iteration_time():
    profile = uniform_profile(12, 16, 2.9)
    assert iteration_times(profile, 16).iteration_s == pytest.approx(2.9)


def test_analytic_estimator_scales_with_tflops():
    sc = get_preset("deepseek-moe-32b")
    slow = estimate_profile(sc.model, sc.cluster, sc.plan, ComputeSpec(tflops_per_gpu=100))
    fast = estimate_profile(sc.model, sc.cluster, sc.plan, ComputeSpec(tflops_per_gpu=200))
    assert slow.source == "analytic" and slow.num_stages == 16
    s, f = slow.stages[3], fast.stages[3]
    assert f.weight_grad_s == pytest.approx(s.weight_grad_s / 2)
    assert f.forward_s < s.forward_s


def test_popularity_skew_matches_target_hhi():
    for skew in (0.0, 0.1, 0.5, 0.9):
        shares = expert_popularity(64, skew)
        assert shares.sum() == pytest.approx(1.0)
        assert normalized_hhi(shares) == pytest.approx(skew, abs=1e-6)
        assert np.all(np.diff(shares) <= 1e-15)


def _window(scenario, **kw):
    sim = Simulator(scenario)
    ctx = sim.ctx
    return ctx, job_windows(
        ctx.stages,
        scenario.model.precision,
        ctx.shard_divisor,
        ctx.d2h_bandwidth,
        ctx.overlap_budget_s,
        **kw,
    )


def test_window_is_one_when_a_dense_snapshot_fits():
    ctx, schedules = _window(toy_scenario(d2h_gb_s=100.0))
    assert schedules[0].window == 1
    assert schedules[0].slot_bytes[0] == pytest.approx(ctx.full_state_bytes_per_gpu, rel=0.01)


def test_window_is_the_smallest_that_fits_and_grows_as_bandwidth_shrinks():
    windows = []
    for bw in (2.0, 0.5, 0.3, 0.2):
        ctx, schedules = _window(toy_scenario(d2h_gb_s=bw))
        w = schedules[0].window
        windows.append(w)
        assert all(s.fits for s in schedules)
        if w > 1:  # the next smaller window does not fit on some stage
            smaller = [
                stage_window(
                    ops,
                    w - 1,
                    ctx.scenario.model.precision,
                    ctx.shard_divisor,
                    ctx.d2h_bandwidth,
                    ctx.overlap_budget_s,
                )
                for ops in ctx.stages
            ]
            assert not all(s.fits for s in smaller)
    assert windows == sorted(windows) and windows[-1] > windows[0]


def test_slot_contents_follow_algorithm_1():
    scenario = toy_scenario(d2h_gb_s=0.2)
    ctx, schedules = _window(scenario)
    sched = schedules[1]
    ops = ctx.stages[1]
    prec = scenario.model.precision
    full = ops.params * prec.full_state_bytes / ctx.shard_divisor
    cw = ops.params * prec.compute_weight_bytes / ctx.shard_divisor
    w = sched.window
    for j in range(w):
        expected = full[sched.slot_of_operator == j].sum() + cw[sched.slot_of_operator > j].sum()
        assert sched.slot_bytes[j] == pytest.approx(expected)
    # Every operator has exactly one full snapshot per window; the last slot has no frozen part.
    assert sched.slot_bytes.sum() == pytest.approx(
        full.sum() + sum(cw[sched.slot_of_operator > j].sum() for j in range(w))
    )
    # Replay shares grow to 1 (all operators active in the last replayed iteration).
    assert np.all(np.diff(sched.weight_grad_share) >= 0) and sched.weight_grad_share[-1] == 1.0


def test_popularity_ordering_makes_conversion_cheaper():
    scenario = toy_scenario(d2h_gb_s=0.2)
    on = Simulator(scenario).evaluate(600, ["moevement"])[0]
    from megatron_moevement.sim import SimulationConfig

    off = Simulator(scenario, SimulationConfig(popularity_ordering=False)).evaluate(
        600, ["moevement"]
    )[0]
    no_skip = Simulator(scenario, SimulationConfig(skip_frozen_weight_grad=False)).evaluate(
        600, ["moevement"]
    )[0]
    assert on.details["conversion_s"] < off.details["conversion_s"]
    assert off.details["conversion_s"] < no_skip.details["conversion_s"]
    assert no_skip.details["conversion_vs_full_replay"] == pytest.approx(1.0)
    assert on.details["conversion_vs_full_replay"] < 1.0
