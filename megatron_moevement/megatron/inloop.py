"""In-memory recovery inside Megatron-LM's own training loop (``pretrain_gpt.py``).

When a rank of a Megatron-LM job dies, the job goes on in the same processes: the survivors
keep their host memory (sparse checkpoints, peer replicas, upstream and scalar logs), a spare
process takes the failed rank, and Megatron-LM's ``pretrain()`` runs again in a new
process-group generation. Only the failed stage's data-parallel group rolls back and replays;
every other rank restores the live state it had and replays nothing.

How the pieces fit (all glue calls are no-ops outside an elastic session):

* **Session.** :func:`start_session` (called by the local launcher's rank entry point and the
  SLURM task agent's worker, ``MOEVEMENT_ELASTIC=1``) joins the job's store through the recovery
  protocol (:mod:`megatron_moevement.recovery.protocol`: a spare waits there to be assigned a
  rank), starts the heartbeat and initializes generation 0 (or the spare's generation) itself, so
  Megatron's ``initialize_megatron`` finds the default process group up and keeps it.
* **Restart engine.** :func:`run_pretrain` (``pretrain = moevement_glue.wrap_pretrain(pretrain)``
  in ``pretrain_gpt.py``) calls ``pretrain()`` and, when a collective fails, keeps a copy of the
  rank's live state, tears down Megatron's global state and every process group (severing gloo's
  connections, :mod:`megatron_moevement.runtime.connections`), waits for the coordinator's next
  generation, joins it and calls ``pretrain()`` again. This is the flow of NVIDIA Resiliency
  Extension's in-process restart (Megatron-LM's ``--inprocess-restart``), on the job store the
  agent hosts; see ``docs/megatron_integration.md`` for why NVRx's wrapper itself is not used.
* **Phase A** (:func:`recover_after_restart`, from ``pretrain()`` once the model, optimizer and
  strategy are rebuilt, before the data iterators exist): the shared
  :class:`~megatron_moevement.recovery.procedure.RecoveryProcedure` adopts the host state, plans
  (scoped or global, which tier), fetches (checkpoints from peer replicas, scalar log, upstream
  logs). Megatron's counters are set to the iteration each rank resumes from: the committed one
  outside the scope, the checkpoint's inside it (so that Megatron builds the data iterator at
  that sample).
* **Phase B** (:func:`replay_after_restart`, from ``train()`` once its schedule exists): ranks
  outside the scope restore their live state (after the data iterators exist: creating one draws
  from the torch generator); ranks in scope replay to the committed iteration through the same
  Megatron pieces ``train_step`` uses
  (forward/backward schedule, optimizer step with the logged scalars, scheduler), fed by the
  neighbours' upstream logs; everyone meets in a barrier, and ``train()`` continues with the
  next iteration, printing each iteration's line once.

A rank that fails while the job is still being built (before every rank began training, e.g.
while its peers wait for it in a process group's rendezvous, which their heartbeats break) leaves
nothing to recover: no iteration ran. Then phase A starts the job over on every rank, from
Megatron's ``--load`` or the fresh build, checked against the initial weights recorded by the
ranks that got that far (report path ``job-start``).

Megatron's counters (``iteration``, ``consumed_train_samples``, ``skipped_train_samples``,
``num_floating_point_operations_so_far`` and the LR/WD scheduler state) are recorded in host
memory after every iteration (:meth:`InLoopSession.after_step`) and agreed on in phase A.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from megatron_moevement.constants import ELASTIC_ENV, REPORT_DIR_ENV
from megatron_moevement.logging_utils import get_logger
from megatron_moevement.recovery.driver import (
    ProcessGroupCollectives,
    check_initial_state,
    note_failure,
    record_initial_state,
    teardown_groups,
)
from megatron_moevement.recovery.errors import RecoveryError
from megatron_moevement.recovery.procedure import (
    RankRecoveryState,
    RecoveryProcedure,
    RecoveryReport,
    describe,
)
from megatron_moevement.recovery.protocol import (
    ElasticContext,
    GenerationSuperseded,
    StoreKeys,
    _get_json,
)

logger = get_logger(__name__)

__all__ = [
    "ELASTIC_ENV",
    "WORKER_HOOK_ENV",
    "REPORT_DIR_ENV",
    "InLoopSession",
    "MegatronLMTrainer",
    "current_session",
    "run_pretrain",
    "start_session",
]

WORKER_HOOK_ENV = "MOEVEMENT_WORKER_HOOK"
"""``module:function`` called with the :class:`InLoopSession` when a rank joins (tests and
demos install fault injection this way: ``megatron_moevement.harness.megatron_faults:install``)."""


@dataclass
class MegatronLayout:
    """The job's parallel sizes, as recovery planning reads them."""

    tp: int
    pp: int
    dp: int
    ep: int


