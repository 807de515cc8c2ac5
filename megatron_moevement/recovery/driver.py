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
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import torch.distributed as dist

from megatron_moevement.config import MoEvementConfig
from megatron_moevement.durable.recovery_loader import DurableTierLoader
from megatron_moevement.logging_utils import get_logger
from megatron_moevement.recovery.errors import RecoveryError
from megatron_moevement.recovery.live_state import (
    capture_live_state,
    state_fingerprint,
)
from megatron_moevement.recovery.procedure import (
    RankRecoveryState,
    RecoveryProcedure,
    RecoveryReport,
    describe,
    rebuild_breakdown,
)
from megatron_moevement.recovery.protocol import (
    ElasticContext,
    GenerationSuperseded,
    StoreKeys,
    _get_json,
    _has,
)

logger = get_logger(__name__)

__all__ = [
    "Collectives",
    "DurableCheckpointLoader",
    "ProcessGroupCollectives",
    "RecoveryDriver",
    "RecoveryReport",
    "Trainer",
    "check_initial_state",
    "note_failure",
    "record_initial_state",
    "teardown_groups",
]


@runtime_checkable
class Trainer(Protocol):
    """One rank's training job, as :class:`RecoveryDriver` drives it.

    ``build()`` returns one (with its strategy) on the current process group; it is rebuilt
    after every failure. ``HarnessTrainer`` (:mod:`megatron_moevement.harness.trainer`) and the
    Megatron-LM adapter (:class:`megatron_moevement.megatron.inloop.MegatronLMTrainer`) implement it.
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


def teardown_groups(ctx: ElasticContext, strategy) -> None:
    """Destroys every process group *and every reference to one*, so that the gloo/NCCL
    connections really close: that is what makes peers blocked on this rank fail fast. The
    strategy (if any) is abandoned; its host memory stays readable."""
    from megatron.core import parallel_state

    ctx.mark_torn_down()
    if strategy is not None:
        strategy.abandon()
    if dist.is_initialized():
        ctx.abort_collectives()
        try:
            dist.destroy_process_group()
        except Exception as exc:  # pragma: no cover - best effort on a broken group
            logger.debug("destroy_process_group failed: %s", exc)
    parallel_state.destroy_model_parallel()


def note_failure(state: RankRecoveryState, old) -> Any:
    """What a rank keeps of the failed generation: a copy of its live state (unless the failure
    interrupted its optimizer step: then it is *dirty* and must roll back) and the strategy
    whose host state the rebuilt one adopts. Returns that strategy (None without state)."""
    if old is not None and state.has_state and state.live_backup is None:
        state.dirty = old.step_in_progress
        if not state.dirty:
            state.live_backup = capture_live_state(old.registry, old.buffers_after_step)
    return old if state.has_state else None


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
        self.reports: list[RecoveryReport] = []
        self.joined_as_spare = ctx.is_spare_join
        self.state = RankRecoveryState(has_state=not ctx.is_spare_join)
        """What this rank carries across recoveries (committed iteration, host backups)."""
        self._noticed_at = 0.0
        """``time.time()`` when this rank last noticed a failure (for the report)."""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Starts the heartbeat, joins the process group and builds (a spare: recovers)."""
        # What exists before training (~400k objects of imported modules) is never garbage:
        # freezing it keeps the collection a recovery runs from walking it (0.2 s or more).
        gc.freeze()
        self.ctx.start_heartbeat(self.config.heartbeat_interval_s, self.config.heartbeat_timeout_s)
        if self.joined_as_spare:
            started = time.perf_counter()
            try:
                self.ctx.init_process_group()
            except GenerationSuperseded as exc:  # another rank failed meanwhile
                self._noticed_at = time.time()
                self.recover(describe(exc))
                return
            self._recover_as_spare(started)
        else:
            failure = None
            try:
                self.ctx.init_process_group()
                self.trainer, self.strategy = self.build()
            except (RuntimeError, ConnectionError) as exc:
                failure = self._peer_failure(exc)
            if failure is None:
                self._record_initial_state()
                return
            # A peer died while this rank was still joining or building (e.g. in a group's
            # rendezvous, which the heartbeat breaks). No iteration can have completed anywhere
            # without this rank: it survives with the job's initial state (which its rebuild
            # reproduces), nothing committed, and its first completed build records that state
            # (check_initial_state). So even when every rank's first build failed, planning
            # does not mistake them for ranks that lost their state. Outside the except block, as
            # in train().
            self.recover(failure)

    def train(self, iterations: int, on_iteration: Callable | None = None) -> None:
        """Trains until ``iterations`` iterations are committed on every rank and the last
        snapshots are flushed, recovering from failures on the way (also during the flush)."""
        while True:
            iteration = self.state.committed + 1
            failure = None
            try:
                if iteration < iterations:
                    self.fault_hook(iteration, "before", self)
                    self.trainer.train_iteration(iteration)
                    # The step completed: the state is that of `iteration` now, whatever happens
                    # in the snapshot call below.
                    self.state.committed = iteration
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
                failure = self._peer_failure(exc)
            # Outside the except block: the traceback (and the training frames it keeps alive,
            # with their process groups) must be gone before the teardown.
            self.recover(failure)

    def _peer_failure(self, exc: BaseException) -> str:
        """Describes a failed collective (``exc``) and notes when this rank noticed it; a
        :class:`RecoveryError` (the recovery itself cannot go on) is raised again instead."""
        if isinstance(exc, RecoveryError):
            raise exc
        self._noticed_at = time.time()
        return describe(exc)

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
        fault.old = note_failure(self.state, self.strategy)
        kept = time.perf_counter()
        while True:
            self._teardown()
            torn = time.perf_counter()
            info = self.ctx.wait_for_generation(self.ctx.generation)
            announced = time.perf_counter()
            self.ctx.generation = info["generation"]
            again = None
            try:
                self.ctx.init_process_group()
                logger.debug(
                    "rank %d: detect phases: keep live state %.3fs, teardown %.3fs, wait for "
                    "generation %.3fs, join %.3fs",
                    self.ctx.rank,
                    kept - fault.started,
                    torn - kept,
                    announced - torn,
                    time.perf_counter() - announced,
                )
                return self._recover_in_generation(fault, info)
            except (RuntimeError, ConnectionError) as exc:
                again = self._peer_failure(exc)
            logger.warning(
                "rank %d: failure during recovery (%s); widening and restarting",
                self.ctx.rank,
                again,
            )

    def _teardown(self) -> None:
        # No gc.collect() here: the groups are destroyed and their sockets severed, which is
        # what peers need; collecting the old trainer's cycles (a large heap walk) waits until
        # this rank has joined the next generation, as the first step of the rebuild.
        teardown_groups(self.ctx, self.strategy)
        self.trainer = None

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
        times = {"detect": time.perf_counter() - fault.started}
        t = time.perf_counter()
        gc.collect()  # frees the failed generation's trainer before its successor is built
        collected = time.perf_counter()
        self.trainer, self.strategy = self.build()
        times["rebuild"] = time.perf_counter() - t
        rebuild_steps = rebuild_breakdown(
            times["rebuild"], collected - t, getattr(self.trainer, "setup_times", None)
        )
        procedure = RecoveryProcedure(
            self.ctx.rank,
            self.ctx.world_size,
            self.ctx.generation,
            self.trainer,
            self.strategy,
            self.state,
            self.collectives,
            self.config,
            self.durable_loader,
            fault_hook=lambda it, phase, _: self.fault_hook(it, phase, self),
            initial_state=self._check_initial_state,
        )
        report = procedure.run_through(fault.old, info["failed"], times, self._noticed_at)
        report.rebuild_steps_s = rebuild_steps
        self.ctx.store.add(StoreKeys.stable(self.ctx.generation), 1)
        self.reports.append(report)
        return report

    # ------------------------------------------------------------------ checks
    def _record_initial_state(self) -> None:
        record_initial_state(self.ctx, self.strategy, self.state.committed + 1)

    def _check_initial_state(self) -> int:
        return check_initial_state(
            self.ctx, self.strategy, self.collectives, self.state.committed + 1
        )


