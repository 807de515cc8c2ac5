"""Known answers: no failures, Young/Daly, half-interval recovery, §3.6 bounds, Monte-Carlo."""

from __future__ import annotations

import math

import numpy as np
import pytest

from megatron_moevement.sim import SimulationConfig, Simulator, get_preset, young_daly_interval_s
from megatron_moevement.sim.ettr import ettr_first_order, optimal_interval_first_order_s
from megatron_moevement.sim.montecarlo import monte_carlo, poisson_failure_times
from megatron_moevement.sim.recovery import RecoveryModel
from megatron_moevement.sim.strategies import STRATEGIES
from megatron_moevement.sim.timeline import run_timeline

from .conftest import toy_scenario

STRATEGY_LIST = list(STRATEGIES)


@pytest.mark.parametrize("strategy", STRATEGY_LIST)
def test_no_failures_ettr_is_useful_over_total_time(strategy):
    """With no failures ETTR = useful / total = 1 / (1 + overhead fraction)."""
    sim = Simulator(toy_scenario(d2h_gb_s=0.1))
    ev = sim.evaluate(math.inf, [strategy])[0]
    assert ev.expected_failures == 0
    assert ev.ettr == pytest.approx(1.0 / (1.0 + ev.overhead_fraction), rel=1e-12)
    for model in ("first_order", "renewal"):
        other = Simulator(sim.scenario, SimulationConfig(ettr_model=model))
        assert other.evaluate(math.inf, [strategy])[0].ettr == pytest.approx(ev.ettr)
    run = run_timeline(STRATEGIES[strategy].runtime(sim.ctx, math.inf), [], 3600.0)
    wall_per_iteration = sim.ctx.iteration_s * (1.0 + ev.overhead_fraction)
    assert run.ettr == pytest.approx(sim.ctx.iteration_s / wall_per_iteration, rel=1e-9)
    assert run.useful_s == pytest.approx(run.progress_iterations * sim.ctx.iteration_s)


def test_overhead_free_checkpointing_without_failures_has_ettr_one(quiet_config):
    sim = Simulator(toy_scenario(d2h_gb_s=1000.0), quiet_config)
    for ev in sim.evaluate(math.inf):
        assert ev.ettr == pytest.approx(1.0, abs=1e-9), ev.strategy


def test_gemini_oracle_matches_young_daly_where_it_applies(quiet_config):
    """Dense checkpoint cost C << MTBF: the best interval is ~sqrt(2 C MTBF) (Young/Daly)."""
    scenario = toy_scenario(d2h_gb_s=0.05, iteration_s=1.0)
    sim = Simulator(scenario, quiet_config)
    mtbf = 4 * 3600.0
    ev = sim.evaluate(mtbf, ["gemini"])[0]
    cost = ev.details["checkpoint_cost_s"]
    assert 1.0 < cost < 0.01 * mtbf  # the regime where Young's approximation holds
    young = young_daly_interval_s(cost, mtbf) / sim.ctx.iteration_s
    assert ev.interval_iterations == pytest.approx(young, rel=0.05)
    exact = optimal_interval_first_order_s(cost, mtbf, ev.recovery_min_s) / sim.ctx.iteration_s
    assert abs(ev.interval_iterations - exact) <= 1.0
    assert ev.details["young_daly_interval_iterations"] == pytest.approx(young)


def test_gemini_intervals_shrink_with_mtbf_like_sqrt():
    sim = Simulator(get_preset("deepseek-moe"))
    intervals = [sim.evaluate(m, ["gemini"])[0].interval_iterations for m in (7200, 1800, 450)]
    assert intervals[0] > intervals[1] > intervals[2]
    assert intervals[0] / intervals[2] == pytest.approx(4.0, rel=0.35)  # sqrt(16) = 4


def test_dense_expected_recovery_is_half_an_interval_plus_restart():
    model = RecoveryModel(
        restart_s=30.0,
        load_s=5.0,
        fixed_replay_s=0.0,
        per_lost_iteration_s=2.0,
        cycle_iterations=100.0,
    )
    assert model.mean_s == pytest.approx(30 + 5 + 2.0 * 50)
    assert (model.min_s, model.max_s) == (pytest.approx(35.0), pytest.approx(235.0))
    lagged = RecoveryModel(30.0, 5.0, 0.0, 2.0, 100.0, durability_lag_iterations=7.0)
    assert lagged.mean_lost_iterations == pytest.approx(50 + 7)
    rng = np.random.default_rng(1)
    samples = [lagged.sample_s(rng) for _ in range(20000)]
    assert np.mean(samples) == pytest.approx(lagged.mean_s, rel=0.01)


def test_simulated_dense_recovery_is_half_interval_plus_fixed_costs(quiet_config):
    sim = Simulator(toy_scenario(d2h_gb_s=0.05), quiet_config)
    ev = sim.evaluate(3600.0, ["gemini"])[0]
    t = sim.ctx.iteration_s
    expected = (
        quiet_config.global_restart_s
        + ev.details["load_s"]
        + t * (ev.interval_iterations / 2 + ev.details["durability_lag_iterations"])
    )
    assert ev.recovery_s == pytest.approx(expected)


