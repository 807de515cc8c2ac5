"""Models of the four checkpointing strategies and their interval policies.

Each strategy turns a :class:`~megatron_moevement.sim.context.ScenarioContext` and an MTBF into
a checkpoint interval, a per-iteration overhead and a recovery-time distribution, from which
the analytic ETTR follows; :meth:`Strategy.runtime` gives the same behaviour to the event-driven
timeline (Monte-Carlo and trace replay).

* **CheckFreq** [FAST'21] — dense snapshot to local host memory, persisted to durable storage in
  the background; interval: the smallest whose overhead stays under a cap (3.5% by default).
  Recovery: global rollback to the last *persisted* checkpoint; the replacement node reads its
  shards from storage.
* **Gemini** [SOSP'23] — dense snapshot replicated to peers' host memory; interval: the best in
  hindsight (search maximizing ETTR for the given MTBF, the paper's oracle policy). Recovery:
  global rollback to the last replicated checkpoint, fetched from peers.
* **MoC-System** [ASPLOS'25] — every iteration snapshots all non-expert state plus a fraction of
  each layer's experts (round robin); a failure loses the tokens the stale experts processed
  since their last snapshot, and each time the proportion of lost tokens exceeds its budget MoC
  doubles the fraction (up to every expert: dense checkpointing every iteration).
* **MoEvement** (this paper) — sparse window W from Algorithm 1, localized recovery: the failed
  stage's data-parallel group replays the W iterations of the last persisted sparse checkpoint
  (sparse-to-dense conversion, frozen operators skip weight-gradient and optimizer work) and
  then up to W more iterations, fed by upstream logs, without pipeline bubbles.

A dense checkpoint's cost per checkpoint is ``C(I) = copy_cost(S / B_d2h) + max(0, drain - I*T)``
(the snapshot copy stalls only beyond the overlap window; a background drain — replication or
persistence — that is still running when the next checkpoint is due delays it), and its
per-iteration overhead is ``C(I) / I``.

The four models stay in one module: they share the dense-checkpoint cost model, the interval
search and the recovery models, and the paper's comparison is between them.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from megatron_moevement.logging_utils import get_logger
from megatron_moevement.sim.context import ScenarioContext
from megatron_moevement.sim.ettr import (
    ettr_first_order,
    ettr_renewal,
    optimal_interval_first_order_s,
    young_daly_interval_s,
)
from megatron_moevement.sim.montecarlo import poisson_failure_times
from megatron_moevement.sim.pipeline import iteration_times, localized_iteration_s
from megatron_moevement.sim.profile import StageProfile
from megatron_moevement.sim.recovery import RecoveryModel
from megatron_moevement.sim.timeline import StaticRuntime, StrategyRuntime, run_timeline
from megatron_moevement.sim.window import StageWindow, job_windows

__all__ = [
    "STRATEGIES",
    "CheckFreq",
    "Gemini",
    "MoC",
    "MoEvement",
    "Strategy",
    "StrategyEvaluation",
    "get_strategy",
]

logger = get_logger(__name__)


@dataclass
class StrategyEvaluation:
    """Analytic result of one strategy at one MTBF."""

    strategy: str
    """Strategy name."""

    mtbf_s: float
    """Mean time between failures (s)."""

    interval_iterations: float
    """Iterations between checkpoints (1 for MoC and MoEvement, which checkpoint every
    iteration)."""

    window_iterations: Optional[int]
    """Iterations one checkpoint is spread over: 1 for dense checkpointing, W for MoEvement,
    ``None`` for MoC (unbounded: some experts may never be captured)."""

    iteration_s: float
    """Fault-free iteration time without checkpointing (s)."""

    overhead_s_per_iteration: float
    """Average checkpoint overhead per iteration (s)."""

    recovery_s: float
    """Expected recovery time per failure (s)."""

    recovery_min_s: float
    """Shortest recovery per failure (s)."""

    recovery_max_s: float
    """Longest recovery per failure (s)."""

    expected_failures: float
    """Failures expected over the horizon (horizon / MTBF)."""

    ettr: float
    """Analytic (expected-value) ETTR."""

    ettr_mc: Optional[float] = None
    """Monte-Carlo mean ETTR, when run."""

    ettr_mc_stderr: Optional[float] = None
    """Standard error of ``ettr_mc``."""

    details: Dict[str, Any] = field(default_factory=dict)
    """Strategy-specific facts (costs, lags, Young/Daly interval, MoC fraction ...)."""

    @property
    def overhead_fraction(self) -> float:
        """Overhead relative to the iteration time."""
        return self.overhead_s_per_iteration / self.iteration_s

    @property
    def total_recovery_s(self) -> float:
        """Expected recovery time summed over the horizon (the paper's "total recovery")."""
        return self.expected_failures * self.recovery_s

    def to_dict(self) -> Dict[str, Any]:
        """Returns a JSON-ready dict, derived fields included."""
        out = dataclasses.asdict(self)
        out["overhead_fraction"] = self.overhead_fraction
        out["total_recovery_s"] = self.total_recovery_s
        return out


class Strategy(ABC):
    """A checkpointing strategy model."""

    name: str = ""
    """Short name used in tables and JSON."""

    label: str = ""
    """Display name."""

    @abstractmethod
    def evaluate(self, ctx: ScenarioContext, mtbf_s: float) -> StrategyEvaluation:
        """Chooses the strategy's interval for ``mtbf_s`` and returns its analytic result."""

    @abstractmethod
    def runtime(self, ctx: ScenarioContext, mtbf_s: float) -> StrategyRuntime:
        """A fresh runtime for the timeline, configured as :meth:`evaluate` chose."""

    # ----- shared helpers ---------------------------------------------------------------

    @staticmethod
    def _ettr(
        ctx: ScenarioContext, overhead_s: float, recovery: RecoveryModel, mtbf_s: float
    ) -> float:
        """Analytic ETTR with the configured model (first order or renewal)."""
        o = overhead_s / ctx.iteration_s
        if ctx.config.ettr_model == "renewal":
            return ettr_renewal(o, recovery.mgf(1.0 / mtbf_s))
        return ettr_first_order(o, recovery.mean_s, mtbf_s)

    def _static_evaluation(
        self,
        ctx: ScenarioContext,
        mtbf_s: float,
        interval: float,
        window: Optional[int],
        overhead_s: float,
        recovery: RecoveryModel,
        details: Dict[str, Any],
    ) -> StrategyEvaluation:
        return StrategyEvaluation(
            strategy=self.name,
            mtbf_s=mtbf_s,
            interval_iterations=interval,
            window_iterations=window,
            iteration_s=ctx.iteration_s,
            overhead_s_per_iteration=overhead_s,
            recovery_s=recovery.mean_s,
            recovery_min_s=recovery.min_s,
            recovery_max_s=recovery.max_s,
            expected_failures=ctx.config.horizon_s / mtbf_s,
            ettr=self._ettr(ctx, overhead_s, recovery, mtbf_s),
            details=details,
        )


# ------------------------------------------------------------------------------------------
# Dense checkpointing
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DenseCosts:
    snapshot_s: float  # device-to-host copy of one GPU's dense share
    copy_cost_s: float  # training time that copy costs (stall + interference)
    drain_s: float  # background replication/persistence of one checkpoint
    load_s: float  # state loading at recovery


class _DenseStrategy(Strategy):
    """Shared model of CheckFreq and Gemini (dense checkpoint every I iterations)."""

    def _costs(self, ctx: ScenarioContext) -> _DenseCosts:
        snapshot_s = ctx.full_state_bytes_per_gpu / ctx.d2h_bandwidth
        return _DenseCosts(
            snapshot_s=snapshot_s,
            copy_cost_s=ctx.copy_cost_s(snapshot_s),
            drain_s=self._drain_s(ctx),
            load_s=self._load_s(ctx),
        )

    @abstractmethod
    def _drain_s(self, ctx: ScenarioContext) -> float:
        """Background time until a snapshot is durable (s)."""

    @abstractmethod
    def _load_s(self, ctx: ScenarioContext) -> float:
        """State loading time at recovery (s)."""

    @abstractmethod
    def _choose_interval(self, ctx: ScenarioContext, costs: _DenseCosts, mtbf_s: float) -> int:
        """The policy: iterations between checkpoints."""

    @staticmethod
    def _overhead_s(ctx: ScenarioContext, costs: _DenseCosts, interval: int) -> float:
        backlog = max(0.0, costs.drain_s - interval * ctx.iteration_s)
        return (costs.copy_cost_s + backlog) / interval

    def _recovery(self, ctx: ScenarioContext, costs: _DenseCosts, interval: int) -> RecoveryModel:
        wall = ctx.iteration_s + self._overhead_s(ctx, costs, interval)
        return RecoveryModel(
            restart_s=ctx.config.global_restart_s,
            load_s=costs.load_s,
            fixed_replay_s=0.0,
            per_lost_iteration_s=ctx.iteration_s,  # global rollback: whole pipeline re-runs
            cycle_iterations=float(interval),
            durability_lag_iterations=(costs.snapshot_s + costs.drain_s) / wall,
        )

    def _ettr_at(
        self, ctx: ScenarioContext, costs: _DenseCosts, interval: int, mtbf_s: float
    ) -> float:
        """Analytic ETTR at one interval (scalar reference of :meth:`Gemini._ettr_vector`)."""
        overhead = self._overhead_s(ctx, costs, interval)
        return self._ettr(ctx, overhead, self._recovery(ctx, costs, interval), mtbf_s)

    def _interval(self, ctx: ScenarioContext, costs: _DenseCosts, mtbf_s: float) -> int:
        key = f"{self.name}_interval_{mtbf_s!r}"
        if key not in ctx.cache:
            ctx.cache[key] = self._choose_interval(ctx, costs, mtbf_s)
        return ctx.cache[key]

    def evaluate(self, ctx: ScenarioContext, mtbf_s: float) -> StrategyEvaluation:
        costs = self._costs(ctx)
        interval = self._interval(ctx, costs, mtbf_s)
        overhead = self._overhead_s(ctx, costs, interval)
        recovery = self._recovery(ctx, costs, interval)
        young_s = young_daly_interval_s(costs.copy_cost_s, mtbf_s)
        details = {
            "snapshot_s": costs.snapshot_s,
            "checkpoint_cost_s": costs.copy_cost_s
            + max(0.0, costs.drain_s - interval * ctx.iteration_s),
            "drain_s": costs.drain_s,
            "load_s": costs.load_s,
            "durability_lag_iterations": recovery.durability_lag_iterations,
            "young_daly_interval_iterations": young_s / ctx.iteration_s,
            "first_order_optimal_interval_iterations": optimal_interval_first_order_s(
                costs.copy_cost_s, mtbf_s, recovery.base_s
            )
            / ctx.iteration_s,
        }
        return self._static_evaluation(ctx, mtbf_s, interval, 1, overhead, recovery, details)

    def runtime(self, ctx: ScenarioContext, mtbf_s: float) -> StrategyRuntime:
        costs = self._costs(ctx)
        interval = self._interval(ctx, costs, mtbf_s)
        return StaticRuntime(
            ctx.iteration_s,
            self._overhead_s(ctx, costs, interval),
            self._recovery(ctx, costs, interval),
        )


class CheckFreq(_DenseStrategy):
    """CheckFreq: two-phase (snapshot, persist) dense checkpointing with an overhead cap."""

    name = "checkfreq"
    label = "CheckFreq"

    def _drain_s(self, ctx: ScenarioContext) -> float:
        return ctx.total_state_bytes / ctx.storage_bandwidth

    def _load_s(self, ctx: ScenarioContext) -> float:
        cluster = ctx.scenario.cluster
        node_bytes = cluster.gpus_per_node * ctx.full_state_bytes_per_gpu
        from_storage = node_bytes / min(cluster.storage_bandwidth, cluster.inter_node_bandwidth)
        return max(from_storage, ctx.reload_from_host_s())

    def _choose_interval(self, ctx: ScenarioContext, costs: _DenseCosts, mtbf_s: float) -> int:
        cap = ctx.config.checkfreq_overhead_cap * ctx.iteration_s
        lo, hi = 1, 1
        while self._overhead_s(ctx, costs, hi) > cap:
            hi *= 2
            if hi > 10**9:  # pragma: no cover - only with absurd inputs
                return hi
        if hi == 1:
            return 1
        lo = hi // 2
        while hi - lo > 1:  # overhead is non-increasing in the interval
            mid = (lo + hi) // 2
            if self._overhead_s(ctx, costs, mid) > cap:
                lo = mid
            else:
                hi = mid
        return hi


class Gemini(_DenseStrategy):
    """Gemini: dense in-memory checkpointing to peers, interval chosen in hindsight (oracle)."""

    name = "gemini"
    label = "Gemini"

    def _drain_s(self, ctx: ScenarioContext) -> float:
        replicas = ctx.config.replication_factor
        return replicas * ctx.full_state_bytes_per_gpu / ctx.checkpoint_network_per_gpu

    def _load_s(self, ctx: ScenarioContext) -> float:
        return max(ctx.fetch_from_peers_s(ctx.full_state_bytes_per_gpu), ctx.reload_from_host_s())

    def _choose_interval(self, ctx: ScenarioContext, costs: _DenseCosts, mtbf_s: float) -> int:
        """Oracle: the interval maximizing the analytic ETTR for this MTBF.

        Every interval up to 20,000 is tried, larger ones (up to ``gemini_max_interval`` or
        2 x MTBF / iteration time, capped at 10^9) on a geometric grid refined around the best.
        """
        if math.isfinite(mtbf_s):
            default_limit = max(2, math.ceil(2.0 * mtbf_s / ctx.iteration_s))
        else:  # no failures: the longest interval searched has the least overhead
            default_limit = 10**6
        limit = min(ctx.config.gemini_max_interval or default_limit, 10**9)
        dense = np.arange(1, min(limit, 20_000) + 1, dtype=np.float64)
        grid = dense
        if limit > 20_000:
            grid = np.unique(np.concatenate([dense, np.round(np.geomspace(2e4, limit, 4000))]))
        values = self._ettr_vector(ctx, costs, grid, mtbf_s)
        best = int(np.argmax(values))
        if grid[best] > 20_000:  # refine between the neighbouring grid points
            lo, hi = int(grid[best - 1]), int(grid[min(best + 1, grid.size - 1)])
            fine = np.arange(lo, hi + 1, dtype=np.float64)
            fine_values = self._ettr_vector(ctx, costs, fine, mtbf_s)
            return int(fine[int(np.argmax(fine_values))])
        return int(grid[best])

    @staticmethod
    def _ettr_vector(
        ctx: ScenarioContext, costs: _DenseCosts, intervals: np.ndarray, mtbf_s: float
    ) -> np.ndarray:
        """Analytic ETTR for many intervals at once (same model as :meth:`_recovery`)."""
        t = ctx.iteration_s
        overhead = (costs.copy_cost_s + np.maximum(0.0, costs.drain_s - intervals * t)) / intervals
        lag = (costs.snapshot_s + costs.drain_s) / (t + overhead)
        base = ctx.config.global_restart_s + costs.load_s
        o = overhead / t
        if not math.isfinite(mtbf_s):
            return 1.0 / (1.0 + o)
        if ctx.config.ettr_model == "first_order":
            mean = base + t * (intervals / 2.0 + lag)
            return np.maximum(0.0, 1.0 - mean / mtbf_s) / (1.0 + o)
        # Renewal form: E[exp(T_rec / MTBF)] over the two uniform segments of RecoveryModel.
        k = t / mtbf_s
        n = np.floor(lag / intervals)
        r = lag - n * intervals
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            lo1, lo2 = (n + 1) * intervals, n * intervals + r
            w1, w2 = r, intervals - r
            seg1 = np.where(w1 > 0, np.exp(k * lo1) * np.expm1(k * w1) / (k * w1), 0.0)
            seg2 = np.where(w2 > 0, np.exp(k * lo2) * np.expm1(k * w2) / (k * w2), 0.0)
            mgf = np.exp(base / mtbf_s) * ((r / intervals) * seg1 + (w2 / intervals) * seg2)
            values = 1.0 / ((1.0 + o) * mgf)
        return np.nan_to_num(values, nan=0.0, posinf=0.0)


# ------------------------------------------------------------------------------------------
# MoC-System
# ------------------------------------------------------------------------------------------


class _MoCRuntime(StrategyRuntime):
    """MoC's adaptive state during a run: expert fraction and accumulated lost tokens."""

    def __init__(self, model: "MoC", ctx: ScenarioContext) -> None:
        super().__init__(ctx.iteration_s)
        self._model = model
        self._ctx = ctx
        self.fraction = max(ctx.config.moc_initial_fraction, 1.0 / ctx.scenario.model.num_experts)
        self.lost_token_iterations = 0.0
        self.history: List[Tuple[float, float]] = [(0.0, self.fraction)]

    def iteration_wall_s(self) -> float:
        return self.iteration_s + self._model.overhead_s(self._ctx, self.fraction)

    def on_failure(self, progress_iterations: float, expected: bool = False) -> float:
        ctx, cfg = self._ctx, self._ctx.config
        recovery = self._model.recovery(ctx, self.fraction)
        seconds = recovery.mean_s if expected else recovery.recovery_s(progress_iterations)
        stale = self._model.staleness_iterations(ctx, self.fraction)
        if cfg.moc_count_lost_tokens:
            seconds += stale * ctx.iteration_s * ctx.expert_work_share
        self.lost_token_iterations += stale
        if self.plt(progress_iterations) > cfg.moc_lost_token_budget and self.fraction < 1.0:
            self.fraction = min(1.0, self.fraction * cfg.moc_growth_factor)
            self.history.append((progress_iterations, self.fraction))
        return seconds

    def plt(self, progress_iterations: float) -> float:
        """Proportion of expert tokens lost so far."""
        return self.lost_token_iterations / max(progress_iterations, 1.0)

    def summary(self) -> Dict[str, Any]:
        return {
            "final_expert_fraction": self.fraction,
            "lost_token_iterations": self.lost_token_iterations,
            "fraction_history": [(round(p, 2), f) for p, f in self.history],
        }


class MoC(Strategy):
    """MoC-System: partial expert checkpointing every iteration with a lost-token budget."""

    name = "moc"
    label = "MoC"

    @staticmethod
    def snapshot_bytes(ctx: ScenarioContext, fraction: float) -> float:
        """Bytes one GPU snapshots per iteration with expert fraction ``fraction``."""
        return ctx.nonexpert_full_bytes_per_gpu + fraction * ctx.expert_full_bytes_per_gpu

    def overhead_s(self, ctx: ScenarioContext, fraction: float) -> float:
        """Per-iteration overhead with expert fraction ``fraction`` (s)."""
        size = self.snapshot_bytes(ctx, fraction)
        copy = ctx.copy_cost_s(size / ctx.d2h_bandwidth)
        replicate = ctx.config.replication_factor * size / ctx.checkpoint_network_per_gpu
        return copy + max(0.0, replicate - (ctx.iteration_s + copy))

    def recovery(self, ctx: ScenarioContext, fraction: float) -> RecoveryModel:
        """Recovery model with expert fraction ``fraction``: global rollback of <= 1 iteration."""
        size = self.snapshot_bytes(ctx, fraction)
        wall = ctx.iteration_s + self.overhead_s(ctx, fraction)
        lag = (
            size / ctx.d2h_bandwidth
            + ctx.config.replication_factor * size / ctx.checkpoint_network_per_gpu
        ) / wall
        return RecoveryModel(
            restart_s=ctx.config.global_restart_s,
            load_s=max(
                ctx.fetch_from_peers_s(ctx.full_state_bytes_per_gpu), ctx.reload_from_host_s()
            ),
            fixed_replay_s=0.0,
            per_lost_iteration_s=ctx.iteration_s,
            cycle_iterations=1.0,
            durability_lag_iterations=lag,
        )

    @staticmethod
    def staleness_iterations(ctx: ScenarioContext, fraction: float) -> float:
        """Expected iterations of expert updates lost per failure (round-robin staleness)."""
        experts = ctx.scenario.model.num_experts
        groups = math.ceil(experts / max(1, round(fraction * experts)))
        return (groups - 1) / 2.0

    def runtime(self, ctx: ScenarioContext, mtbf_s: float) -> StrategyRuntime:
        return _MoCRuntime(self, ctx)

    def evaluate(self, ctx: ScenarioContext, mtbf_s: float) -> StrategyEvaluation:
        """Expected ETTR under ``config.moc_failure_model``.

        MoC's overhead depends on the failure history (its fraction only grows, once PLT crosses
        the budget), so its result is obtained from runs rather than a formula: the mean of
        ``moc_expectation_trials`` seeded runs with Poisson failures (default), or the single run
        with failures evenly spaced at the MTBF (``"evenly_spaced"``, the mean-field value, which
        is always reported in the details). With a threshold policy the two differ: a cluster of
        early failures exhausts the budget, which evenly spaced failures never do.
        """
        cfg = ctx.config
        horizon = cfg.horizon_s
        count = max(0, round(horizon / mtbf_s)) if math.isfinite(mtbf_s) else 0
        evenly = _MoCRuntime(self, ctx)
        mean_field = run_timeline(
            evenly, [(k + 0.5) * mtbf_s for k in range(count)], horizon, expected_recovery=True
        )
        initial = self.recovery(ctx, evenly.history[0][1])
        details: Dict[str, Any] = {
            "initial_expert_fraction": evenly.history[0][1],
            "lost_token_budget": cfg.moc_lost_token_budget,
            "ettr_evenly_spaced": mean_field.ettr,
            "evenly_spaced": {
                "final_plt": evenly.plt(mean_field.progress_iterations),
                **mean_field.summary,
            },
        }
        runs = [(mean_field, evenly)]
        if cfg.moc_failure_model == "poisson" and count > 0:
            rng = np.random.default_rng(cfg.seed)
            runs = []
            for _ in range(cfg.moc_expectation_trials):
                runtime = _MoCRuntime(self, ctx)
                times = poisson_failure_times(mtbf_s, horizon, rng)
                runs.append((run_timeline(runtime, times, horizon), runtime))
        ettrs = np.array([r.ettr for r, _ in runs])
        finals = np.array([rt.fraction for _, rt in runs])
        useful = sum(r.useful_s for r, _ in runs)
        training = sum(r.training_s for r, _ in runs)
        failures = sum(r.failures for r, _ in runs)
        recovery_s = sum(r.recovery_s for r, _ in runs)
        details.update(
            {
                "failure_model": cfg.moc_failure_model if count > 0 else "none",
                "runs": len(runs),
                "ettr_stderr": (
                    float(ettrs.std(ddof=1) / math.sqrt(len(runs))) if len(runs) > 1 else 0.0
                ),
                "final_expert_fraction": float(finals.mean()),
                "runs_checkpointing_every_expert": float(np.mean(finals >= 1.0)),
                "final_plt": float(np.mean([rt.plt(r.progress_iterations) for r, rt in runs])),
            }
        )
        final = self.recovery(ctx, float(finals.max()))
        return StrategyEvaluation(
            strategy=self.name,
            mtbf_s=mtbf_s,
            interval_iterations=1.0,
            window_iterations=None,
            iteration_s=ctx.iteration_s,
            overhead_s_per_iteration=(
                (training / useful - 1.0) * ctx.iteration_s if useful > 0 else float("inf")
            ),
            recovery_s=recovery_s / failures if failures else initial.mean_s,
            recovery_min_s=min(initial.min_s, final.min_s),
            recovery_max_s=max(initial.max_s, final.max_s),
            expected_failures=horizon / mtbf_s,
            ettr=float(ettrs.mean()),
            details=details,
        )


# ------------------------------------------------------------------------------------------
# MoEvement
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _MoEvementPlan:
    schedules: List[StageWindow]
    overhead_s: float
    recovery: RecoveryModel
    details: Dict[str, Any]


class MoEvement(Strategy):
    """MoEvement: sparse checkpointing (Algorithm 1) with localized sparse-to-dense recovery."""

    name = "moevement"
    label = "MoEvement"

    def schedules(self, ctx: ScenarioContext) -> List[StageWindow]:
        """Algorithm 1's window and slot layout for every stage."""
        cfg = ctx.config
        return job_windows(
            ctx.stages,
            ctx.scenario.model.precision,
            ctx.shard_divisor,
            ctx.d2h_bandwidth,
            ctx.overlap_budget_s,
            max_window=cfg.max_window,
            by_popularity=cfg.popularity_ordering,
            skip_frozen_weight_grad=cfg.skip_frozen_weight_grad,
            fixed_window=cfg.fixed_window,
        )

    def _replay_iteration_s(
        self, ctx: ScenarioContext, schedules: List[StageWindow], step: Optional[int]
    ) -> float:
        """Expected time of one replayed iteration (``step`` j of the conversion, or ``None``
        for a fully active re-execution), averaged over the stage that failed."""
        m = ctx.scenario.plan.num_microbatches
        if ctx.config.localized_recovery:
            total = 0.0
            for s, (stage, sched) in enumerate(zip(ctx.profile.stages, schedules)):
                wg = 1.0 if step is None else float(sched.weight_grad_share[step])
                pr = 1.0 if step is None else float(sched.param_share[step])
                total += localized_iteration_s(stage, m, wg, pr, ctx.log_transfer_s(s))
            return total / len(schedules)
        # Without upstream logs every stage replays: a full pipeline iteration, with bubbles.
        stages = []
        for stage, sched in zip(ctx.profile.stages, schedules):
            wg = 1.0 if step is None else float(sched.weight_grad_share[step])
            pr = 1.0 if step is None else float(sched.param_share[step])
            stages.append(
                dataclasses.replace(
                    stage,
                    weight_grad_s=stage.weight_grad_s * wg,
                    optimizer_s=stage.optimizer_s * pr,
                    grad_sync_s=stage.grad_sync_s * pr,
                )
            )
        profile = StageProfile(stages=tuple(stages), source="given")
        plan = ctx.scenario.plan
        return iteration_times(profile, m, plan.virtual_pipeline_stages).iteration_s

    def plan(self, ctx: ScenarioContext) -> _MoEvementPlan:
        """Window, overhead and recovery model (independent of the MTBF; cached on ``ctx``)."""
        if "moevement_plan" not in ctx.cache:
            ctx.cache["moevement_plan"] = self._plan(ctx)
        return ctx.cache["moevement_plan"]

    def _plan(self, ctx: ScenarioContext) -> _MoEvementPlan:
        cfg = ctx.config
        schedules = self.schedules(ctx)
        window = schedules[0].window
        bw = ctx.d2h_bandwidth
        # Per-iteration copy cost: the slowest stage of each slot sets the pace.
        per_slot = [
            max(ctx.copy_cost_s(float(s.slot_bytes[j]) / bw) for s in schedules)
            for j in range(window)
        ]
        copy = sum(per_slot) / window
        mean_bytes = max(s.mean_slot_bytes for s in schedules)
        replicate = cfg.replication_factor * mean_bytes / ctx.checkpoint_network_per_gpu
        overhead = copy + max(0.0, replicate - (ctx.iteration_s + copy))
        wall = ctx.iteration_s + overhead
        last_slot = max(float(s.slot_bytes[-1]) for s in schedules)
        lag = (
            last_slot / bw + cfg.replication_factor * last_slot / ctx.checkpoint_network_per_gpu
        ) / wall
        # Loading slot 0 restores the window's first iteration; the j-th replay (j = 1..W-1)
        # runs with slots 0..j-1 active, and loading slot W-1 completes the dense state of the
        # window's last iteration: W - 1 replays (what the implementation does; the paper's
        # Fig. 8 also replays one all-active iteration past the window, counted here as lost).
        conversion = sum(self._replay_iteration_s(ctx, schedules, j) for j in range(window - 1))
        per_lost = self._replay_iteration_s(ctx, schedules, None)
        load = sum(
            max(ctx.fetch_from_peers_s(s.window_bytes), ctx.reload_from_host_s(s.window_bytes))
            for s in schedules
        ) / len(schedules)
        recovery = RecoveryModel(
            restart_s=cfg.restart_s if cfg.localized_recovery else cfg.global_restart_s,
            load_s=load,
            fixed_replay_s=conversion,
            per_lost_iteration_s=per_lost,
            cycle_iterations=float(window),
            durability_lag_iterations=lag,
            replayed_window_iterations=float(window - 1),
        )
        details = {
            "window": window,
            "window_fits": all(s.fits for s in schedules),
            "max_slot_snapshot_s": max(s.max_slot_s for s in schedules),
            "overlap_budget_s": ctx.overlap_budget_s,
            "conversion_s": conversion,
            "replay_iteration_s": per_lost,
            "conversion_vs_full_replay": (
                conversion / ((window - 1) * per_lost) if per_lost and window > 1 else 1.0
            ),
            "load_s": load,
            "durability_lag_iterations": lag,
            "localized_recovery": cfg.localized_recovery,
        }
        return _MoEvementPlan(schedules, overhead, recovery, details)

    def evaluate(self, ctx: ScenarioContext, mtbf_s: float) -> StrategyEvaluation:
        plan = self.plan(ctx)
        window = plan.schedules[0].window
        return self._static_evaluation(
            ctx, mtbf_s, 1.0, window, plan.overhead_s, plan.recovery, dict(plan.details)
        )

    def runtime(self, ctx: ScenarioContext, mtbf_s: float) -> StrategyRuntime:
        plan = self.plan(ctx)
        return _MoEvementRuntime(ctx.iteration_s, plan.overhead_s, plan.recovery)


class _MoEvementRuntime(StaticRuntime):
    """MoEvement during a run: windows restart after every recovery.

    After a recovery the implementation keeps the window it restored from as the persisted
    checkpoint and starts a new window at the interrupted iteration. A later failure rolls back
    to the newest window persisted since then, or, if none is persisted yet, to the restored one
    again. The static model's cycle position (progress modulo W) ignores that; it is exact only
    for the first failure and on average.
    """

    def __init__(self, iteration_s: float, overhead_s: float, recovery: RecoveryModel) -> None:
        super().__init__(iteration_s, overhead_s, recovery)
        self.origin = 0.0
        """Progress at which the current sequence of windows started."""
        self.restored_end: Optional[float] = None
        """Progress at the end of the window the last recovery restored from."""

    def on_failure(self, progress_iterations: float, expected: bool = False) -> float:
        if expected:
            return self.recovery.mean_s
        rec = self.recovery
        since = progress_iterations - self.origin
        windows = math.floor((since - rec.durability_lag_iterations) / rec.cycle_iterations)
        if windows >= 1:  # a window completed and persisted since the origin
            end = self.origin + windows * rec.cycle_iterations
        elif self.restored_end is not None:
            end = self.restored_end
        else:  # before the first persisted window of the run: the static model's value
            return rec.recovery_s(progress_iterations)
        self.restored_end = end
        self.origin = float(math.floor(progress_iterations))
        return rec.base_s + rec.per_lost_iteration_s * (progress_iterations - end)


STRATEGIES: Dict[str, Strategy] = {s.name: s for s in (CheckFreq(), Gemini(), MoC(), MoEvement())}
"""The four strategy models by name, in report order."""


def get_strategy(name: str) -> Strategy:
    """Returns the strategy model ``name`` (``checkfreq``, ``gemini``, ``moc``, ``moevement``)."""
    try:
        return STRATEGIES[name.lower()]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; known: {list(STRATEGIES)}") from None
