"""The recovery driver: a training loop that survives killed and hung ranks.

:class:`RecoveryDriver` runs one rank's training through a :class:`Trainer` (the harness's
``HarnessTrainer``, Megatron-LM's loop, or a custom one) and a
:class:`~megatron_moevement.strategy.MoEvementStrategy`, and recovers when a collective fails.

Detection, by what fails:

* **Crash** (process killed, node lost): a dead peer makes gloo (and NCCL with async error
  handling) raise in the survivors that talk to it within milliseconds; each survivor then tears
  down its groups and shuts down its connections to job hosts, which makes every other rank's
  pending collective fail too, so the whole job notices without waiting for timeouts.
* **Hang** (a stopped process, a frozen node, a thread stuck holding the GIL): its sockets stay
  open, so nothing fails. Every rank runs a
  :class:`~megatron_moevement.recovery.protocol.Heartbeat`; the job's coordinator
  (:mod:`megatron_moevement.recovery.coordinator`) declares a rank whose heartbeat stopped
  failed, makes every survivor abort its collectives (the crash path from here on) and kills the
  silent process by pid, after which it is replaced like a crashed rank.
* Collective timeouts remain the last resort.

Recovery (:meth:`RecoveryDriver.recover`), in phases:

1. **rebuild**: tear down Megatron state and the process group, keep host memory (sparse
   checkpoints, peer replicas, the scalar log, upstream logs); wait for the coordinator's
   announcement and join the next process-group generation (spares take the failed ranks);
   rebuild model, optimizer and strategy there; survivors adopt their host state;
2. **plan**: every rank reports where it stands (a :class:`~.tiers.Survey`) and every rank
   computes the same :class:`~.tiers.RecoveryPlan` (:mod:`megatron_moevement.recovery.tiers`):
   scoped or global, and from which tier, asking the durable tier when a checkpoint has no
   surviving replica;
3. **fetch**: replacements receive their checkpoint from a peer replica and the scalar log from
   a survivor; replaying stages receive their out-of-scope neighbours' upstream logs
   (:mod:`megatron_moevement.recovery.exchange`);
4. **replay**: ranks in scope roll back and replay to the last committed iteration
   (sparse-to-dense conversion, then all-active replay with logged scalars, fed by the logs
   through :mod:`megatron_moevement.recovery.replay_comm`); the others restore their live state
   and wait. Training resumes after it.

A failure during recovery restarts it in the next generation with the widened set of failed
ranks. Every recovery is reported (:class:`RecoveryReport`) and logged: the path (``scoped``,
``global`` or ``durable``), the tier, the ranks that replayed and the time of each phase.

The initial-state tier: a failure before the first sparse checkpoint has persisted (in the
job's first window) has no checkpoint to roll back to. When the job starts, every rank records its
first iteration and a fingerprint of its weights in the store; after the rebuild every rank checks
that its fresh, seeded build reproduces them and replays (globally, with the logged scalars) from
the first iteration to the last committed one. A build that does not reproduce the initial weights
stops recovery with an error that says so.

The driver is one cohesive loop (its phases share the rank's recovery state); planning, transfers
and the replay communicator live in their own modules.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch.distributed as dist

from megatron_moevement.config import MoEvementConfig
from megatron_moevement.durable.recovery_loader import DurableTierLoader
from megatron_moevement.logging_utils import get_logger
from megatron_moevement.recovery.errors import RecoveryError
from megatron_moevement.recovery.exchange import (
    exchange_checkpoints,
    exchange_logs,
    exchange_scalar_log,
)
from megatron_moevement.recovery.live_state import (
    capture_live_state,
    restore_live_state,
    state_fingerprint,
)
from megatron_moevement.recovery.protocol import ElasticContext, StoreKeys, _get_json, _has
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

__all__ = [
    "Collectives",
    "DurableCheckpointLoader",
    "ProcessGroupCollectives",
    "RecoveryDriver",
    "RecoveryReport",
    "Trainer",
]


@runtime_checkable
class Trainer(Protocol):
    """One rank's training job, as :class:`RecoveryDriver` drives it.

    ``build()`` returns one (with its strategy) on the current process group; it is rebuilt
    after every failure. ``HarnessTrainer`` (:mod:`megatron_moevement.harness.trainer`) and the
    Megatron-LM trainer (:mod:`megatron_moevement.megatron.trainer`) implement it.
    """

    optimizer: Any
    """The Megatron optimizer (a rebuilt one gets empty Adam state to restore into)."""
    layout: Any
    """The job's parallel sizes: an object with ``tp``, ``pp``, ``dp`` and ``ep`` (checked
    against durable checkpoints; ``pp > 1`` enables scoped replay through upstream logs)."""
    pp_rank: int
    """This rank's pipeline stage."""
    dp_rank: int
    """This rank's data-parallel rank."""
    tp_rank: int
    """This rank's tensor-parallel rank (0 without tensor parallelism)."""
    num_microbatches: int
    """Microbatches per iteration (upstream logs hold one entry per microbatch)."""
    p2p_communicator: Any
    """The p2p communicator the pipeline schedule uses; the driver sets a replay communicator
    for a scoped replay and puts the strategy's back afterwards."""

    def train_iteration(self, iteration: int) -> Any:
        """Trains ``iteration`` on its own microbatches (forward/backward over all of them and
        the optimizer step); the data must be addressable by iteration, since replay calls this
        again for past iterations."""


