"""MoC's adaptive policy, failure-trace replay and the Table 3 comparison."""

from __future__ import annotations

import pytest

from megatron_moevement.sim import SimulationConfig, Simulator, get_preset
from megatron_moevement.sim.paper_compare import compare_with_paper, format_comparison
from megatron_moevement.sim.paper_data import TABLE3, TABLE3_WINDOWS, TABLE7, paper_rows
from megatron_moevement.sim.strategies import STRATEGIES, MoC
from megatron_moevement.sim.timeline import run_timeline


def test_moc_fraction_grows_with_lost_tokens_and_never_shrinks():
    sim = Simulator(get_preset("deepseek-moe"))
    runtime = STRATEGIES["moc"].runtime(sim.ctx, 600.0)
    fractions = [runtime.fraction]
    progress = 0.0
    for _ in range(6):
        progress += 200.0
        runtime.on_failure(progress)
        fractions.append(runtime.fraction)
    assert fractions[0] == pytest.approx(0.125)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    # Overhead grows with the fraction: checkpointing every expert every iteration stalls.
    moc = STRATEGIES["moc"]
    assert moc.overhead_s(sim.ctx, 1.0) > moc.overhead_s(sim.ctx, 0.125)
    assert MoC.staleness_iterations(sim.ctx, 0.125) == pytest.approx(3.5)  # 8 groups of 8
    assert MoC.staleness_iterations(sim.ctx, 1.0) == 0.0


def test_moc_stays_sparse_with_rare_failures():
    sim = Simulator(get_preset("gpt-moe"))
    rare = sim.evaluate(24 * 3600.0, ["moc"])[0]
    assert rare.details["final_expert_fraction"] < 1.0


def test_trace_replay_counts_failures_and_ranks_moevement_first():
    sim = Simulator(get_preset("deepseek-moe"), SimulationConfig(horizon_s=6 * 3600.0))
    trace = [600.0 + 900.0 * k for k in range(24)]  # 24 failures in 6 h (§5.3's GCP trace rate)
    results = {r.strategy: r for r in sim.replay_trace(trace)}
    assert all(r.failures == 24 for r in results.values())
    assert max(results, key=lambda s: results[s].ettr) == "moevement"
    assert results["moc"].summary["final_expert_fraction"] == 1.0


def test_failure_during_recovery_restarts_it():
    sim = Simulator(get_preset("gpt-moe"))
    runtime = STRATEGIES["gemini"].runtime(sim.ctx, 3600.0)
    one = run_timeline(STRATEGIES["gemini"].runtime(sim.ctx, 3600.0), [1000.0], 7200.0)
    two = run_timeline(runtime, [1000.0, 1001.0], 7200.0)
    assert two.failures == 2
    assert two.recovery_s == pytest.approx(one.recovery_s + 1.0)


def test_table3_transcription():
    assert len(TABLE3) == 80 and len(TABLE7) == 60
    row = next(
        r
        for r in TABLE3
        if r.config == "DeepSeek-MoE" and r.mtbf_label == "10M" and r.strategy == "gemini"
    )
    assert (row.interval_iterations, row.overhead_s, row.overhead_percent) == (31, 0.38, 11)
    assert (row.total_recovery_s, row.ettr) == (3236, 0.728)
    assert TABLE3_WINDOWS == {"MoE-LLaVa": 3, "GPT-MoE": 3, "QWen-MoE": 5, "DeepSeek-MoE": 6}
    with pytest.raises(ValueError):
        paper_rows("4")


def test_table3_comparison_fed_and_model():
    comparison = compare_with_paper("3")
    assert len(comparison.rows) == 80
    row = comparison.rows[0]  # MoE-LLaVa, 2H, CheckFreq: 2% overhead, 1265 s recovery
    assert row.fed_ettr == pytest.approx((1 - 1265 / 43200) / 1.02)
    summary = comparison.summary()
    assert set(summary) == {"fed", "model"}
    assert summary["fed"]["overall"]["max_abs"] < 0.15
    assert summary["model"]["per_strategy"]["moevement"]["mean_abs"] < 0.03
    text = format_comparison(comparison)
    assert "max |dev|" in text and "DeepSeek-MoE" in text
    data = comparison.to_dict()
    assert data["rows"][0]["paper"]["config"] == "MoE-LLaVa"
    assert "paper_unexplained_s_per_failure" in data["rows"][0]


