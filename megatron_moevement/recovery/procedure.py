"""One rank's part of one recovery, once its trainer and strategy are rebuilt on the new groups.

:class:`RecoveryProcedure` runs the phases every host of a recovery shares: the recovery driver
(:mod:`.driver`, which runs them back to back) and Megatron-LM's training loop
(:mod:`megatron_moevement.megatron.inloop`, which plans and fetches while Megatron rebuilds and
replays once its training loop is set up):

1. :meth:`~RecoveryProcedure.adopt` the rank's host state (a survivor's own, a replacement's
   from an earlier attempt);
2. :meth:`~RecoveryProcedure.plan`: gather where every rank stands (:class:`~.tiers.Survey`)
   and compute the :class:`~.tiers.RecoveryPlan`, asking the durable tier when needed;
3. :meth:`~RecoveryProcedure.fetch`: the plan's transfers;
4. :meth:`~RecoveryProcedure.restore_outside_scope` or :meth:`~RecoveryProcedure.replay`;
5. :meth:`~RecoveryProcedure.finish`: resume the strategy, and the :class:`RecoveryReport`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from megatron_moevement.logging_utils import get_logger
from megatron_moevement.recovery.errors import RecoveryError
from megatron_moevement.recovery.exchange import (
    exchange_checkpoints,
    exchange_logs,
    exchange_scalar_log,
)
from megatron_moevement.recovery.integrity import (
    corrupted_replicas,
    intact_windows,
    upstream_log_intact,
)
from megatron_moevement.recovery.live_state import restore_live_state
from megatron_moevement.recovery.replay_comm import make_replay_communicator
from megatron_moevement.recovery.scope import RankStatus
from megatron_moevement.recovery.tiers import (
    DURABLE,
    INITIAL_STATE,
    RecoveryPlan,
    Survey,
    plan_recovery,
    resolve_durable,
)
from megatron_moevement.snapshot.replication import choose_peers
from megatron_moevement.state.optim_view import ensure_optimizer_state
from megatron_moevement.state.rng import set_rng_state

logger = get_logger(__name__)

__all__ = ["RankRecoveryState", "RecoveryProcedure", "RecoveryReport", "describe"]


def describe(exc: BaseException) -> str:
    """``"Type: first line of the message"`` (for logs and reports)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


@dataclass
class RecoveryReport:
    """What one recovery did, for logs and tests."""

    generation: int
    """The process-group generation the job recovered into."""
    failed_ranks: list[int]
    scope: str
    """"scoped": only the ranks of the failed stages rolled back; "global": every rank did."""
    scope_ranks: list[int]
    """Ranks that rolled back and replayed."""
    reason: str
    """Why recovery was global rather than scoped (empty when scoped)."""
    tier: str
    """Where the rolled-back state came from: "sparse-checkpoint" (local + peer replicas),
    "durable" (the durable tier, for at least one rank) or "initial-state" (no checkpoint had
    persisted yet: every rank rebuilt the job's initial state and replayed from there)."""
    path: str
    """Which recovery ran: "scoped", "global" (in-memory) or "durable"."""
    committed_iteration: int
    """Last iteration every survivor had completed; training resumes after it."""
    window: int
    window_start: int
    iterations_replayed: list[int]
    microbatches_replayed: int
    spare: bool
    """Whether this rank joined as a spare."""
    times_s: dict = field(default_factory=dict)
    """detect, rebuild, fetch, replay (seconds)."""
    noticed_at: float = 0.0
    """Wall-clock time (``time.time()``) at which this rank noticed the failure."""
    replay_iteration_s: list[float] = field(default_factory=list)
    """Seconds of each replayed iteration, in order (empty outside the scope): a fresh spare's
    first iterations run cold (allocator, kernels), which the later ones show by contrast."""
    rebuild_steps_s: dict = field(default_factory=dict)
    """Where ``times_s["rebuild"]`` went (:func:`rebuild_breakdown`); empty where the recovery
    path does not time its rebuild."""

    def to_dict(self) -> dict:
        return asdict(self)


