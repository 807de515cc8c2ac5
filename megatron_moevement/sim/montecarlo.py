"""Seeded Monte-Carlo failure simulation and failure-trace replay.

Failures form a Poisson process over wall-clock time (exponential gaps with mean MTBF); every
run feeds them to :func:`~megatron_moevement.sim.timeline.run_timeline` with a fresh strategy
runtime. Trace replay feeds given failure instants instead (e.g. the GCP trace of the paper's
§5.3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Sequence

import numpy as np

from megatron_moevement.sim.timeline import StrategyRuntime, TimelineResult, run_timeline

__all__ = ["MonteCarloResult", "monte_carlo", "poisson_failure_times", "replay_trace"]


def poisson_failure_times(mtbf_s: float, horizon_s: float, rng: np.random.Generator) -> List[float]:
    """Failure instants of a Poisson process with mean gap ``mtbf_s`` in ``[0, horizon_s)``."""
    times: List[float] = []
    now = 0.0
    while True:
        now += float(rng.exponential(mtbf_s))
        if now >= horizon_s:
            return times
        times.append(now)


@dataclass(frozen=True)
class MonteCarloResult:
    """Aggregate of several simulated runs."""

    ettr_mean: float
    """Mean ETTR over the runs."""

    ettr_std: float
    """Standard deviation of the runs' ETTR."""

    trials: int
    """Number of runs."""

    failures_mean: float
    """Mean failures per run."""

    recovery_s_mean: float
    """Mean time spent recovering per run (s)."""

    @property
    def ettr_stderr(self) -> float:
        """Standard error of ``ettr_mean``."""
        return self.ettr_std / math.sqrt(self.trials) if self.trials > 1 else 0.0


def monte_carlo(
    make_runtime: Callable[[], StrategyRuntime],
    mtbf_s: float,
    horizon_s: float,
    trials: int,
    seed: int,
) -> MonteCarloResult:
    """Runs ``trials`` seeded runs with Poisson failures.

    Args:
        make_runtime: Returns a fresh strategy runtime per run.
        mtbf_s: Mean time between failures (s).
        horizon_s: Length of each run (s).
        trials: Number of runs.
        seed: Seed of the failure process (same seed, same failures for every strategy).

    Returns:
        The aggregate.
    """
    rng = np.random.default_rng(seed)
    ettrs = np.empty(trials)
    failures = np.empty(trials)
    recovery = np.empty(trials)
    for i in range(trials):
        result = run_timeline(
            make_runtime(), poisson_failure_times(mtbf_s, horizon_s, rng), horizon_s
        )
        ettrs[i] = result.ettr
        failures[i] = result.failures
        recovery[i] = result.recovery_s
    return MonteCarloResult(
        ettr_mean=float(ettrs.mean()),
        ettr_std=float(ettrs.std(ddof=1)) if trials > 1 else 0.0,
        trials=trials,
        failures_mean=float(failures.mean()),
        recovery_s_mean=float(recovery.mean()),
    )


def replay_trace(
    runtime: StrategyRuntime, failure_times_s: Sequence[float], horizon_s: float
) -> TimelineResult:
    """Replays a failure trace (failure instants in seconds from the start of the run)."""
    return run_timeline(runtime, failure_times_s, horizon_s)
