"""Top-level simulator: evaluates strategies over MTBFs, failure traces and Monte-Carlo runs.

Example::

    from megatron_moevement.sim import Simulator, get_preset

    sim = Simulator(get_preset("deepseek-moe"))
    result = sim.sweep([7200, 3600, 1800, 1200, 600], monte_carlo=True)
    for row in result.evaluations:
        print(row.strategy, row.mtbf_s, round(row.ettr, 3))
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from megatron_moevement.logging_utils import get_logger
from megatron_moevement.sim.config import STRATEGY_NAMES, SimulationConfig
from megatron_moevement.sim.context import ScenarioContext
from megatron_moevement.sim.montecarlo import monte_carlo, replay_trace
from megatron_moevement.sim.scenario import Scenario
from megatron_moevement.sim.strategies import StrategyEvaluation, get_strategy
from megatron_moevement.sim.units import format_duration

__all__ = ["SimulationResult", "Simulator", "TraceResult", "simulate"]

logger = get_logger(__name__)


@dataclass
class SimulationResult:
    """All evaluations of one scenario."""

    scenario: Scenario
    """The simulated job."""

    config: SimulationConfig
    """Knobs used."""

    iteration_s: float
    """Fault-free iteration time (s)."""

    bubble_s: float
    """Pipeline warm-up/cool-down idle time per iteration (s)."""

    evaluations: List[StrategyEvaluation] = field(default_factory=list)
    """One entry per (strategy, MTBF)."""

    elapsed_s: float = 0.0
    """Wall time the simulation took (s)."""

    @property
    def strategies(self) -> List[str]:
        """Strategies present, in report order."""
        seen: List[str] = []
        for e in self.evaluations:
            if e.strategy not in seen:
                seen.append(e.strategy)
        return seen

    @property
    def mtbfs(self) -> List[float]:
        """MTBFs present, in the order given."""
        seen: List[float] = []
        for e in self.evaluations:
            if e.mtbf_s not in seen:
                seen.append(e.mtbf_s)
        return seen

    def get(self, strategy: str, mtbf_s: float) -> StrategyEvaluation:
        """The evaluation of ``strategy`` at ``mtbf_s``."""
        for e in self.evaluations:
            if e.strategy == strategy and abs(e.mtbf_s - mtbf_s) < 1e-9:
                return e
        raise KeyError(f"no evaluation for {strategy} at MTBF {mtbf_s}s")

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready result."""
        model = self.scenario.model
        return {
            "scenario": self.scenario.to_dict(),
            "config": self.config.to_dict(),
            "derived": {
                "iteration_s": self.iteration_s,
                "bubble_s": self.bubble_s,
                "total_params": model.total_params,
                "active_params": model.active_params,
            },
            "evaluations": [e.to_dict() for e in self.evaluations],
            "elapsed_s": self.elapsed_s,
        }


@dataclass(frozen=True)
class TraceResult:
    """Outcome of replaying a failure trace with one strategy."""

    strategy: str
    """Strategy name."""

    ettr: float
    """Useful time over the trace duration."""

    failures: int
    """Failures in the trace (within the horizon)."""

    recovery_s: float
    """Total time spent recovering (s)."""

    overhead_fraction: float
    """Average checkpoint overhead over the fault-free iteration time."""

    summary: Dict[str, Any]
    """Strategy-specific end-of-run facts."""