def rebuild_breakdown(total_s: float, gc_s: float, trainer_steps: dict | None) -> dict:
    """Splits a rebuild's ``total_s`` into its steps: ``gc`` (freeing the failed generation's
    trainer), the trainer's own timed setup steps (``HarnessTrainer.setup_times``: process
    groups, model, DDP + optimizer; absent for a trainer that does not time them) and
    ``strategy_and_rest``, the remainder: building the checkpointing strategy, whose replica
    check is a collective and so also holds this rank's wait for the slowest rank's build."""
    steps = {"gc": gc_s, **(trainer_steps or {})}
    steps["strategy_and_rest"] = max(0.0, total_s - sum(steps.values()))
    return steps


@dataclass
class RankRecoveryState:
    """What a rank carries from one recovery attempt to the next (host memory)."""

    committed: int = -1
    """The last iteration whose optimizer step completed on this rank."""
    has_state: bool = True
    """False on a replacement until it has recovered (its host memory is empty)."""
    dirty: bool = False
    """The failure interrupted this rank's optimizer step (its state may be half-updated)."""
    live_backup: dict | None = None
    """Host copy of the live training state, restored if the rank stays outside the scope."""
    received_checkpoint: Any = None
    """A replacement's fetched checkpoint."""
    received_log: dict | None = None
    """A replacement's received optimizer-scalar log."""