class Collectives(Protocol):
    """The few collectives recovery planning needs (all ranks call them in the same order)."""

    def all_gather(self, obj: Any) -> list:
        """Every rank's ``obj``, by rank."""

    def barrier(self) -> None:
        """Waits for every rank."""


class ProcessGroupCollectives:
    """:class:`Collectives` over the current default process group (gloo: host objects)."""

    def all_gather(self, obj: Any) -> list:
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        dist.barrier()


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
    """Which recovery ran: "scoped", "global" (in-memory) or "durable" (see the module doc)."""
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

    def to_dict(self) -> dict:
        return asdict(self)


def describe(exc: BaseException) -> str:
    """``"Type: first line of the message"`` (for logs and reports)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


class DurableCheckpointLoader(Protocol):
    """The durable tier's side of recovery (the last fallback, after scoped and global in-memory
    recovery): returns ``rank``'s newest sparse checkpoint from durable storage, or None.

    Called on every rank, with the rank and its parallel layout (``trainer.layout``, None if the
    trainer has none), when a failed rank's checkpoint has no surviving replica. All ranks must
    return checkpoints of the same window (``SparseCheckpoint.window``).
    """

    def __call__(self, rank: int, layout: Any) -> Any:  # -> SparseCheckpoint | None
        ...


@dataclass
class _Fault:
    """Why this rank is recovering, and what of its state survived."""

    started: float
    """``time.perf_counter()`` when it noticed."""
    old: Any = None
    """The strategy of the failed generation (host state to adopt), if this rank had state."""


class RecoveryDriver:
    """Runs a training loop that survives killed and hung ranks.

    Args:
        ctx: This process's :class:`~megatron_moevement.recovery.protocol.ElasticContext`.
        build: ``build() -> (trainer, strategy)`` constructs a :class:`Trainer` and its
            :class:`~megatron_moevement.strategy.MoEvementStrategy` on the current process group.
        fault_hook: Optional ``f(iteration, phase, driver)`` called at fault-injection points.
        config: The job's :class:`~megatron_moevement.config.MoEvementConfig` (heartbeat settings,
            durable tier); default: the defaults.
        durable_loader: The durable tier's :class:`DurableCheckpointLoader`, used when
            ``config.durable_dir`` is set and a failed rank's checkpoint has no surviving replica.
            Default with ``durable_dir`` set:
            :class:`~megatron_moevement.durable.recovery_loader.DurableTierLoader` over it.
        collectives: How ranks agree while planning (default: the current process group).
    """

    def __init__(
        self,
        ctx: ElasticContext,
        build: Callable,
        fault_hook: Callable | None = None,
        config: MoEvementConfig | None = None,
        durable_loader: DurableCheckpointLoader | None = None,
        collectives: Collectives | None = None,
    ):
        self.ctx = ctx
        self.build = build
        self.fault_hook = fault_hook or (lambda *a: None)
        self.config = config or MoEvementConfig()
        if durable_loader is None and self.config.durable_dir is not None:
            # The real tier: the newest complete `dist_checkpointing` (backend moevement)
            # checkpoint the strategy's periodic saver wrote under durable_dir.
            durable_loader = DurableTierLoader(
                self.config.durable_dir, strategy_of=lambda: self.strategy
            )
        self.durable_loader = durable_loader
        """The durable tier's loader (a :class:`DurableCheckpointLoader`), or None."""
        self.collectives = collectives or ProcessGroupCollectives()
        self.trainer: Trainer | None = None
        self.strategy = None
        self.committed = -1
        """The last iteration whose optimizer step completed on this rank."""
        self.reports: list[RecoveryReport] = []
        self.joined_as_spare = ctx.is_spare_join
        self.has_state = not ctx.is_spare_join
        """False on a replacement until it has recovered (its host memory is empty)."""
        self.received_checkpoint = None
        """A replacement's fetched checkpoint, kept across recovery attempts."""
        self._received_log: dict | None = None
        """A replacement's received scalar log, kept across recovery attempts."""
        self._dirty = False
        """True when the failure interrupted this rank's optimizer step (state half-updated)."""
        self._live_backup: dict | None = None
        """Host copy of the live training state, restored after the rebuild if this rank is
        outside the recovery scope."""
        self._noticed_at = 0.0
        """``time.time()`` when this rank last noticed a failure (for the report)."""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Starts the heartbeat, joins the process group and builds (a spare: recovers)."""
        self.ctx.start_heartbeat(self.config.heartbeat_interval_s, self.config.heartbeat_timeout_s)
        self.ctx.init_process_group()
        if self.joined_as_spare:
            self._recover_as_spare(time.perf_counter())
        else:
            self.trainer, self.strategy = self.build()
            self._record_initial_state()

    def train(self, iterations: int, on_iteration: Callable | None = None) -> None:
        """Trains until ``iterations`` iterations are committed on every rank and the last
        snapshots are flushed, recovering from failures on the way (also during the flush)."""
        while True:
            iteration = self.committed + 1
            failure = None
            try:
                if iteration < iterations:
                    self.fault_hook(iteration, "before", self)
                    self.trainer.train_iteration(iteration)
                    # The step completed: the state is that of `iteration` now, whatever happens
                    # in the snapshot call below.
                    self.committed = iteration
                    self.fault_hook(iteration, "after_step", self)
                    self.strategy.after_optimizer_step(iteration)
                    self.fault_hook(iteration, "after_snapshot", self)
                    if on_iteration is not None:
                        on_iteration(iteration, self)
                    continue
                # Done: finish in-flight copies/replication and make sure every rank got here.
                self.strategy.flush()
                dist.barrier()
                return
            except (RuntimeError, ConnectionError) as exc:
                if isinstance(exc, RecoveryError):
                    raise
                self._noticed_at = time.time()
                failure = describe(exc)
            # Outside the except block: the traceback (and the training frames it keeps alive,
            # with their process groups) must be gone before the teardown.
            self.recover(failure)

    def close(self) -> None:
        """Stops the heartbeat (its last beat says this rank finished, so it is not silent)."""
        if self.ctx.heartbeat is not None:
            self.ctx.heartbeat.stop(done=True)

    # ------------------------------------------------------------------ recovery
    def recover(self, failure: str) -> RecoveryReport:
        """Recovers from a failed collective (``failure`` describes it)."""
        fault = _Fault(time.perf_counter())
        logger.warning(
            "rank %d: failure detected at generation %d (%s); recovering",
            self.ctx.rank,
            self.ctx.generation,
            failure,
        )
        old = self.strategy
        if old is not None and self.has_state and self._live_backup is None:
            self._dirty = old.step_in_progress
            if not self._dirty:
                self._live_backup = capture_live_state(old.registry, old.buffers_after_step)
        fault.old = old if self.has_state else None
        while True:
            self._teardown()
            info = self.ctx.wait_for_generation(self.ctx.generation)
            self.ctx.generation = info["generation"]
            again = None
            try:
                self.ctx.init_process_group()
                return self._recover_in_generation(fault, info)
            except (RuntimeError, ConnectionError) as exc:
                if isinstance(exc, RecoveryError):
                    raise
                self._noticed_at = time.time()
                again = describe(exc)
            logger.warning(
                "rank %d: failure during recovery (%s); widening and restarting",
                self.ctx.rank,
                again,
            )

    def _teardown(self) -> None:
        """Destroys every process group *and every reference to one*, so that the gloo/NCCL
        connections really close: that is what makes peers blocked on this rank fail fast."""
        from megatron.core import parallel_state

        self.ctx.mark_torn_down()
        if self.strategy is not None:
            self.strategy.abandon()
        if dist.is_initialized():
            self.ctx.abort_collectives()
            try:
                dist.destroy_process_group()
            except Exception as exc:  # pragma: no cover - best effort on a broken group
                logger.debug("destroy_process_group failed: %s", exc)
        parallel_state.destroy_model_parallel()
        self.trainer = None
        gc.collect()

    def _recover_as_spare(self, started: float) -> None:
        self._noticed_at = time.time()
        info = _get_json(self.ctx.store, StoreKeys.generation(self.ctx.generation))
        failure = None
        try:
            self._recover_in_generation(_Fault(started), info)
        except (RuntimeError, ConnectionError) as exc:
            if isinstance(exc, RecoveryError):
                raise
            failure = describe(exc)
        if failure is not None:
            self.recover(failure)

    def _recover_in_generation(self, fault: _Fault, info: dict) -> RecoveryReport:
        failed = sorted(info["failed"])
        spare = fault.old is None
        times = {"detect": time.perf_counter() - fault.started}
        t = time.perf_counter()
        self._rebuild(fault.old)
        times["rebuild"] = time.perf_counter() - t
        t = time.perf_counter()
        survey, windows_started = self._survey(failed, spare)
        plan = plan_recovery(survey)
        if plan.needs_durable:
            plan = self.consult_durable_tier(plan, survey)
        ckpt, first_iteration, feed = self._fetch(plan, survey)
        times["fetch"] = time.perf_counter() - t
        t = time.perf_counter()
        replay = self._replay_or_wait(plan, ckpt, first_iteration, feed)
        self.collectives.barrier()  # ranks outside the scope wait here for the replay to finish
        times["replay"] = time.perf_counter() - t
        committed = plan.scope.committed
        self.strategy.resume_after_recovery(committed, windows_started, ckpt)
        self.committed = committed
        self.has_state = True
        self._dirty = False
        self._live_backup = None
        self.ctx.store.add(StoreKeys.stable(self.ctx.generation), 1)
        return self._report(plan, failed, spare, ckpt, first_iteration, replay, times)

    # ------------------------------------------------------------------ phases
    def _rebuild(self, old) -> None:
        """Builds the trainer and strategy on the new groups and gives them this rank's host
        state (a survivor's own, a replacement's from an earlier attempt)."""
        self.trainer, self.strategy = self.build()
        ensure_optimizer_state(self.trainer.optimizer)
        self.strategy.registry.refresh()
        if old is not None:
            self.strategy.adopt_host_state(old)
        else:
            if self.received_checkpoint is not None:
                self.strategy.checkpoints = [self.received_checkpoint]
            if self._received_log is not None:
                self.strategy.scalar_log.load_dict(self._received_log)

    def _survey(self, failed: list[int], spare: bool) -> tuple[Survey, int]:
        """Gathers where every rank stands (one collective); returns the survey and the number
        of windows the job has begun."""
        strategy, cfg = self.strategy, self.strategy.config
        if spare:
            persisted = (
                None if self.received_checkpoint is None else self.received_checkpoint.window
            )
        else:
            own = strategy.persisted_checkpoint
            persisted = -1 if own is None else own.window
        status = RankStatus(
            self.ctx.rank,
            self.trainer.pp_rank,
            self.trainer.dp_rank,
            -1 if spare else self.committed,
            self._dirty and not spare,
            not spare,
            strategy.upstream_log is not None,
            getattr(self.trainer, "tp_rank", 0),
        )
        mine = dict(
            status=asdict(status),
            persisted=persisted,
            windows=[c.window for c in strategy.checkpoints],
            windows_started=0 if spare else strategy.windows_started,
            has_log=not spare or self._received_log is not None,
        )
        everyone = self.collectives.all_gather(mine)
        windows = [e["persisted"] for e in everyone if e["persisted"] is not None]
        window = min(windows) if windows else -1
        world = self.ctx.world_size
        survey = Survey(
            statuses=[RankStatus(**e["status"]) for e in everyone],
            failed=failed,
            window=window,
            holds_window=[window in e["windows"] for e in everyone],
            replica_peers=[
                choose_peers(r, world, cfg.replication_factor, strategy.replicator_ranks_per_node)
                for r in range(world)
            ],
            has_scalar_log=[e["has_log"] for e in everyone],
            prefer_scoped=cfg.upstream_logging and cfg.recovery_scope == "auto",
            durable_dir_set=cfg.durable_dir is not None,
            durable_loader_installed=self.durable_loader is not None,
        )
        return survey, max(e["windows_started"] for e in everyone)

    def consult_durable_tier(self, plan: RecoveryPlan, survey: Survey) -> RecoveryPlan:
        """Asks the durable tier for this rank's checkpoint (on every rank, together), installs
        what the resolved plan needs and returns that plan (:func:`.tiers.resolve_durable`).

        Raises:
            RecoveryError: the loader failed, or the durable checkpoints cannot replace the lost
                ones (the message says why).
        """
        rank = self.ctx.rank
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
                self.received_checkpoint = mine
            logger.warning(
                "rank %d: durable tier: window %d for ranks %s",
                rank,
                resolved.window,
                plan.durable_ranks,
            )
        else:
            self.strategy.checkpoints = [mine]
            if rank in survey.failed:
                self.received_checkpoint = mine
            logger.warning("rank %d: durable tier: %s", rank, resolved.reason)
        return resolved

    def _fetch(self, plan: RecoveryPlan, survey: Survey):
        """Transfers what the plan needs; returns this rank's checkpoint to roll back to (None
        for the initial state), the first iteration of an initial-state replay, and the upstream
        log entries a scoped replay feeds on."""
        rank = self.ctx.rank
        first_iteration = None
        if plan.tier == INITIAL_STATE:
            first_iteration = self._check_initial_state()
        ckpt = None
        if plan.tier != INITIAL_STATE:
            received = exchange_checkpoints(rank, plan, self.strategy.replicator)
            if received is not None:
                self.strategy.checkpoints = [received]
                self.received_checkpoint = received
            mine = [c for c in self.strategy.checkpoints if c.window == plan.window]
            if not mine:
                raise RecoveryError(f"rank {rank} has no sparse checkpoint of window {plan.window}")
            ckpt = mine[0]
        log = exchange_scalar_log(rank, plan, self.strategy.scalar_log)
        if log is not None:
            self._received_log = log
            self.strategy.scalar_log.load_dict(log)
        feed = {}
        if plan.scope.scoped:
            feed = exchange_logs(
                rank,
                survey.statuses,
                plan.scope,
                self.strategy.upstream_log,
                list(range(ckpt.start_iteration + 1, plan.scope.committed + 1)),
                self.trainer.num_microbatches,
            )
        if plan.tier == DURABLE:
            self._check_scalar_coverage(ckpt.start_iteration + 1, plan.scope.committed, ckpt)
        elif plan.tier == INITIAL_STATE:
            self._check_scalar_coverage(first_iteration, plan.scope.committed)
        return ckpt, first_iteration, feed

    def _replay_or_wait(self, plan: RecoveryPlan, ckpt, first_iteration, feed) -> list[int]:
        """In scope: roll back and replay to the committed iteration. Outside: restore the live
        state. Returns the iterations this rank replayed."""
        committed = plan.scope.committed
        if self.ctx.rank not in plan.scope.ranks:
            restore_live_state(self.strategy.registry, self._live_backup)
            # The generators as the committed iteration left them (the failed one drew more).
            set_rng_state(self.strategy.rng_after_step)
            self.fault_hook(committed, "recovery_wait", self)
            return []

        def replay_iteration(it: int) -> None:
            self.fault_hook(it, "replay", self)
            self.trainer.train_iteration(it)

        if plan.scope.scoped and self.trainer.layout.pp > 1:
            pp = self.trainer.pp_rank
            self.trainer.p2p_communicator = make_replay_communicator(
                self.strategy.gpt_model.config,
                feed,
                prev_in_scope=(pp - 1) in plan.scope.stages,
                next_in_scope=(pp + 1) in plan.scope.stages,
                upstream_log=self.strategy.upstream_log,
            )
        try:
            if ckpt is None:
                report = self.strategy.replay_from_initial_state(
                    first_iteration, committed, replay_iteration
                )
            else:
                report = self.strategy.rollback_and_replay(committed, replay_iteration, ckpt)
        finally:
            self.trainer.p2p_communicator = self.strategy.p2p_communicator
        return report.iterations_replayed

    def _report(self, plan, failed, spare, ckpt, first_iteration, replayed, times):
        report = RecoveryReport(
            generation=self.ctx.generation,
            failed_ranks=failed,
            scope="scoped" if plan.scope.scoped else "global",
            scope_ranks=plan.scope.ranks,
            reason=plan.scope.reason,
            tier=plan.tier,
            path=plan.path,
            committed_iteration=plan.scope.committed,
            window=-1 if ckpt is None else ckpt.window,
            window_start=first_iteration - 1 if ckpt is None else ckpt.start_iteration,
            iterations_replayed=replayed,
            microbatches_replayed=len(replayed) * self.trainer.num_microbatches,
            spare=spare,
            times_s=times,
            noticed_at=self._noticed_at,
        )
        self.reports.append(report)
        logger.warning(
            "rank %d recovered (generation %d, failed %s, path %s: %s recovery of ranks %s from "
            "window %d [%s]%s): replayed iterations %s; detect %.3fs rebuild %.3fs fetch %.3fs "
            "replay %.3fs",
            self.ctx.rank,
            report.generation,
            failed,
            report.path,
            report.scope,
            report.scope_ranks,
            report.window,
            report.tier,
            f", because {report.reason}" if report.reason else "",
            report.iterations_replayed,
            times["detect"],
            times["rebuild"],
            times["fetch"],
            times["replay"],
        )
        return report

    # ------------------------------------------------------------------ checks
    def _check_scalar_coverage(self, first: int, committed: int, ckpt=None) -> None:
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
                f"memory covers {log.span()} (rank {self.ctx.rank} lacks {missing[:5]}): it "
                f"cannot be replayed to iteration {committed} bitwise. Restart the job from the "
                "durable tier."
            )

    def _record_initial_state(self) -> None:
        """Records where this rank's training starts (first iteration, weight fingerprint) in
        the store, for the initial-state tier: a failure before the first sparse checkpoint
        persisted is recovered by rebuilding every rank and replaying from there."""
        record = {
            "first_iteration": self.committed + 1,
            "fingerprint": state_fingerprint(self.strategy.registry),
        }
        self.ctx.store.set(StoreKeys.initial_state(self.ctx.rank), json.dumps(record))

    def _check_initial_state(self) -> int:
        """Checks on every rank that the fresh build reproduces the recorded initial state;
        returns the first iteration to replay. Raises :class:`RecoveryError` otherwise."""
        key = StoreKeys.initial_state(self.ctx.rank)
        record = _get_json(self.ctx.store, key) if _has(self.ctx.store, key) else None
        problem = ""
        if record is None:
            problem = "no initial state was recorded for it (the driver did not start it)"
        elif state_fingerprint(self.strategy.registry) != record["fingerprint"]:
            problem = (
                "its rebuilt model does not reproduce the weights the job started from (build() "
                "is not seeded identically, or the job started from a loaded checkpoint)"
            )
        first = -1 if record is None else int(record["first_iteration"])
        answers = self.collectives.all_gather((bool(problem), first))
        bad = [r for r, (flag, _) in enumerate(answers) if flag]
        low = min(f for _, f in answers)
        high = max(f for _, f in answers)
        if bad or low != high:
            detail = f"rank {self.ctx.rank}: {problem}" if problem else f"ranks {bad} failed it"
            raise RecoveryError(
                "no sparse checkpoint has persisted yet (failure in the first window), so "
                "recovery must replay from the job's initial state, but the rebuild cannot "
                f"provide it ({detail}; first iterations {low}..{high}). Fix: seed build() so "
                "that it reproduces the initial weights, or configure the durable tier "
                "(MoEvementConfig.durable_dir); restart the job from the durable tier."
            )
        logger.warning(
            "rank %d: no sparse checkpoint persisted yet; initial-state tier: replay from "
            "iteration %d",
            self.ctx.rank,
            low,
        )
        return low