class Simulator:
    """Evaluates checkpointing strategies for one scenario.

    Args:
        scenario: The job.
        config: Policy and environment knobs (defaults if ``None``).
    """

    def __init__(self, scenario: Scenario, config: Optional[SimulationConfig] = None) -> None:
        self.scenario = scenario
        self.config = config or SimulationConfig()
        self.ctx = ScenarioContext.build(scenario, self.config)
        logger.debug(
            "%s: iteration %.3fs (bubble %.3fs), dense share %.3f GB/GPU",
            scenario.name,
            self.ctx.iteration_s,
            self.ctx.times.bubble_s,
            self.ctx.full_state_bytes_per_gpu / 1e9,
        )

    def evaluate(
        self,
        mtbf_s: float,
        strategies: Sequence[str] = STRATEGY_NAMES,
        monte_carlo_trials: int = 0,
    ) -> List[StrategyEvaluation]:
        """Evaluates ``strategies`` at one MTBF.

        Args:
            mtbf_s: Mean time between failures (s).
            strategies: Strategy names.
            monte_carlo_trials: When > 0, also run that many seeded Monte-Carlo runs per
                strategy and fill ``ettr_mc``/``ettr_mc_stderr``.
        """
        out = []
        for name in strategies:
            strategy = get_strategy(name)
            evaluation = strategy.evaluate(self.ctx, mtbf_s)
            if monte_carlo_trials:
                mc = monte_carlo(
                    lambda: strategy.runtime(self.ctx, mtbf_s),
                    mtbf_s,
                    self.config.horizon_s,
                    monte_carlo_trials,
                    self.config.seed,
                )
                evaluation.ettr_mc = mc.ettr_mean
                evaluation.ettr_mc_stderr = mc.ettr_stderr
            out.append(evaluation)
        return out

    def sweep(
        self,
        mtbfs_s: Sequence[float],
        strategies: Sequence[str] = STRATEGY_NAMES,
        monte_carlo: bool = False,
    ) -> SimulationResult:
        """Evaluates every strategy at every MTBF, logging progress.

        Args:
            mtbfs_s: MTBFs (s).
            strategies: Strategy names.
            monte_carlo: Also run ``config.mc_trials`` Monte-Carlo runs per point.
        """
        start = time.perf_counter()
        result = SimulationResult(
            scenario=self.scenario,
            config=self.config,
            iteration_s=self.ctx.iteration_s,
            bubble_s=self.ctx.times.bubble_s,
        )
        trials = self.config.mc_trials if monte_carlo else 0
        for i, mtbf in enumerate(mtbfs_s, start=1):
            logger.info(
                "%s: MTBF %s (%d/%d)%s",
                self.scenario.name,
                format_duration(mtbf),
                i,
                len(mtbfs_s),
                f", {trials} Monte-Carlo runs per strategy" if trials else "",
            )
            result.evaluations.extend(self.evaluate(mtbf, strategies, trials))
        result.elapsed_s = time.perf_counter() - start
        return result

    def replay_trace(
        self,
        failure_times_s: Sequence[float],
        horizon_s: Optional[float] = None,
        strategies: Sequence[str] = STRATEGY_NAMES,
    ) -> List[TraceResult]:
        """Replays a failure trace with every strategy.

        Intervals are chosen for the trace's mean time between failures (horizon / failures),
        i.e. with hindsight, as the paper's Gemini oracle does.

        Args:
            failure_times_s: Failure instants from the start of the run (s).
            horizon_s: Run length; defaults to ``config.horizon_s``.
            strategies: Strategy names.
        """
        horizon = horizon_s or self.config.horizon_s
        inside = [t for t in failure_times_s if 0 <= t < horizon]
        mtbf = horizon / max(1, len(inside))
        out = []
        for name in strategies:
            strategy = get_strategy(name)
            run = replay_trace(strategy.runtime(self.ctx, mtbf), inside, horizon)
            out.append(
                TraceResult(
                    strategy=name,
                    ettr=run.ettr,
                    failures=run.failures,
                    recovery_s=run.recovery_s,
                    overhead_fraction=run.overhead_fraction,
                    summary=run.summary,
                )
            )
        return out


def simulate(
    scenario: Scenario,
    mtbfs_s: Sequence[float],
    config: Optional[SimulationConfig] = None,
    strategies: Sequence[str] = STRATEGY_NAMES,
    monte_carlo: bool = False,
) -> SimulationResult:
    """Convenience wrapper: ``Simulator(scenario, config).sweep(...)``."""
    return Simulator(scenario, config).sweep(mtbfs_s, strategies, monte_carlo)