class RecoveryProcedure:
    """One rank's part of one recovery (see the module docstring).

    Args:
        rank: This rank.
        world_size: Ranks of the job.
        generation: The process-group generation being recovered into.
        trainer: The rebuilt :class:`~megatron_moevement.recovery.driver.Trainer`.
        strategy: Its rebuilt strategy.
        state: The rank's recovery state (updated in place).
        collectives: ``all_gather`` / ``barrier`` over the new process group.
        config: The job's ``MoEvementConfig``.
        durable_loader: The durable tier's loader, or ``None``.
        fault_hook: ``f(iteration, phase, host)`` at the fault-injection points ``fetch``,
            ``replay`` and
            ``recovery_wait``.
        initial_state: ``f() -> first iteration`` that checks the rebuild reproduces the job's
            initial state (the initial-state tier); ``None``: that tier is unavailable.
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        generation: int,
        trainer,
        strategy,
        state: RankRecoveryState,
        collectives,
        config,
        durable_loader=None,
        fault_hook: Callable | None = None,
        initial_state: Callable[[], int] | None = None,
    ) -> None:
        self.rank = rank
        self.world_size = world_size
        self.generation = generation
        self.trainer = trainer
        self.strategy = strategy
        self.state = state
        self.collectives = collectives
        self.config = config
        self.durable_loader = durable_loader
        self.fault_hook = fault_hook or (lambda *a: None)
        self.initial_state = initial_state
        self.spare = not state.has_state
        self.windows_started = 0
        self.plan_: RecoveryPlan | None = None
        self.checkpoint = None
        self.first_iteration: int | None = None
        self.feed: dict = {}
        self.survey_failed: list[int] = []
        self.replay_iteration_s: list[float] = []
        """Seconds of each iteration this rank replayed (for the report)."""

    # ------------------------------------------------------------------ phases
    def adopt(self, old) -> None:
        """Gives the rebuilt strategy this rank's host state: ``old`` (the failed generation's
        strategy) on a survivor, what an earlier attempt received on a replacement."""
        ensure_optimizer_state(self.trainer.optimizer)
        self.strategy.registry.refresh()
        if old is not None:
            self.strategy.adopt_host_state(old)
            return
        if self.state.received_checkpoint is not None:
            self.strategy.checkpoints = [self.state.received_checkpoint]
        if self.state.received_log is not None:
            self.strategy.scalar_log.load_dict(self.state.received_log)

    def survey(self, failed: list[int]) -> Survey:
        """Gathers where every rank stands (one collective)."""
        strategy, cfg, st = self.strategy, self.strategy.config, self.state
        if self.spare:
            received = st.received_checkpoint
            persisted = None if received is None else received.window
        else:
            own = strategy.persisted_checkpoint
            persisted = -1 if own is None else own.window
        # Only what verifies counts (recovery/integrity.py): a corrupted log makes this rank a
        # non-logging one (global rollback), a corrupted checkpoint or replica is not offered.
        logs_intact = self.spare or upstream_log_intact(strategy.upstream_log, self.rank)
        status = RankStatus(
            self.rank,
            self.trainer.pp_rank,
            self.trainer.dp_rank,
            -1 if self.spare else st.committed,
            st.dirty and not self.spare,
            not self.spare,
            strategy.upstream_log is not None and logs_intact,
            getattr(self.trainer, "tp_rank", 0),
        )
        mine = dict(
            status=asdict(status),
            persisted=persisted,
            windows=intact_windows(strategy.checkpoints, self.rank),
            corrupted_replicas=corrupted_replicas(strategy.replicator, self.rank),
            windows_started=0 if self.spare else strategy.windows_started,
            has_log=not self.spare or st.received_log is not None,
        )
        self.survey_failed = sorted(failed)
        everyone = self.collectives.all_gather(mine)
        windows = [e["persisted"] for e in everyone if e["persisted"] is not None]
        window = min(windows) if windows else -1
        self.windows_started = max(e["windows_started"] for e in everyone)
        return Survey(
            statuses=[RankStatus(**e["status"]) for e in everyone],
            failed=sorted(failed),
            window=window,
            holds_window=[window in e["windows"] for e in everyone],
            replica_peers=[
                choose_peers(
                    r, self.world_size, cfg.replication_factor, strategy.replicator_ranks_per_node
                )
                for r in range(self.world_size)
            ],
            has_scalar_log=[e["has_log"] for e in everyone],
            corrupted_replicas=[
                (holder, source)
                for holder, e in enumerate(everyone)
                for source, w in e["corrupted_replicas"]
                if w == window
            ],
            prefer_scoped=cfg.upstream_logging and cfg.recovery_scope == "auto",
            durable_dir_set=cfg.durable_dir is not None,
            durable_loader_installed=self.durable_loader is not None,
        )

    def plan(self, survey: Survey) -> RecoveryPlan:
        """The recovery plan, with the durable tier's answer when it is needed."""
        plan = plan_recovery(survey)
        if plan.needs_durable:
            plan = self.consult_durable_tier(plan, survey)
        if plan.tier == INITIAL_STATE and self.initial_state is None:
            raise RecoveryError(
                "no sparse checkpoint had persisted yet (failure in the first window) and this "
                "job records no initial state to replay from. Fix: restart from the durable tier "
                "or Megatron's --load."
            )
        self.plan_ = plan
        return plan

    def consult_durable_tier(self, plan: RecoveryPlan, survey: Survey) -> RecoveryPlan:
        """Asks the durable tier for this rank's checkpoint (on every rank, together), installs
        what the resolved plan needs and returns that plan (:func:`.tiers.resolve_durable`).

        Raises:
            RecoveryError: the loader failed, or the durable checkpoints cannot replace the lost
                ones (the message says why).
        """
        rank = self.rank
        logger.warning(
            "rank %d: ranks %s lack a surviving replica of their checkpoint; falling back to the "
            "durable tier (%s)",
            rank,
            plan.durable_ranks,
            self.config.durable_dir,
        )
        error = None
        mine = None
        try:
            mine = self.durable_loader(rank, getattr(self.trainer, "layout", None))
        except Exception as exc:
            error = f"the durable checkpoint loader failed on rank {rank}: {describe(exc)}"
        answers = self.collectives.all_gather(
            dict(window=-1 if mine is None else int(mine.window), error=error)
        )
        errors = [a["error"] for a in answers if a["error"]]
        if errors:
            raise RecoveryError(error or errors[0])
        resolved = resolve_durable(
            plan, survey, [a["window"] for a in answers], self.config.durable_dir or ""
        )
        if resolved.tier == INITIAL_STATE:
            logger.warning("rank %d: the durable tier holds no checkpoint of this run either", rank)
        elif resolved.window == survey.window:
            if rank in plan.durable_ranks:
                self.strategy.checkpoints = [mine]
                self.state.received_checkpoint = mine
            logger.warning(
                "rank %d: durable tier: window %d for ranks %s",
                rank,
                resolved.window,
                plan.durable_ranks,
            )
        else:
            self.strategy.checkpoints = [mine]
            if rank in survey.failed:
                self.state.received_checkpoint = mine
            logger.warning("rank %d: durable tier: %s", rank, resolved.reason)
        return resolved

    def fetch(self, plan: RecoveryPlan, survey: Survey) -> None:
        """Transfers what the plan needs: this rank's checkpoint to roll back to, the scalar
        log, and the upstream-log entries a scoped replay feeds on."""
        rank = self.rank
        self.fault_hook(plan.scope.committed, "fetch", self)
        if plan.tier == INITIAL_STATE:
            self.first_iteration = self.initial_state()
        else:
            received = exchange_checkpoints(rank, plan, self.strategy.replicator)
            if received is not None:
                self.strategy.checkpoints = [received]
                self.state.received_checkpoint = received
            mine = [c for c in self.strategy.checkpoints if c.window == plan.window]
            if not mine:
                raise RecoveryError(f"rank {rank} has no sparse checkpoint of window {plan.window}")
            self.checkpoint = mine[0]
        log = exchange_scalar_log(rank, plan, self.strategy.scalar_log)
        if log is not None:
            self.state.received_log = log
            self.strategy.scalar_log.load_dict(log)
        if plan.scope.scoped:
            self.feed = exchange_logs(
                rank,
                survey.statuses,
                plan.scope,
                self.strategy.upstream_log,
                list(range(self.checkpoint.start_iteration + 1, plan.scope.committed + 1)),
                self.trainer.num_microbatches,
            )
        if plan.tier == DURABLE:
            self.check_scalar_coverage(
                self.checkpoint.start_iteration + 1, plan.scope.committed, self.checkpoint
            )
        elif plan.tier == INITIAL_STATE:
            self.check_scalar_coverage(self.first_iteration, plan.scope.committed)

    @property
    def in_scope(self) -> bool:
        return self.rank in self.plan_.scope.ranks

    def restore_outside_scope(self) -> None:
        """Outside the scope: the live state as the committed iteration left it (parameters,
        optimizer state, buffers and RNG states; the failed iteration changed some)."""
        restore_live_state(self.strategy.registry, self.state.live_backup)
        set_rng_state(self.strategy.rng_after_step)

    def replay(self, train_iteration: Callable[[int], Any] | None = None) -> list[int]:
        """In scope: rolls back and replays to the committed iteration (through a replay
        communicator fed by the neighbours' logs when scoped). Returns the iterations replayed.

        Args:
            train_iteration: ``f(iteration)`` (default: the trainer's ``train_iteration``).
        """
        plan, committed = self.plan_, self.plan_.scope.committed
        run = train_iteration or self.trainer.train_iteration

        def replay_iteration(it: int) -> None:
            self.fault_hook(it, "replay", self)
            started = time.perf_counter()
            run(it)
            self.replay_iteration_s.append(time.perf_counter() - started)

        if plan.scope.scoped and self.trainer.layout.pp > 1:
            pp = self.trainer.pp_rank
            self.trainer.p2p_communicator = make_replay_communicator(
                self.strategy.gpt_model.config,
                self.feed,
                prev_in_scope=(pp - 1) in plan.scope.stages,
                next_in_scope=(pp + 1) in plan.scope.stages,
                upstream_log=self.strategy.upstream_log,
            )
        try:
            if self.checkpoint is None:
                report = self.strategy.replay_from_initial_state(
                    self.first_iteration, committed, replay_iteration
                )
            else:
                report = self.strategy.rollback_and_replay(
                    committed, replay_iteration, self.checkpoint
                )
        finally:
            self.trainer.p2p_communicator = self.strategy.p2p_communicator
        return report.iterations_replayed

    def finish(self, replayed: list[int], times: dict, noticed_at: float = 0.0) -> RecoveryReport:
        """Every rank, after the replay (and a barrier): the strategy resumes, the rank's state
        says it has recovered, and the report is logged and returned."""
        plan, ckpt = self.plan_, self.checkpoint
        committed = plan.scope.committed
        self.strategy.resume_after_recovery(committed, self.windows_started, ckpt)
        st = self.state
        st.committed, st.has_state, st.dirty, st.live_backup = committed, True, False, None
        report = RecoveryReport(
            generation=self.generation,
            failed_ranks=self.survey_failed,
            scope="scoped" if plan.scope.scoped else "global",
            scope_ranks=plan.scope.ranks,
            reason=plan.scope.reason,
            tier=plan.tier,
            path=plan.path,
            committed_iteration=committed,
            window=-1 if ckpt is None else ckpt.window,
            window_start=self.first_iteration - 1 if ckpt is None else ckpt.start_iteration,
            iterations_replayed=replayed,
            microbatches_replayed=len(replayed) * self.trainer.num_microbatches,
            spare=self.spare,
            times_s=times,
            noticed_at=noticed_at,
            replay_iteration_s=list(self.replay_iteration_s),
        )
        logger.warning(
            "rank %d recovered (generation %d, failed %s, path %s: %s recovery of ranks %s from "
            "window %d [%s]%s): replayed iterations %s; %s",
            self.rank,
            report.generation,
            report.failed_ranks,
            report.path,
            report.scope,
            report.scope_ranks,
            report.window,
            report.tier,
            f", because {report.reason}" if report.reason else "",
            report.iterations_replayed,
            " ".join(f"{k} {v:.3f}s" for k, v in times.items()),
        )
        return report

    def run_through(self, old, failed: list[int], times: dict, noticed_at: float = 0.0):
        """Every phase back to back (the recovery driver's way); returns the report."""
        t = time.perf_counter()
        self.adopt(old)
        survey = self.survey(failed)
        plan = self.plan(survey)
        self.fetch(plan, survey)
        times["fetch"] = time.perf_counter() - t
        t = time.perf_counter()
        if self.in_scope:
            replayed = self.replay()
        else:
            self.restore_outside_scope()
            self.fault_hook(plan.scope.committed, "recovery_wait", self)
            replayed = []
        self.collectives.barrier()  # ranks outside the scope wait here for the replay to finish
        times["replay"] = time.perf_counter() - t
        return self.finish(replayed, times, noticed_at)

    # ------------------------------------------------------------------ checks
    def check_scalar_coverage(self, first: int, committed: int, ckpt=None) -> None:
        """Replay from a durable checkpoint (``ckpt``) or from the initial state needs the
        scalar log of every replayed iteration, ``first..committed``, on every rank."""
        log = self.strategy.scalar_log
        missing = [it for it in range(first, committed + 1) if it not in log]
        if max(self.collectives.all_gather(len(missing))):
            source = (
                "the initial state"
                if ckpt is None
                else f"the durable checkpoint of window {ckpt.window}"
            )
            raise RecoveryError(
                f"replay from {source} starts at iteration {first}, but the scalar log in "
                f"memory covers {log.span()} (rank {self.rank} lacks {missing[:5]}): it "
                f"cannot be replayed to iteration {committed} bitwise. Restart the job from the "
                "durable tier."
            )