def record_initial_state(ctx: ElasticContext, strategy, first_iteration: int) -> None:
    """Records where this rank's training starts (first iteration, weight fingerprint) in the
    job's store, for the initial-state tier: a failure before the first sparse checkpoint
    persisted is recovered by rebuilding every rank and replaying from there."""
    record = {
        "first_iteration": int(first_iteration),
        "fingerprint": state_fingerprint(strategy.registry),
    }
    ctx.store.set(StoreKeys.initial_state(ctx.rank), json.dumps(record))


def check_initial_state(
    ctx: ElasticContext, strategy, collectives: Collectives, start_iteration: int = 0
) -> int:
    """Checks on every rank that the fresh build reproduces the recorded initial state; returns
    the first iteration to replay. Raises :class:`RecoveryError` otherwise.

    ``start_iteration``: where this rank's training starts, for the case that no rank recorded
    an initial state (every first build failed); the job's start elsewhere."""
    key = StoreKeys.initial_state(ctx.rank)
    record = _get_json(ctx.store, key) if _has(ctx.store, key) else None
    problem = ""
    if record is not None and state_fingerprint(strategy.registry) != record["fingerprint"]:
        problem = (
            "its rebuilt model does not reproduce the weights the job started from (build() "
            "is not seeded identically, or the job started from a loaded checkpoint)"
        )
    # No record: this rank's first build never completed (it, or the rank a spare replaces,
    # failed while the job was still being built). Then no iteration ran anywhere, since none
    # completes without every rank, and this build is the rank's initial state.
    first = None if record is None else int(record["first_iteration"])
    answers = collectives.all_gather((bool(problem), first, int(start_iteration)))
    bad = [r for r, (flag, _, _) in enumerate(answers) if flag]
    firsts = {f for _, f, _ in answers if f is not None}
    start = max(s for _, _, s in answers)
    low = min(firsts, default=start)
    high = max(firsts, default=start)
    if record is None and not bad and low == high:
        record_initial_state(ctx, strategy, low)
    if bad or low != high:
        detail = f"rank {ctx.rank}: {problem}" if problem else f"ranks {bad} failed it"
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
        ctx.rank,
        low,
    )
    return low
