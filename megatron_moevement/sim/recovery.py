"""Recovery time after one failure, as a function of where in the checkpoint cycle it hits.

Every strategy's recovery has the same shape (paper §3.6)::

    T_rec = restart + load + fixed_replay + per_lost_iteration * lost

* ``restart`` and ``load``: fixed costs (spare joins, state is fetched);
* ``fixed_replay``: MoEvement's sparse-to-dense conversion — W replayed iterations from the
  last persisted sparse checkpoint (0 for dense checkpointing);
* ``lost``: iterations since the last *durable* checkpoint, re-executed at
  ``per_lost_iteration`` seconds each (a full pipeline iteration for a global rollback, a
  bubble-free single-stage iteration for MoEvement's localized replay).

A checkpoint is taken every ``c`` iterations (the interval I, the window W, or 1 for MoC) and
becomes durable ``q`` iterations after it was taken (replication or persistence lag). With the
failure at a uniformly random position ``x`` in the cycle, ``lost = x + c * ceil((q - x) / c)``
for ``x < q`` and ``lost = x`` otherwise, so ``E[lost] = c / 2 + q``; for dense checkpointing
with ``q = 0`` that is the classic half interval [Daly 2006], and MoEvement's replay of
``W + lost`` iterations lies between W and 2W (§3.6).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

__all__ = ["RecoveryModel"]


@dataclass(frozen=True)
class RecoveryModel:
    """Distribution of the recovery time of one failure."""

    restart_s: float
    """Restart/rebuild cost (s)."""

    load_s: float
    """Time to load the checkpoint state (s)."""

    fixed_replay_s: float
    """Replay work that does not depend on the failure position (s)."""

    per_lost_iteration_s: float
    """Cost of re-executing one lost iteration (s)."""

    cycle_iterations: float
    """Iterations between checkpoints (c > 0)."""

    durability_lag_iterations: float = 0.0
    """Iterations after which a checkpoint becomes usable for recovery (q >= 0)."""

    replayed_window_iterations: float = 0.0
    """Iterations replayed by ``fixed_replay_s`` (W for MoEvement, 0 otherwise)."""

    @property
    def base_s(self) -> float:
        """Position-independent part of the recovery (s)."""
        return self.restart_s + self.load_s + self.fixed_replay_s

    def lost_iterations(self, progress_iterations: float) -> float:
        """Iterations to re-execute for a failure after ``progress_iterations`` iterations."""
        c, q = self.cycle_iterations, self.durability_lag_iterations
        position = math.fmod(progress_iterations, c)
        if position < q:
            position += c * math.ceil((q - position) / c)
        return position

    def recovery_s(self, progress_iterations: float) -> float:
        """Recovery time for a failure after ``progress_iterations`` iterations (s)."""
        return self.base_s + self.per_lost_iteration_s * self.lost_iterations(progress_iterations)

    def segments(self) -> List[Tuple[float, float, float]]:
        """``(probability, low, high)``: lost iterations are uniform on each segment."""
        c, q = self.cycle_iterations, self.durability_lag_iterations
        n = math.floor(q / c)
        r = q - n * c
        out = []
        if r > 0:
            out.append((r / c, (n + 1) * c, (n + 1) * c + r))
        out.append(((c - r) / c, n * c + r, (n + 1) * c))
        return [seg for seg in out if seg[0] > 0]

    @property
    def mean_lost_iterations(self) -> float:
        """Expected lost iterations for a uniformly random failure position."""
        return sum(p * 0.5 * (lo + hi) for p, lo, hi in self.segments())

    @property
    def mean_s(self) -> float:
        """Expected recovery time (s)."""
        return self.base_s + self.per_lost_iteration_s * self.mean_lost_iterations

    @property
    def min_s(self) -> float:
        """Shortest possible recovery (s)."""
        return self.base_s + self.per_lost_iteration_s * min(lo for _, lo, _ in self.segments())

    @property
    def max_s(self) -> float:
        """Longest possible recovery (s)."""
        return self.base_s + self.per_lost_iteration_s * max(hi for _, _, hi in self.segments())

    def mgf(self, rate: float) -> float:
        """``E[exp(rate * T_rec)]`` for a uniformly random failure position."""
        total = 0.0
        k = rate * self.per_lost_iteration_s
        for p, lo, hi in self.segments():
            width = hi - lo
            if k * width < 1e-12:
                total += p * math.exp(k * lo)
            else:
                total += p * (math.exp(k * hi) - math.exp(k * lo)) / (k * width)
        return math.exp(rate * self.base_s) * total

    def sample_s(self, rng: np.random.Generator) -> float:
        """Draws one recovery time for a uniformly random failure position (s)."""
        return self.recovery_s(rng.uniform(0.0, self.cycle_iterations))