class MegatronLMTrainer:
    """Megatron-LM's training loop as the recovery procedure's
    :class:`~megatron_moevement.recovery.driver.Trainer`: the rank's place in the layout and,
    in phase B, one training iteration built from the pieces ``train_step`` uses."""

    def __init__(self, args: Any, strategy: Any) -> None:
        from megatron.core import parallel_state as mpu
        from megatron.core.num_microbatches_calculator import get_num_microbatches

        self.args = args
        self.strategy = strategy
        self.optimizer = strategy.optimizer
        self.layout = MegatronLayout(
            tp=mpu.get_tensor_model_parallel_world_size(),
            pp=mpu.get_pipeline_model_parallel_world_size(),
            dp=mpu.get_data_parallel_world_size(),
            ep=mpu.get_expert_model_parallel_world_size(),
        )
        self.pp_rank = mpu.get_pipeline_model_parallel_rank()
        self.dp_rank = mpu.get_data_parallel_rank()
        self.tp_rank = mpu.get_tensor_model_parallel_rank()
        self.num_microbatches = get_num_microbatches()
        self._p2p_override = None
        self.step: Optional[Callable[[int], Any]] = None
        """``f(iteration)``: one training iteration (set in phase B)."""

    @property
    def p2p_communicator(self) -> Any:
        """The communicator the wrapped schedule hands to the pipeline: the strategy's logging
        one, or the replay communicator the procedure sets for a scoped replay."""
        return self._p2p_override or self.strategy.p2p_communicator

    @p2p_communicator.setter
    def p2p_communicator(self, value: Any) -> None:
        self._p2p_override = None if value is self.strategy.p2p_communicator else value

    def train_iteration(self, iteration: int) -> Any:
        if self.step is None:
            raise RecoveryError("internal: the replay runs only from Megatron-LM's train()")
        return self.step(iteration)


def megatron_iteration(
    args: Any,
    forward_step_func: Callable,
    data_iterator: Any,
    model: list,
    optimizer: Any,
    scheduler: Any,
    forward_backward_func: Callable,
) -> Callable[[int], Any]:
    """One training iteration of ``train_step`` without its logging reductions.

    ``train_step`` also reduces ``update_successful`` and the gradient norm over the whole
    model-parallel group for its log line, and the rerun state machine asks the whole job whether
    to run the step again: across the scope boundary, which a scoped replay must not cross (the
    replayed optimizer step takes those values from the scalar log instead).
    Everything that changes training state is the same: zero the gradient buffers, the schedule
    over every microbatch, ``optimizer.step()``, the scheduler's step, the consumed samples.
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.num_microbatches_calculator import get_num_microbatches
    from megatron.core.rerun_state_machine import RerunState, get_rerun_state_machine

    rerun = get_rerun_state_machine()

    def step(iteration: int) -> bool:
        args.curr_iteration = iteration
        # The rerun state machine's first call of the step is local (it saves its RNG state and
        # advances the data iterators); its second asks every rank whether any result failed
        # validation, a reduction over the whole job. A replayed iteration committed in the
        # original run, so the answer was "no": the replay skips the question.
        if not rerun.should_run_forward_backward(data_iterator):
            raise RecoveryError("internal: the rerun state machine did not start the replay step")
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward_func(
            forward_step_func=forward_step_func,
            data_iterator=data_iterator,
            model=model,
            num_microbatches=get_num_microbatches(),
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
            decoder_seq_length=args.decoder_seq_length,
            forward_only=False,
            adjust_tensor_shapes_fn=None,
            force_all_reduce=False,
        )
        rerun.state = RerunState.NOT_RUNNING_YET
        update_successful, _, _ = optimizer.step()
        batch = mpu.get_data_parallel_world_size() * args.micro_batch_size * get_num_microbatches()
        if update_successful:
            scheduler.step(increment=batch)
        args.consumed_train_samples += batch
        return bool(update_successful)

    return step


@dataclass
class _PendingReplay:
    procedure: RecoveryProcedure
    trainer: MegatronLMTrainer
    resume: dict
    """Megatron's counters at the committed iteration (see :meth:`InLoopSession.counters`)."""
    times: dict
    started: float