def test_moc_lost_token_charge_only_lowers_its_ettr():
    scenario = get_preset("gpt-moe")
    plain = Simulator(scenario).evaluate(7200.0)
    charged = Simulator(scenario, SimulationConfig(moc_count_lost_tokens=True)).evaluate(7200.0)
    for a, b in zip(plain, charged):
        if a.strategy == "moc":
            assert b.ettr < a.ettr and b.recovery_s > a.recovery_s
        else:
            assert b.ettr == pytest.approx(a.ettr)


def test_moc_expectation_is_over_poisson_failures():
    """MoC's policy is a threshold, so its expected ETTR is the mean over random failure times,
    not the run with evenly spaced failures (GPT-MoE at 2 h: clustered early failures exhaust
    the budget in some runs)."""
    scenario = get_preset("gpt-moe")
    poisson = Simulator(scenario).evaluate(7200.0, ["moc"])[0]
    evenly = Simulator(scenario, SimulationConfig(moc_failure_model="evenly_spaced"))
    mean_field = evenly.evaluate(7200.0, ["moc"])[0]
    assert mean_field.ettr == pytest.approx(poisson.details["ettr_evenly_spaced"])
    assert mean_field.details["runs"] == 1 and poisson.details["runs"] == 200
    assert poisson.ettr < mean_field.ettr - 5 * poisson.details["ettr_stderr"]
    assert 0.0 < poisson.details["runs_checkpointing_every_expert"] < 1.0
    # Same seed, same runs: the simulator's own Monte-Carlo column agrees exactly.
    with_mc = Simulator(scenario).evaluate(7200.0, ["moc"], monte_carlo_trials=200)[0]
    assert with_mc.ettr_mc == pytest.approx(poisson.ettr)


def test_moc_expectation_matches_evenly_spaced_without_threshold_crossings():
    """Known answer: when it already snapshots every expert, MoC is a static strategy and the Poisson
    mean agrees with the evenly spaced run within sampling error."""
    cfg = SimulationConfig(moc_initial_fraction=1.0)
    result = Simulator(get_preset("gpt-moe"), cfg).evaluate(1800.0, ["moc"])[0]
    assert result.details["final_expert_fraction"] == 1.0
    spread = 4 * result.details["ettr_stderr"] + 1e-3
    assert result.ettr == pytest.approx(result.details["ettr_evenly_spaced"], abs=spread)


def test_moc_failure_model_is_validated():
    with pytest.raises(ValueError, match="moc_failure_model"):
        SimulationConfig(moc_failure_model="uniform")
    with pytest.raises(ValueError, match="moc_expectation_trials"):
        SimulationConfig(moc_expectation_trials=0)


def test_table3_ranking_fed_and_model():
    comparison = compare_with_paper("3")
    ranking = {(r.config, r.mtbf_label): r for r in comparison.ranking()}
    assert len(ranking) == 20
    # The paper's own inputs through its own formula: MoEvement first everywhere.
    assert all(r.fed_moevement_margin > 0 for r in ranking.values())
    # The one order the fed column cannot reproduce is DeepSeek-MoE at 2 h, where the paper
    # prints Gemini at 0.910 although its 2% overhead and 800 s of recovery in 12 h give
    # 0.962 under Appendix C's formula (and puts MoC, fed 0.925, above it).
    assert [k for k, r in ranking.items() if not r.fed_agrees] == [("DeepSeek-MoE", "2H")]
    deepseek = ranking[("DeepSeek-MoE", "2H")]
    assert deepseek.fed["gemini"] == pytest.approx((1 - 800 / 43200) / 1.02)
    assert deepseek.fed["gemini"] - deepseek.paper["gemini"] > 0.05
    # A tie in the paper (QWen-MoE 2H: CheckFreq = MoC = 0.927) may come in either order.
    qwen = ranking[("QWen-MoE", "2H")]
    assert qwen.paper["checkfreq"] == qwen.paper["moc"] and qwen.fed_agrees
    summary = comparison.ranking_summary()
    assert summary["fed"]["moevement_first"] == 20
    assert summary["model"]["moevement_first"] >= 19
    assert "ranking, model" in format_comparison(comparison)
    assert comparison.to_dict()["ranking"][0]["paper_order"][0] == "moevement"
