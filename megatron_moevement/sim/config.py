"""Policy and environment knobs of a simulation run (:class:`SimulationConfig`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

from megatron_moevement.sim._validation import (
    check_fraction,
    check_int,
    check_real,
    fail,
    from_mapping,
)

__all__ = ["ETTR_MODELS", "MOC_FAILURE_MODELS", "STRATEGY_NAMES", "SimulationConfig"]

STRATEGY_NAMES = ("checkfreq", "gemini", "moc", "moevement")
"""Strategies the simulator models, in report order."""

MOC_FAILURE_MODELS = ("poisson", "evenly_spaced")
"""Failure processes MoC's expected ETTR can be taken over (see ``moc_failure_model``)."""

ETTR_MODELS = ("first_order", "renewal")
"""Analytic ETTR models: the paper's first-order formula or the exact renewal form."""


@dataclass(frozen=True)
class SimulationConfig:
    """Checkpointing policies, failure model and accounting options of a simulation."""

    ####################
    # failures and accounting
    ####################

    horizon_s: float = 12 * 3600.0
    """Length of the simulated training run (s). The paper's controlled-failure runs last 12 h
    (§5.2). Only MoC's adaptive policy and the Monte-Carlo runs depend on it."""

    restart_s: float = 5.0
    """Fixed cost of a localized recovery before any state is loaded (s): detection, a spare
    replacing the failed node, rebuilding the communicators it belongs to (MoEvement; the other
    workers stay paused with their state in place)."""

    global_restart_s: float = 30.0
    """Fixed cost of a global rollback before any state is loaded (s): every worker restarts
    its training loop, communicators and data pipeline (CheckFreq, Gemini, MoC). The paper's
    Gemini/CheckFreq recovery times exceed the half-interval rollback by tens of seconds per
    failure (Table 3); 30 s is an assumption, not a fit."""

    ettr_model: str = "first_order"
    """Analytic ETTR: ``"first_order"`` = ``(1 - E[T_rec] / MTBF) / (1 + overhead)`` (paper
    §2.4 and Appendix C); ``"renewal"`` = ``1 / ((1 + overhead) * E[exp(T_rec / MTBF)])``, exact
    when a failure during recovery restarts the recovery (as in the Monte-Carlo engine)."""

    mc_trials: int = 200
    """Monte-Carlo runs per (strategy, MTBF)."""

    seed: int = 0
    """Seed of the Monte-Carlo failure process."""

    ####################
    # shared checkpoint I/O model
    ####################

    copy_interference: float = 0.02
    """Slowdown of training per second of checkpoint copy that is overlapped with it (PCIe /
    host-memory contention), as a fraction: overlapped copy time ``c`` costs ``c * value``."""

    checkpoint_network_share: float = 0.5
    """Fraction of a node's network bandwidth that background checkpoint replication can use
    while training runs (training traffic takes the rest). Recovery uses the full link."""

    replication_factor: int = 1
    """Peers holding a copy of every in-memory snapshot (Gemini, MoC, MoEvement)."""

    ####################
    # CheckFreq
    ####################

    checkfreq_overhead_cap: float = 0.035
    """CheckFreq's policy: the smallest interval whose per-iteration overhead is at most this
    fraction of the iteration time (§5.2; §5.7 uses 3%)."""

    ####################
    # Gemini
    ####################

    gemini_max_interval: Optional[int] = None
    """Largest interval the Gemini oracle searches; ``None``: 2 x MTBF / iteration time."""

    ####################
    # MoC-System
    ####################

    moc_initial_fraction: float = 0.125
    """Fraction of each layer's experts MoC snapshots per iteration at the start (12.5%, §5.3)."""

    moc_lost_token_budget: float = 0.001
    """Budget on the proportion of lost tokens (PLT): cumulative expert-token updates lost on
    failures / expert tokens trained. After a failure that leaves PLT above it, MoC multiplies
    its per-iteration expert fraction by ``moc_growth_factor`` (never shrinking it again)."""

    moc_growth_factor: float = 2.0
    """Factor applied to MoC's expert fraction each time the lost-token budget is exceeded."""

    moc_failure_model: str = "poisson"
    """Failure process MoC's expected ETTR is taken over. MoC's policy has a threshold (its
    fraction grows when PLT crosses the budget, and never shrinks), so its ETTR is not a linear
    function of the failure times and the run with evenly spaced failures is not its expectation:
    ``"poisson"`` (default) averages ``moc_expectation_trials`` seeded runs with Poisson failures
    (the failure model of Appendix C, as for every other strategy's formula);
    ``"evenly_spaced"`` reports the single run with one failure every MTBF (the mean-field value,
    always kept in the details as ``ettr_evenly_spaced``)."""

    moc_expectation_trials: int = 200
    """Seeded runs averaged for MoC's expected ETTR under ``moc_failure_model="poisson"``."""

    moc_count_lost_tokens: bool = False
    """Charge MoC's lost expert updates as wasted time (lost iterations x expert share of the
    compute). False follows the paper, which reports MoC's ETTR without that charge."""

    ####################
    # MoEvement
    ####################

    popularity_skew: float = 0.25
    """Normalized HHI of expert popularity (Appendix D): 0 = uniform routing."""

    popularity_ordering: bool = True
    """Order operators by ascending popularity in the sparse window (§3.5)."""

    skip_frozen_weight_grad: bool = True
    """Frozen operators skip weight-gradient and optimizer work during replay (§3.3)."""

    localized_recovery: bool = True
    """Upstream logging confines replay to the failed stage's data-parallel group (§3.4);
    False replays the whole pipeline, with bubbles."""

    max_window: int = 256
    """Largest sparse window W Algorithm 1 tries."""

    fixed_window: Optional[int] = None
    """Force W instead of running Algorithm 1."""

    def __post_init__(self) -> None:
        owner = "SimulationConfig"
        check_real(owner, "horizon_s", self.horizon_s)
        check_real(owner, "restart_s", self.restart_s, strict=False)
        check_real(owner, "global_restart_s", self.global_restart_s, strict=False)
        if self.ettr_model not in ETTR_MODELS:
            fail(owner, "ettr_model", self.ettr_model, "is unknown", f"use one of {ETTR_MODELS}")
        check_int(owner, "mc_trials", self.mc_trials)
        check_int(owner, "seed", self.seed, minimum=0)
        check_real(owner, "copy_interference", self.copy_interference, strict=False)
        check_fraction(owner, "checkpoint_network_share", self.checkpoint_network_share, True)
        check_int(owner, "replication_factor", self.replication_factor, minimum=0)
        check_fraction(owner, "checkfreq_overhead_cap", self.checkfreq_overhead_cap, True)
        if self.gemini_max_interval is not None:
            check_int(owner, "gemini_max_interval", self.gemini_max_interval)
        check_fraction(owner, "moc_initial_fraction", self.moc_initial_fraction, True)
        check_fraction(owner, "moc_lost_token_budget", self.moc_lost_token_budget)
        check_real(owner, "moc_growth_factor", self.moc_growth_factor, minimum=1.0)
        if self.moc_failure_model not in MOC_FAILURE_MODELS:
            fail(
                owner,
                "moc_failure_model",
                self.moc_failure_model,
                "is unknown",
                f"use one of {MOC_FAILURE_MODELS}",
            )
        check_int(owner, "moc_expectation_trials", self.moc_expectation_trials)
        check_fraction(owner, "popularity_skew", self.popularity_skew, high_open=True)
        check_int(owner, "max_window", self.max_window)
        if self.fixed_window is not None:
            check_int(owner, "fixed_window", self.fixed_window)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SimulationConfig":
        """Builds the config from a dict (unknown keys are rejected)."""
        return from_mapping(cls, data)

    def to_dict(self) -> Dict[str, Any]:
        """Returns the JSON-ready field dict."""
        return dataclasses.asdict(self)
