"""Event-driven timeline of one training run under failures.

A run is a sequence of training segments and recoveries. Training advances the committed
progress ``P`` (in iterations, continuous) at ``1 / iteration_wall_s`` iterations per second,
where the wall time of an iteration includes the strategy's checkpoint overhead. A failure at
progress ``P`` costs the strategy's recovery time for that position in its checkpoint cycle
(restart, load, replay of the lost iterations); afterwards training continues from ``P`` — the
lost work was redone inside the recovery. A failure that strikes during a recovery restarts the
recovery (the state to recover from has not moved). Useful time is ``P`` times the fault-free,
checkpoint-free iteration time, and ``ETTR = useful / wall``.

Strategies plug in through :class:`StrategyRuntime`; stateful ones (MoC's adaptive expert
fraction) update themselves in :meth:`StrategyRuntime.on_failure`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Dict, Sequence

from megatron_moevement.sim.recovery import RecoveryModel

__all__ = ["StaticRuntime", "StrategyRuntime", "TimelineResult", "run_timeline"]


class StrategyRuntime(ABC):
    """A strategy's behaviour during one run (fresh instance per run)."""

    def __init__(self, iteration_s: float) -> None:
        self.iteration_s = iteration_s
        """Fault-free iteration time without checkpointing (s)."""

    @abstractmethod
    def iteration_wall_s(self) -> float:
        """Current wall time of one training iteration including checkpoint overhead (s)."""

    @abstractmethod
    def on_failure(self, progress_iterations: float, expected: bool = False) -> float:
        """Handles a failure at ``progress_iterations`` and returns its recovery time (s).

        Args:
            progress_iterations: Committed progress when the failure strikes.
            expected: Return the expected recovery over the cycle position instead of the one
                for this exact position (mean-field runs).
        """

    def summary(self) -> Dict[str, Any]:
        """Strategy-specific end-of-run facts (e.g. MoC's final expert fraction)."""
        return {}


class StaticRuntime(StrategyRuntime):
    """A strategy whose overhead and recovery model never change during a run."""

    def __init__(self, iteration_s: float, overhead_s: float, recovery: RecoveryModel) -> None:
        super().__init__(iteration_s)
        self.overhead_s = overhead_s
        self.recovery = recovery

    def iteration_wall_s(self) -> float:
        return self.iteration_s + self.overhead_s

    def on_failure(self, progress_iterations: float, expected: bool = False) -> float:
        if expected:
            return self.recovery.mean_s
        return self.recovery.recovery_s(progress_iterations)


@dataclass
class TimelineResult:
    """Outcome of one simulated run."""

    horizon_s: float
    """Wall time of the run (s)."""

    progress_iterations: float = 0.0
    """Committed training progress at the end (iterations)."""

    useful_s: float = 0.0
    """``progress * fault-free iteration time`` (s)."""

    training_s: float = 0.0
    """Wall time spent training, checkpoint overhead included (s)."""

    recovery_s: float = 0.0
    """Wall time spent recovering (s)."""

    failures: int = 0
    """Failures that struck, including those during recoveries."""

    summary: Dict[str, Any] = field(default_factory=dict)
    """The runtime's :meth:`StrategyRuntime.summary` at the end."""

    @property
    def ettr(self) -> float:
        """Useful time over wall time."""
        return self.useful_s / self.horizon_s

    @property
    def overhead_fraction(self) -> float:
        """Average checkpoint overhead relative to the fault-free iteration time."""
        return self.training_s / self.useful_s - 1.0 if self.useful_s > 0 else float("inf")


def run_timeline(
    runtime: StrategyRuntime,
    failure_times_s: Sequence[float],
    horizon_s: float,
    expected_recovery: bool = False,
) -> TimelineResult:
    """Simulates one run.

    Args:
        runtime: Fresh runtime of the strategy.
        failure_times_s: Failure instants (s), any order; those at or after the horizon are
            ignored.
        horizon_s: Run length (s).
        expected_recovery: Use expected recovery times (mean-field run) instead of the exact
            position-dependent ones.

    Returns:
        The run's accounting.
    """
    times = sorted(t for t in failure_times_s if 0.0 <= t < horizon_s)
    result = TimelineResult(horizon_s=horizon_s)
    now = 0.0
    progress = 0.0
    index = 0
    while True:
        next_failure = times[index] if index < len(times) else horizon_s
        if next_failure > now:
            progress += (next_failure - now) / runtime.iteration_wall_s()
            result.training_s += next_failure - now
            now = next_failure
        if index >= len(times):
            break
        index += 1
        result.failures += 1
        recovery = runtime.on_failure(progress, expected_recovery)
        # A failure during the recovery restarts it.
        while index < len(times) and times[index] < now + recovery:
            result.recovery_s += times[index] - now
            now = times[index]
            index += 1
            result.failures += 1
            recovery = runtime.on_failure(progress, expected_recovery)
        end = min(now + recovery, horizon_s)
        result.recovery_s += end - now
        now = end
        if now >= horizon_s:
            break
    result.progress_iterations = progress
    result.useful_s = progress * runtime.iteration_s
    result.summary = runtime.summary()
    return result
