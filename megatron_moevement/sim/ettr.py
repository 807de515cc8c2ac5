"""Effective Training Time Ratio formulas and the Young/Daly interval.

ETTR is the fraction of wall-clock time spent on useful training (paper footnote 1). With
failures as a Poisson process of rate ``1 / MTBF``, a per-iteration checkpoint overhead
fraction ``o`` and an expected recovery ``E[T_rec]`` per failure, the paper (§2.4, Appendix C)
uses the first-order form::

    ETTR = (1 - E[T_rec] / MTBF) / (1 + o)

If a failure during a recovery restarts that recovery, renewal theory gives the exact form
``ETTR = 1 / ((1 + o) * E[exp(T_rec / MTBF)])``, which agrees to first order.

For dense checkpointing with per-checkpoint cost ``C``, iteration time ``T`` and
``E[T_rec] = a + I*T/2``, maximizing the first-order ETTR over the interval length
``x = I*T`` gives ``x* = sqrt(C^2 + 2*C*(MTBF - a)) - C``, which tends to Young's
``sqrt(2*C*MTBF)`` when ``C`` and ``a`` are small against the MTBF [Young 1974, Daly 2006].
"""

from __future__ import annotations

import math

__all__ = [
    "ettr_first_order",
    "ettr_from_totals",
    "ettr_renewal",
    "optimal_interval_first_order_s",
    "young_daly_interval_s",
]


def ettr_first_order(overhead_fraction: float, mean_recovery_s: float, mtbf_s: float) -> float:
    """Paper §2.4: ``max(0, 1 - E[T_rec] / MTBF) / (1 + o)``."""
    return max(0.0, 1.0 - mean_recovery_s / mtbf_s) / (1.0 + overhead_fraction)


def ettr_renewal(overhead_fraction: float, recovery_mgf: float) -> float:
    """Exact renewal form: ``1 / ((1 + o) * E[exp(T_rec / MTBF)])``.

    Args:
        overhead_fraction: Per-iteration checkpoint overhead over the iteration time.
        recovery_mgf: ``E[exp(T_rec / MTBF)]`` (see ``RecoveryModel.mgf``).
    """
    if not math.isfinite(recovery_mgf):
        return 0.0
    return 1.0 / ((1.0 + overhead_fraction) * recovery_mgf)


def ettr_from_totals(overhead_fraction: float, total_recovery_s: float, run_s: float) -> float:
    """ETTR of a run of ``run_s`` seconds that spent ``total_recovery_s`` recovering.

    This is the first-order formula with ``run_s / MTBF`` failures: the time not spent
    recovering is training, of which ``1 / (1 + o)`` is useful.
    """
    return max(0.0, 1.0 - total_recovery_s / run_s) / (1.0 + overhead_fraction)


def young_daly_interval_s(checkpoint_cost_s: float, mtbf_s: float) -> float:
    """Young's first-order optimal checkpoint interval ``sqrt(2 * C * MTBF)`` (s)."""
    return math.sqrt(2.0 * checkpoint_cost_s * mtbf_s)


def optimal_interval_first_order_s(
    checkpoint_cost_s: float, mtbf_s: float, fixed_recovery_s: float = 0.0
) -> float:
    """Exact maximizer of the first-order ETTR for dense checkpointing (s).

    Maximizes ``(1 - (a + x/2) / M) / (1 + C / x)`` over the interval length ``x``.
    """
    c, m, a = checkpoint_cost_s, mtbf_s, fixed_recovery_s
    if c <= 0:
        return 0.0
    return math.sqrt(c * c + 2.0 * c * max(0.0, m - a)) - c