def test_moevement_recovery_replays_between_w_and_2w_iterations():
    """§3.6: W - 1 iterations of sparse-to-dense conversion plus up to W more (the
    implementation's count; the paper's bound counts one more, see docs/simulator.md)."""
    sim = Simulator(get_preset("deepseek-moe"), SimulationConfig(replication_factor=0))
    ev = sim.evaluate(1800.0, ["moevement"])[0]
    plan = STRATEGIES["moevement"].plan(sim.ctx)
    rec, w = plan.recovery, ev.window_iterations
    assert w > 1 and rec.replayed_window_iterations == w - 1
    for progress in np.linspace(0, 10 * w, 97):
        lost = rec.lost_iterations(progress)
        assert 0.0 <= lost < w + rec.durability_lag_iterations + 1e-9
    # Replayed iterations: W - 1 (conversion) + lost, so between W - 1 and 2W - 1 (plus lag).
    assert rec.base_s <= rec.min_s <= rec.mean_s <= rec.max_s
    assert rec.max_s <= rec.base_s + rec.per_lost_iteration_s * (w + rec.durability_lag_iterations)
    assert rec.mean_lost_iterations == pytest.approx(w / 2 + rec.durability_lag_iterations)
    # Conversion replays W - 1 localized iterations, cheaper than full ones (frozen operators).
    assert 0 < rec.fixed_replay_s < (w - 1) * rec.per_lost_iteration_s
    # Localized replay iterations are cheaper than a pipeline iteration (no bubbles).
    assert rec.per_lost_iteration_s < sim.ctx.iteration_s
    # Dense checkpointing needs far more replay per failure at the same MTBF.
    gemini = sim.evaluate(1800.0, ["gemini"])[0]
    assert gemini.recovery_s > 2 * ev.recovery_s


def test_localized_recovery_beats_global_replay():
    scenario = get_preset("deepseek-moe")
    local = Simulator(scenario).evaluate(600.0, ["moevement"])[0]
    glob = Simulator(scenario, SimulationConfig(localized_recovery=False)).evaluate(
        600.0, ["moevement"]
    )[0]
    assert local.recovery_s < glob.recovery_s and local.ettr > glob.ettr


def test_poisson_failures_have_the_requested_rate():
    rng = np.random.default_rng(0)
    counts = [len(poisson_failure_times(600.0, 43200.0, rng)) for _ in range(300)]
    assert np.mean(counts) == pytest.approx(72, rel=0.03)


@pytest.mark.parametrize("strategy", ["checkfreq", "gemini", "moevement"])
def test_monte_carlo_agrees_with_analytic_expectation(strategy):
    """Fixed seed: MC within sampling error of the renewal form, and close to first order."""
    scenario = get_preset("qwen-moe")
    mtbf = 1800.0
    renewal = SimulationConfig(ettr_model="renewal", mc_trials=300, seed=7)
    sim = Simulator(scenario, renewal)
    ev = sim.evaluate(mtbf, [strategy], monte_carlo_trials=renewal.mc_trials)[0]
    assert ev.ettr_mc == pytest.approx(ev.ettr, abs=4 * ev.ettr_mc_stderr + 0.003)
    first = Simulator(scenario).evaluate(mtbf, [strategy])[0]
    assert ev.ettr_mc == pytest.approx(first.ettr, abs=0.01)


def test_monte_carlo_is_reproducible_for_a_seed():
    sim = Simulator(get_preset("gpt-moe"))
    runtime = lambda: STRATEGIES["gemini"].runtime(sim.ctx, 1200.0)  # noqa: E731
    a = monte_carlo(runtime, 1200.0, 43200.0, 20, seed=3)
    b = monte_carlo(runtime, 1200.0, 43200.0, 20, seed=3)
    c = monte_carlo(runtime, 1200.0, 43200.0, 20, seed=4)
    assert a == b and a != c


def test_first_order_formula():
    assert ettr_first_order(0.0, 0.0, 600.0) == 1.0
    assert ettr_first_order(0.25, 60.0, 600.0) == pytest.approx(0.9 / 1.25)
    assert ettr_first_order(0.0, 900.0, 600.0) == 0.0
    assert math.isclose(young_daly_interval_s(10.0, 7200.0), 379.47, rel_tol=1e-4)


@pytest.mark.parametrize("model", ["first_order", "renewal"])
def test_gemini_vectorized_search_matches_scalar_model(model):
    sim = Simulator(get_preset("deepseek-moe"), SimulationConfig(ettr_model=model))
    gemini = STRATEGIES["gemini"]
    costs = gemini._costs(sim.ctx)
    intervals = np.array([1.0, 3.0, 17.0, 90.0, 400.0])
    vector = gemini._ettr_vector(sim.ctx, costs, intervals, 1200.0)
    scalar = [gemini._ettr_at(sim.ctx, costs, int(i), 1200.0) for i in intervals]
    assert vector == pytest.approx(scalar, rel=1e-9)