@dataclass
class InLoopSession:
    """One process's Megatron-LM recovery state across ``pretrain()`` calls (host memory)."""

    ctx: ElasticContext
    state: RankRecoveryState
    pending: Optional[dict] = None
    """The coordinator's announcement of the generation being recovered into (None: none)."""
    old: Any = None
    """The failed generation's strategy, whose host state the rebuilt one adopts."""
    fault_started: float = 0.0
    noticed_at: float = 0.0
    rejoined_at: float = 0.0
    counters: dict = field(default_factory=dict)
    """Iteration count -> Megatron's counters after that many iterations."""
    reports: list = field(default_factory=list)
    scheduler: Any = None
    replay: Optional[_PendingReplay] = None
    fault_hook: Optional[Callable[[int, str, "InLoopSession"], None]] = None
    """``f(iteration, phase, session)`` at every fault-injection point (tests and demos)."""
    job_start: int = 0
    """The iteration this ``pretrain()`` run started from (0, or the one loaded from --load)."""
    load_fallback: Optional[Callable[[], Any]] = None
    """Megatron's ``load_checkpoint`` of this ``pretrain()`` call (``--load``), deferred while an
    in-memory recovery is pending: the last tier."""

    # ---------------------------------------------------------------- restart engine
    def on_failure(self, failure: str, strategy: Any) -> None:
        """Keeps the rank's live state, tears everything down and joins the next generation."""
        logger.warning(
            "rank %d: failure detected at generation %d (%s); recovering in memory",
            self.ctx.rank,
            self.ctx.generation,
            failure,
        )
        if self.pending is None:
            self.fault_started = time.perf_counter()
            self.old = note_failure(self.state, strategy)
        self.replay = None
        teardown_groups(self.ctx, strategy)
        _destroy_megatron_state()
        self._join_next_generation()
        # After the join (its time counts in "rebuild"): collecting the failed generation's
        # cycles walks the whole heap, and peers wait on the join, not on this.
        gc.collect()

    def _join_next_generation(self) -> None:
        """Joins the newest announced generation (again if a newer one supersedes it)."""
        while True:
            info = self.ctx.wait_for_generation(self.ctx.generation)
            self.ctx.generation = info["generation"]
            self.pending = info
            try:
                self.ctx.init_process_group()
            except GenerationSuperseded as exc:
                logger.warning("rank %d: %s; joining the newer one", self.ctx.rank, exc)
                continue
            self.rejoined_at = time.perf_counter()
            return

    # ---------------------------------------------------------------- counters
    def record_counters(self, count: int, args: Any, flops: float) -> None:
        """Megatron's counters after ``count`` iterations (kept for the last few windows)."""
        self._record(count, args.consumed_train_samples, _skipped(args), flops)

    def _record(self, count: int, consumed: int, skipped: int, flops: float) -> None:
        self.counters[int(count)] = dict(
            consumed_train_samples=int(consumed),
            skipped_train_samples=int(skipped),
            flops=float(flops),
            scheduler=None if self.scheduler is None else self.scheduler.state_dict(),
        )

    def after_step(
        self, iteration: int, args: Any, flops_before: float, oldest_needed: int = 0
    ) -> None:
        """After iteration ``iteration`` (0-based) committed: record the counters it leads to
        (what ``train()`` adds right after, computed the same way). Counters before
        ``oldest_needed`` (the start of the oldest sparse checkpoint a rollback can use) are
        dropped, except the job's start (the initial-state tier replays from there)."""
        from megatron.core import parallel_state as mpu
        from megatron.core.num_microbatches_calculator import (
            get_current_global_batch_size,
            get_current_running_global_batch_size,
            get_num_microbatches,
        )
        from megatron.training.training import num_floating_point_operations

        self.state.committed = int(iteration)
        batch = mpu.get_data_parallel_world_size() * args.micro_batch_size * get_num_microbatches()
        skipped = get_current_global_batch_size() - get_current_running_global_batch_size()
        self._record(
            int(iteration) + 1,
            int(args.consumed_train_samples) + batch,
            _skipped(args) + skipped,
            float(flops_before) + float(num_floating_point_operations(args, batch)),
        )
        first = min(self.counters)
        for old in [c for c in self.counters if first < c < oldest_needed]:
            del self.counters[old]

    def _agree_counters(self, counts: list[int], collectives) -> dict:
        """Megatron's counters after each of ``counts`` iterations, from whichever rank has
        them (they are the same on every rank; a replacement has none)."""
        mine = {c: self.counters[c] for c in counts if c in self.counters}
        start = min(self.counters) if self.counters else None
        found: dict = {}
        starts = []
        for theirs, their_start in collectives.all_gather((mine, start)):
            for c, value in theirs.items():
                found.setdefault(int(c), value)
            if their_start is not None:
                starts.append(their_start)
        # Megatron keeps the iteration the job started from in args.iteration (train() counts in
        # a local), and saves it with the arguments.
        self.job_start = min(starts) if starts else 0
        missing = [c for c in counts if c not in found]
        if missing:
            raise RecoveryError(
                f"no rank kept Megatron's counters (consumed samples, FLOPs, scheduler) after "
                f"{missing} iterations, so the resumed run cannot match the fault-free one. "
                "Restart the job from --load."
            )
        return found

    # ---------------------------------------------------------------- faults
    def fault_point(self, iteration: int, phase: str) -> None:
        """A fault-injection point (``model``, ``build``, ``before``, ``microbatch<k>``,
        ``after_step``, ``after_snapshot``, ``fetch``, ``replay``, ``recovery_wait``): calls the
        installed :attr:`fault_hook`, if any (:data:`WORKER_HOOK_ENV`)."""
        if self.fault_hook is not None:
            self.fault_hook(iteration, phase, self)

    # ---------------------------------------------------------------- phase A
    def begin(self, args: Any, strategy: Any, scheduler: Any) -> None:
        """Phase A (see the module docstring); at the job's start: records where it starts."""
        self.scheduler = scheduler
        if self.pending is None:
            self._record_start(args, strategy)
            return
        collectives = ProcessGroupCollectives()
        # A rank with state but no counters failed in its first pretrain(), before it got here:
        # then no iteration ran anywhere (none completes without it), and every rank starts the
        # job over instead of recovering it.
        never_began = self.state.has_state and not self.counters
        if any(collectives.all_gather(never_began)):
            self._start_over(args, strategy, collectives)
            return
        times = {
            "detect": self.rejoined_at - self.fault_started,
            "rebuild": time.perf_counter() - self.rejoined_at,
        }
        t = time.perf_counter()
        trainer = MegatronLMTrainer(args, strategy)
        procedure = RecoveryProcedure(
            self.ctx.rank,
            self.ctx.world_size,
            self.ctx.generation,
            trainer,
            strategy,
            self.state,
            collectives,
            strategy.config,
            None,
            fault_hook=lambda it, phase, _: self.fault_point(it, phase),
            initial_state=lambda: check_initial_state(self.ctx, strategy, collectives),
        )
        procedure.adopt(self.old)
        survey = procedure.survey(self.pending["failed"])
        try:
            plan = procedure.plan(survey)
        except RecoveryError as exc:  # the same plan, hence the same error, on every rank
            if self.load_fallback is None:
                raise
            self._fall_back_to_load(args, strategy, exc)
            return
        procedure.fetch(plan, survey)
        times["fetch"] = time.perf_counter() - t
        committed = plan.scope.committed + 1
        start = (
            procedure.first_iteration
            if procedure.checkpoint is None
            else procedure.checkpoint.start_iteration + 1
        )
        counters = self._agree_counters(sorted({committed, start}), collectives)
        t = time.perf_counter()
        resume_from = start if procedure.in_scope else committed
        _apply_counters(args, scheduler, counters[resume_from])
        args.iteration = resume_from
        args.num_floating_point_operations_so_far = counters[committed]["flops"]
        self.replay = _PendingReplay(procedure, trainer, counters[committed], times, t)
        logger.warning(
            "rank %d: in-memory recovery planned (%s recovery of ranks %s, tier %s); this rank "
            "%s",
            self.ctx.rank,
            "scoped" if plan.scope.scoped else "global",
            plan.scope.ranks,
            plan.tier,
            (
                f"replays iterations {start + 1}..{committed} in train()"
                if procedure.in_scope
                else f"restores its live state of iteration {committed} in train()"
            ),
        )

    def _record_start(self, args: Any, strategy: Any) -> None:
        """Where the job starts (or starts over): counters, committed iteration, initial state."""
        self.record_counters(args.iteration, args, args.num_floating_point_operations_so_far)
        self.state.committed = int(args.iteration) - 1
        record_initial_state(self.ctx, strategy, int(args.iteration))

    def _fall_back_to_load(self, args: Any, strategy: Any, exc: Exception) -> None:
        """No in-memory tier can serve: every rank restores Megatron's checkpoint (``--load``)."""
        logger.error(
            "rank %d: in-memory recovery is not possible (%s); falling back to Megatron's "
            "checkpoint (--load %s)",
            self.ctx.rank,
            exc,
            getattr(args, "load", None),
        )
        self._restart_job(args, strategy, "megatron-load", str(exc))

    def _start_over(self, args: Any, strategy: Any, collectives: Any) -> None:
        """A rank failed while the job was still being built: every rank starts the job over
        from where it started (Megatron's ``--load``, deferred while recovery was pending, or
        the fresh build), checked against the initial state the ranks that got that far
        recorded."""
        reason = (
            "a rank failed before every rank had started training: no iteration ran, so the job "
            "starts over"
        )
        logger.warning("rank %d: %s", self.ctx.rank, reason)
        self._restart_job(args, strategy, "job-start", reason, collectives)

    def _restart_job(
        self, args: Any, strategy: Any, path: str, reason: str, collectives: Any = None
    ) -> None:
        """Every rank restarts from Megatron's checkpoint (``--load``, or the fresh build without
        one) in this generation; ``collectives``: also check that it reproduces the recorded
        initial state (:func:`check_initial_state`)."""
        if self.load_fallback is not None:
            # The optimizer already has Adam state (adopt() created it, every step equal), which
            # Megatron's torch_dist loader of the distributed optimizer needs on the torch-Adam
            # path.
            args.iteration, args.num_floating_point_operations_so_far = self.load_fallback()
            strategy.registry.refresh()
        if collectives is not None:
            check_initial_state(self.ctx, strategy, collectives, int(args.iteration))
        self.counters = {}
        self.state = RankRecoveryState()
        self._record_start(args, strategy)
        self.ctx.store.add(StoreKeys.stable(self.ctx.generation), 1)
        failed = self.pending["failed"]
        self.pending, self.old, self.load_fallback = None, None, None
        record = dict(
            generation=self.ctx.generation,
            failed_ranks=failed,
            path=path,
            reason=reason,
            committed_iteration=int(args.iteration) - 1,
        )
        self.reports.append(record)
        self._write_report(record)

    # ---------------------------------------------------------------- phase B
    def finish_replay(
        self,
        iteration: int,
        args: Any,
        step: Callable[[int], Any],
    ) -> int:
        """Phase B: replays (in scope), meets every rank, resumes the strategy; returns the
        iteration count ``train()`` continues from."""
        pending = self.replay
        if pending is None:
            return iteration
        procedure, trainer = pending.procedure, pending.trainer
        trainer.step = step
        replayed: list = []
        # Both after Megatron built its data iterators: creating a DataLoader iterator draws
        # from the torch generator, which the restored RNG state must not see.
        if procedure.in_scope:
            replayed = procedure.replay()
        else:
            procedure.restore_outside_scope()
            procedure.fault_hook(procedure.plan_.scope.committed, "recovery_wait", procedure)
        procedure.collectives.barrier()  # ranks outside the scope wait here for the replay
        pending.times["replay"] = time.perf_counter() - pending.started
        resume = pending.resume
        committed = procedure.plan_.scope.committed + 1
        if self.scheduler is not None and resume["scheduler"] is not None:
            if self.scheduler.state_dict() != resume["scheduler"]:
                raise RecoveryError(
                    f"rank {self.ctx.rank}: after the replay the LR scheduler is at "
                    f"{self.scheduler.state_dict()}, not at the committed iteration's "
                    f"{resume['scheduler']}; the run cannot continue bitwise. Restart from --load."
                )
        _apply_counters(args, None, resume)
        args.iteration = self.job_start
        _clear_moe_trackers()
        _set_rerun_iteration(committed)
        report = procedure.finish(replayed, pending.times, self.noticed_at)
        self.ctx.store.add(StoreKeys.stable(self.ctx.generation), 1)
        self.reports.append(report)
        self._write_report(report.to_dict())
        self.pending, self.old, self.replay = None, None, None
        _log_to_megatron(report)
        return committed

    def _write_report(self, record: dict) -> None:
        """Appends ``record`` to ``$MOEVEMENT_REPORT_DIR/recovery_rank<R>.jsonl`` (if set)."""
        out = os.environ.get(REPORT_DIR_ENV)
        if not out:
            return
        Path(out).mkdir(parents=True, exist_ok=True)
        with open(Path(out) / f"recovery_rank{self.ctx.rank}.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        """The job finished on this rank: the last heartbeat says so."""
        if self.ctx.heartbeat is not None:
            self.ctx.heartbeat.stop(done=True)


_session: Optional[InLoopSession] = None


def current_session() -> Optional[InLoopSession]:
    """This process's elastic session, if it runs in one."""
    return _session


def start_session(heartbeat_interval_s: float = 1.0, heartbeat_timeout_s: float = 10.0):
    """Joins the job's store (a spare waits there for a rank), starts the heartbeat and
    initializes the process group of this rank's generation; sets ``RANK``/``LOCAL_RANK`` for
    Megatron. Returns the :class:`InLoopSession`."""
    global _session
    # Imported modules are never garbage: freezing them keeps the collection after a failure
    # (see InLoopSession.on_failure) from walking them.
    gc.freeze()
    ctx = ElasticContext.from_env(timeout_s=float(os.environ.get("MOEVEMENT_PG_TIMEOUT_S", 120)))
    os.environ["RANK"] = str(ctx.rank)
    os.environ.setdefault("LOCAL_RANK", str(ctx.rank))  # one node; SLURM agents set it
    session = InLoopSession(ctx, RankRecoveryState(has_state=not ctx.is_spare_join))
    hook = os.environ.get(WORKER_HOOK_ENV)
    if hook:
        module, _, name = hook.partition(":")
        getattr(importlib.import_module(module), name)(session)
    if ctx.is_spare_join:
        session.pending = _get_json(ctx.store, StoreKeys.generation(ctx.generation))
        session.noticed_at = time.time()
        session.fault_started = time.perf_counter()
    ctx.start_heartbeat(heartbeat_interval_s, heartbeat_timeout_s)
    try:
        ctx.init_process_group()
        session.rejoined_at = time.perf_counter()
    except GenerationSuperseded as exc:  # another rank failed meanwhile
        # (Also a rank of generation 0 whose rendezvous the heartbeat broke: its first
        # pretrain() then starts the job over, see InLoopSession.begin.)
        logger.warning("rank %d: %s; joining the newer one", ctx.rank, exc)
        session._join_next_generation()
    _session = session
    return session


def p2p_communicator_for(strategy: Any) -> Any:
    """The p2p communicator the schedule gets: a replay's while this rank replays, else the
    strategy's upstream-logging one."""
    session = _session
    if session is not None and session.replay is not None:
        return session.replay.trainer.p2p_communicator
    return strategy.p2p_communicator


def run_pretrain(
    call: Callable[[], Any],
    take_strategy: Callable[[], Any],
    fatal: tuple = (),
) -> Any:
    """Runs ``call()`` (Megatron-LM's ``pretrain(...)``) and, in an elastic session, runs it again
    in the next process-group generation after every failure (the restart engine).

    Args:
        call: One ``pretrain()`` run.
        take_strategy: Returns the failed run's strategy (its host state survives the restart).
        fatal: Exception types that are configuration errors, not failures: re-raised.
    """
    session = _session
    if session is None:
        return call()
    while True:
        failure = None
        try:
            result = call()
            session.close()
            return result
        except (RuntimeError, ConnectionError) as exc:
            if isinstance(exc, (RecoveryError, *fatal)):
                raise
            session.noticed_at = time.time()
            failure = describe(exc)
        # Outside the except block: the traceback keeps train()'s frames (and their process
        # groups) alive, and they must be gone before the teardown.
        strategy = take_strategy()
        session.on_failure(failure, strategy)
        del strategy


def _skipped(args: Any) -> int:
    return int(getattr(args, "skipped_train_samples", 0))


def _apply_counters(args: Any, scheduler: Any, counters: dict) -> None:
    args.consumed_train_samples = counters["consumed_train_samples"]
    args.skipped_train_samples = counters["skipped_train_samples"]
    if scheduler is not None and counters["scheduler"] is not None:
        scheduler.load_state_dict(counters["scheduler"])


def _destroy_megatron_state() -> None:
    """Megatron-LM's global state (args, timers, microbatch calculator, parallel state, rerun
    state machine), so that ``pretrain()`` can initialize it again."""
    try:
        from megatron.training.training import destroy_global_state
    except ImportError:  # pragma: no cover - Megatron-Core loops without megatron.training
        return
    destroy_global_state()


def _set_rerun_iteration(count: int) -> None:
    """The rerun state machine counts ``train_step`` calls, which the replay does not make."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine

    get_rerun_state_machine().current_iteration = count


def _clear_moe_trackers() -> None:
    """The replay's forward passes added to the MoE auxiliary-loss tracker, which Megatron's log
    line reduces and prints; the next logged iteration must see only its own values."""
    try:
        from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker
    except ImportError:  # pragma: no cover
        return
    clear_aux_losses_tracker()


def _log_to_megatron(report: RecoveryReport) -> None:
    """The recovery in Megatron's own log (last rank prints) and TensorBoard/W&B writers."""
    try:
        from megatron.training import get_tensorboard_writer, get_wandb_writer
        from megatron.training.utils import print_rank_last
    except ImportError:  # pragma: no cover
        return
    times = " ".join(f"{k} {v:.3f}s" for k, v in report.times_s.items())
    print_rank_last(
        f" [MoEvement] recovered in memory: generation {report.generation}, failed ranks "
        f"{report.failed_ranks}, {report.path} recovery of ranks {report.scope_ranks} from "
        f"window {report.window} ({report.tier}), replayed iterations "
        f"{[i + 1 for i in report.iterations_replayed]} on this rank, resuming after iteration "
        f"{report.committed_iteration + 1}; {times}"
    )
    step = report.committed_iteration + 1
    writer = get_tensorboard_writer()
    wandb = get_wandb_writer()
    for key, value in report.times_s.items():
        if writer is not None:
            writer.add_scalar(f"moevement/recovery_{key}_s", value, step)
    if writer is not None:
        writer.add_scalar("moevement/recovery_scope_ranks", len(report.scope_ranks), step)
    if wandb is not None:
        wandb.log(
            {f"moevement/recovery_{k}_s": v for k, v in report.times_s.items()}
            | {"moevement/recovery_scope_ranks": len(report.scope_ranks)},
            step,
        )
