"""``MoEvementStrategy``: the one object a Megatron-Core training loop talks to.

Usage in a custom loop::

    strategy = MoEvementStrategy(gpt_model, optimizer, MoEvementConfig(replication_factor=1))
    for iteration in range(start, end):
        train_step(...)                        # forward/backward + optimizer.step()
        strategy.after_optimizer_step(iteration)
    strategy.shutdown()

Behind it: the operator registry (:mod:`.state`), the EP/DP-aware sharder and the asynchronous
snapshot engine with peer replication (:mod:`.snapshot`), popularity tracking and Algorithm 1
(:mod:`.schedule`), the replay engine (:mod:`.replay`), upstream logging (:mod:`.upstream`) and
the durable tier (:mod:`.durable`). What is captured each iteration is the capture policy's
decision (:mod:`.policy`; MoEvement's by default, the baselines' in :mod:`.baselines`). The
strategy wraps ``optimizer.step`` so that a step never mutates state that a snapshot copy is still
reading, and records the scalars replay needs.
"""

from __future__ import annotations

import math
import os
import time

import torch
import torch.distributed as dist

from megatron_moevement.config import MoEvementConfig
from megatron_moevement.durable.periodic import attach_durable
from megatron_moevement.logging_utils import get_logger
from megatron_moevement.policy import CapturePolicy, SparseWindowPolicy
from megatron_moevement.replay.engine import ReplayEngine, ReplayReport, TrainIteration
from megatron_moevement.replay.scalar_log import (
    ScalarLog,
    StepScalars,
    learning_rates,
    scaler_state,
)
from megatron_moevement.schedule.popularity import ExpertPopularity
from megatron_moevement.schedule.sparse_schedule import ScheduledOperator, SparseSchedule
from megatron_moevement.snapshot.buffers import HostBufferPool
from megatron_moevement.snapshot.engine import SnapshotEngine, snapshot_bandwidth
from megatron_moevement.snapshot.replication import PeerReplicator, ReplicaStore
from megatron_moevement.snapshot.sharding import (
    ShardingContext,
    plan_shards,
    verify_replicas_identical,
)
from megatron_moevement.snapshot.slots import SparseCheckpoint
from megatron_moevement.snapshot.stage_times import StageTimes, host_has_idle_core
from megatron_moevement.state.operators import (
    OperatorRegistry,
    layer_number_of,
    operator_tensors,
)
from megatron_moevement.state.optim_view import first_leaf
from megatron_moevement.state.rng import RNG_PREFIX, rng_state
from megatron_moevement.state.support import check_model_supported
from megatron_moevement.upstream.communicator import make_logging_communicator
from megatron_moevement.upstream.log import UpstreamLog

logger = get_logger(__name__)

__all__ = ["MoEvementStrategy"]


class MoEvementStrategy:
    """Sparse checkpointing for one rank of a Megatron-Core MoE job.

    Args:
        gpt_model: The unwrapped Megatron-Core ``GPTModel`` stage of this rank.
        optimizer: Its Megatron optimizer (any of plain, mixed-precision, distributed, chained).
        config: MoEvement settings.
        num_experts: Experts per MoE layer (defaults to the model config's).
        verify_replicas: Check once, at construction, that data-parallel replicas hold identical
            compute weights (one CRC32 per operator, gathered over each replica group). A
            replicated operator is snapshotted by one replica and restored on all of them, so
            replicas that start from different weights would silently diverge on recovery.
        train_iteration: The data accessor: ``f(iteration)`` that trains one iteration on that
            iteration's microbatches (forward/backward and ``optimizer.step()``). Needed by
            :meth:`recover`; :meth:`rollback_and_replay` can also take it per call.
        policy: What is captured each iteration and how a rollback uses it (default:
            MoEvement's :class:`~megatron_moevement.policy.SparseWindowPolicy`).
    """

    def __init__(
        self,
        gpt_model,
        optimizer,
        config: MoEvementConfig | None = None,
        num_experts: int | None = None,
        verify_replicas: bool = True,
        train_iteration: TrainIteration | None = None,
        policy: CapturePolicy | None = None,
    ) -> None:
        from megatron.core import parallel_state as ps

        self.config = config or MoEvementConfig()
        check_model_supported(gpt_model.config)
        self.policy = policy or SparseWindowPolicy()
        self.gpt_model = gpt_model
        self.optimizer = optimizer
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        num_experts = num_experts or getattr(gpt_model.config, "num_moe_experts", None)
        self.registry = OperatorRegistry(
            gpt_model, optimizer, ps.get_expert_model_parallel_rank(), num_experts
        )
        self.sharding = ShardingContext(
            dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(),
            expert_dp_rank=ps.get_expert_data_parallel_rank(),
            expert_dp_size=ps.get_expert_data_parallel_world_size(),
            distributed_optimizer=hasattr(first_leaf(optimizer), "shard_fp32_groups"),
        )
        # Sizes that are the same on every replica, so all replicas compute the same split.
        self.shard_plan = plan_shards(
            [ScheduledOperator.of(op) for op in self.registry.operators], self.sharding
        )
        if verify_replicas:
            verify_replicas_identical(self.registry, self.sharding, self.config.checksum)
        self.popularity = ExpertPopularity(ema_decay=self.config.ema_decay)
        self.popularity_group = ps.get_tensor_and_data_parallel_group(with_context_parallel=True)
        """Process group over which routing statistics are summed before ordering: every rank
        of the stage (each tensor-parallel rank routes only its own sequence shard), so all of
        them cut the same schedule."""
        self.d2h_bandwidth = self.config.d2h_bandwidth_bytes_per_s or snapshot_bandwidth(
            self.config.checksum
        )
        self.stage_times = StageTimes()
        """Seconds spent in each snapshot stage on this rank (training-thread stall and
        background copy / checksum / replication), also marked as ``torch.profiler`` ranges."""
        self.idle_core_for_snapshots = torch.cuda.is_available() or host_has_idle_core(
            _local_world_size(), torch.get_num_threads()
        )
        """Whether background snapshot work runs beside training (a copy engine, or a core the
        host's training ranks leave free) rather than taking time from it."""
        keep = self.policy.keep_windows
        self.engine = SnapshotEngine(
            self.registry,
            self.shard_plan,
            self.rank,
            self.config.checksum,
            pool=HostBufferPool(keep),
            asynchronous=self.config.snapshot_async,
            times=self.stage_times,
        )
        self.replicator_ranks_per_node = self.config.ranks_per_node or _local_world_size()
        group = dist.new_group(backend="gloo") if self.config.replication_factor > 0 else None
        self.replicator = PeerReplicator(
            self.rank,
            self.world_size,
            self.config.replication_factor,
            self.replicator_ranks_per_node,
            group,
            store_factory=lambda source: ReplicaStore.keeping(source, keep),
            times=self.stage_times,
        )
        if self.world_size == 1 and self.config.replication_factor > 0 and self.rank == 0:
            logger.warning(
                "a single-rank job has no peer to replicate its sparse checkpoints to: a failure "
                "of this rank loses them, and only the durable tier (durable_dir) or Megatron's "
                "own checkpoints can restart the job"
            )
        self.checkpoints: list[SparseCheckpoint] = []
        """This rank's sparse checkpoints, oldest first (by default: [persisted, in flight])."""
        # Upstream logging (pipeline-parallel jobs): hand p2p_communicator and pg_collection to
        # the schedule (forward_backward_func(..., p2p_communicator=..., pg_collection=...)).
        self.upstream_log: UpstreamLog | None = None
        self.p2p_communicator = None
        self.pg_collection = None
        if self.config.upstream_logging and ps.get_pipeline_model_parallel_world_size() > 1:
            self.upstream_log = UpstreamLog(self.config.host_memory_budget_bytes)
            self.p2p_communicator, self.pg_collection = make_logging_communicator(
                gpt_model.config, self.upstream_log
            )
        self.train_iteration = train_iteration
        self.last_iteration: int | None = None
        """The last iteration reported to :meth:`after_optimizer_step`."""
        self.windows_started = 0
        """Windows (checkpoints) begun so far; the next one gets this number."""
        self.snapshots_taken = 0
        """Slots captured so far (for reports)."""
        self.snapshot_bytes_total = 0
        """Bytes those slots held on this rank (for reports)."""
        self.snapshot_bytes_by_part: dict[str, int] = {}
        """:attr:`snapshot_bytes_total` split by what it held (expert / non-expert full state,
        compute weights, per-rank records)."""
        self._last_step_end: float | None = None
        self.iteration_times: list[float] = []
        """Wall-clock time between consecutive :meth:`after_optimizer_step` calls (s)."""
        self.scalar_log = ScalarLog()
        self.replay = ReplayEngine(
            self.registry, optimizer, self.shard_plan, self.sharding, self.scalar_log
        )
        self._pending_scalars: StepScalars | None = None
        self.rng_after_step: dict[str, torch.Tensor] = rng_state()
        """This rank's RNG states after its last optimizer step (what the next iteration starts
        from); every slot carries them, and a rank outside a recovery's scope restores them."""
        self.buffers_after_step: dict[str, torch.Tensor] = self._buffers()
        """This rank's module buffers after its last optimizer step (the routers' expert bias
        and token counts: forward passes change them, so a mid-iteration failure must not)."""
        self.step_in_progress = False
        """True while the wrapped optimizer step runs (a failure then leaves state half-updated)."""
        self._hooks = self._install_router_hooks()
        self._wrap_optimizer_step()
        self.durable = attach_durable(self)
        """Durable tier (``durable.periodic.DurableAttachment``): makes this the active strategy
        of the ``moevement`` dist_checkpointing backend; periodic saves with ``durable_dir``."""
        self.policy.attach(self)
        logger.info(
            "%s on rank %d: %d operators, %d full-state / %d compute on this rank, "
            "replicas to %s, d2h %.2f GB/s",
            self.policy.name,
            self.rank,
            len(self.registry),
            len(self.shard_plan.full_state),
            len(self.shard_plan.compute),
            self.replicator.peers,
            self.d2h_bandwidth / 1e9,
        )

    # ------------------------------------------------------------------ wiring
    def _wrap_optimizer_step(self) -> None:
        original = self.optimizer.step
        engine = self.engine
        replay = self.replay

        def step(*args, **kwargs):
            engine.wait_for_copies()  # never mutate state a snapshot is still reading
            if replay.in_replayed_step:
                result = replay.optimizer_step()
                self._mark_iteration_end()
                return result
            lrs = learning_rates(self.optimizer)  # at step time: schedulers move them after
            scaler = scaler_state(self.optimizer)
            self.step_in_progress = True  # stays True if the step is interrupted by a failure
            result = original(*args, **kwargs)
            self.step_in_progress = False
            self._mark_iteration_end()
            update_successful, grad_norm = bool(result[0]), result[1]
            self._pending_scalars = StepScalars(
                iteration=-1,
                grad_norm=None if grad_norm is None else float(grad_norm),
                update_successful=update_successful,
                learning_rates=lrs,
                scaler_state=scaler,
            )
            return result

        self.optimizer.step = step
        self._original_step = original

    def _mark_iteration_end(self) -> None:
        # Forward passes draw randomness and count tokens, the step does not: this is where the
        # iteration's state is complete (what the next one starts from).
        self.rng_after_step = rng_state()
        self.buffers_after_step = self._buffers()

    def _buffers(self) -> dict[str, torch.Tensor]:
        return {
            key: tensor.clone()
            for op in self.registry.operators
            for key, tensor in operator_tensors(op, ("buffer",))
        }

    def _install_router_hooks(self) -> list:
        handles = []
        for name, module in self.gpt_model.named_modules():
            if not name.endswith("mlp.router"):
                continue
            layer = layer_number_of(self.gpt_model, name)

            def hook(mod, args, output, layer=layer):
                if self.replay.replaying or not mod.training:
                    return  # replayed tokens were counted by the original run; eval is not training
                probs, routing_map = output[0], output[1]
                self.popularity.update_from_routing(
                    layer, routing_map, probs, expert_capacity(mod.config, routing_map.shape)
                )

            handles.append(module.register_forward_hook(hook))
        return handles

    def agree_max(self, value: int) -> int:
        """The maximum of ``value`` over every rank (collective)."""
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    # ------------------------------------------------------------------ per iteration
    def after_optimizer_step(self, iteration: int) -> None:
        """Records this iteration and captures its slot; call once per iteration right after
        the step."""
        with self.stage_times.measure("after_step"):
            self._record_iteration(iteration)
            self.policy.after_step(iteration)

    def _record_iteration(self, iteration: int) -> None:
        """Bookkeeping of every iteration: timing, scalar log, popularity, replication errors."""
        now = time.perf_counter()
        if self._last_step_end is not None:
            self.iteration_times.append(now - self._last_step_end)
        self._last_step_end = now
        if self._pending_scalars is None:
            raise RuntimeError(
                "after_optimizer_step() was called without an optimizer.step() since the last "
                "call; call it exactly once per iteration, right after the step"
            )
        self._pending_scalars.iteration = iteration
        self.last_iteration = iteration
        self.scalar_log.record(self._pending_scalars)
        self._pending_scalars = None
        self.popularity.step()
        if self.replicator.error is not None:
            raise RuntimeError(f"peer replication failed: {self.replicator.error}")

    # ------------------------------------------------------------------ capture (for policies)
    def start_window(self, schedule: SparseSchedule, start_iteration: int) -> SparseCheckpoint:
        """Begins the next checkpoint (window) at ``start_iteration``; keeps the newest
        ``policy.keep_windows`` checkpoints and frees what no kept one can replay."""
        # The previous window must finish replicating before a buffer it may share is reused.
        if self.checkpoints and not self.checkpoints[-1].persisted:
            self.engine.drain()
            self.replicator.drain()
        self.durable.before_buffer_reuse(self.windows_started)
        ckpt = self.engine.begin_window(schedule, start_iteration, self.windows_started)
        self.windows_started += 1
        self.checkpoints.append(ckpt)
        while len(self.checkpoints) > self.policy.keep_windows:
            dropped = self.checkpoints.pop(0)
            logger.debug("freed sparse checkpoint of window %d", dropped.window)
        # Scalars and upstream logs older than the oldest kept checkpoint are never replayed.
        # Until a checkpoint persists, a recovery replays from the job's initial state
        # (RecoveryDriver's initial-state tier, all ranks live), which needs every scalar.
        persisted = self.persisted_checkpoint
        if persisted is not None:
            self.scalar_log.discard_before(persisted.start_iteration)
        if self.upstream_log is not None:
            self.upstream_log.discard_before(self.checkpoints[0].start_iteration)
        return ckpt

    def capture_and_replicate(self, ckpt: SparseCheckpoint, slot: int, iteration: int) -> None:
        """Starts the copy of ``ckpt``'s ``slot`` with the state of ``iteration`` and queues its
        replication to the peers (both asynchronous)."""
        rank_state = {RNG_PREFIX + name: t for name, t in self.rng_after_step.items()}
        captured = self.engine.capture(ckpt, slot, iteration, rank_state)
        self.replicator.replicate(ckpt, captured)
        self.snapshots_taken += 1
        self.snapshot_bytes_total += self.engine.bytes_captured_last
        for part, n in self.engine.bytes_captured_last_by_part.items():
            self.snapshot_bytes_by_part[part] = self.snapshot_bytes_by_part.get(part, 0) + n

    def stats(self) -> dict:
        """Facts for reports: strategy, window, slots captured and mean bytes per slot."""
        return dict(
            self.policy.stats(),
            snapshots_taken=self.snapshots_taken,
            bytes_per_snapshot=self.snapshot_bytes_total / max(1, self.snapshots_taken),
        )

    # ------------------------------------------------------------------ replay
    @property
    def replay_reports(self) -> list[ReplayReport]:
        """Every rollback this strategy ran, oldest first."""
        return self.replay.reports

    def rollback_and_replay(
        self, target_iteration: int, train_iteration: TrainIteration, ckpt=None
    ) -> ReplayReport:
        """Rebuilds the dense state of ``target_iteration`` from a checkpoint.

        With MoEvement's policy: loads slot 0 of ``ckpt`` (default: the persisted checkpoint),
        replays the next iteration with the operators of later slices frozen, loads slot 1, ...
        until every operator is active (the dense state of the window's last iteration), then
        replays on, all active, to ``target_iteration``. Every replayed optimizer step uses the
        original run's logged scalars. All ranks that hold replicas of the replayed operators
        must call this together.

        Args:
            target_iteration: Last iteration to replay (the last one completed before the fault).
            train_iteration: ``f(iteration)`` that runs one training iteration (forward/backward
                over the iteration's microbatches and ``optimizer.step()``), e.g.
                ``HarnessTrainer.train_iteration``.
            ckpt: The sparse checkpoint to start from.

        Returns:
            The :class:`~megatron_moevement.replay.engine.ReplayReport`.
        """
        return self.policy.restore(target_iteration, train_iteration, ckpt)

    def replay_from_initial_state(
        self, first_iteration: int, target_iteration: int, train_iteration: TrainIteration
    ) -> ReplayReport:
        """Replays iterations ``first_iteration..target_iteration`` from the job's initial state.

        The model and optimizer must hold the state the job started from (a fresh, seeded
        build), on every rank: this is the recovery of a failure before the first sparse
        checkpoint persisted (``RecoveryDriver``'s initial-state tier, always global). Every
        optimizer step uses the original run's logged scalars, as in :meth:`rollback_and_replay`.

        Returns:
            A report like :meth:`rollback_and_replay`'s, with ``window`` -1.
        """
        self.flush()
        return self.replay.replay_from_initial_state(
            first_iteration, target_iteration, train_iteration
        )

    def recover(self, target_iteration: int | None = None, ckpt=None) -> ReplayReport:
        """Global rollback: rebuilds the dense state of ``target_iteration`` (default: the last
        iteration reported to :meth:`after_optimizer_step`) from the persisted sparse checkpoint,
        with the data accessor given at construction. Collective over all ranks; see
        :meth:`rollback_and_replay`. Scoped recovery after a lost process is
        :class:`~megatron_moevement.recovery.driver.RecoveryDriver`'s job."""
        if self.train_iteration is None:
            raise RuntimeError(
                "recover() needs the data accessor: construct MoEvementStrategy(..., "
                "train_iteration=f) with f(iteration) training one iteration on its microbatches, "
                "or call rollback_and_replay(target, f)"
            )
        target = self.last_iteration if target_iteration is None else target_iteration
        if target is None:
            raise RuntimeError("recover() before any after_optimizer_step(): nothing to recover")
        return self.rollback_and_replay(target, self.train_iteration, ckpt=ckpt)

    # ------------------------------------------------------------------ recovery support
    def abandon(self) -> None:
        """Drops this strategy after a failure without waiting on collectives that may never
        complete; its host memory (checkpoints, replicas, scalar log) stays readable."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.policy.detach()
        self.durable.abandon(self)
        self.engine.abandon()
        self.replicator.abandon()
        # Drop every reference to Megatron objects (and through them to process groups).
        self.gpt_model = self.optimizer = self.registry = None
        self.replay.registry = self.replay.optimizer = None
        self.popularity_group = None
        self._original_step = None

    def adopt_host_state(self, old: "MoEvementStrategy") -> None:
        """Takes over a failed-over predecessor's host state: its sparse checkpoints, the replicas
        it holds for peers, the scalar log, the upstream log and the popularity statistics."""
        for ckpt in old.checkpoints:
            for slot in ckpt.slots:
                if slot is not None:
                    slot.ready.wait(timeout=60)
        self.checkpoints = list(old.checkpoints)
        self.scalar_log.load_dict(old.scalar_log.to_dict())
        self.replicator.replicas.update(old.replicator.replicas)
        if old.upstream_log is not None and self.upstream_log is not None:
            self.upstream_log = old.upstream_log
            self.p2p_communicator.log = old.upstream_log
        self.popularity.load_state_dict(old.popularity.state_dict())
        self.rng_after_step = old.rng_after_step
        self.buffers_after_step = old.buffers_after_step
        self.windows_started = old.windows_started
        self.snapshots_taken = old.snapshots_taken
        self.snapshot_bytes_total = old.snapshot_bytes_total
        self.snapshot_bytes_by_part = dict(old.snapshot_bytes_by_part)
        self.policy.adopt(old.policy)

    def resume_after_recovery(self, committed: int, windows_started: int, ckpt) -> None:
        """After a rollback to ``ckpt`` and a replay to ``committed``: keep ``ckpt`` as the
        persisted checkpoint (none after a replay from the initial state) and start a fresh
        window at the next iteration (on every rank)."""
        self.policy.resume(committed, windows_started, ckpt)
        self._last_step_end = None
        self.iteration_times = []
        self._pending_scalars = None

    # ------------------------------------------------------------------ inspection
    def schedule_kwargs(self, iteration: int) -> dict:
        """Keyword arguments for Megatron's ``forward_backward_func`` of ``iteration``.

        With pipeline parallelism and upstream logging on, this is the logging p2p communicator
        (already told which iteration its sends belong to) and its process-group collection;
        otherwise it is empty. Usage::

            forward_backward_func(..., **strategy.schedule_kwargs(iteration))
        """
        if self.p2p_communicator is None:
            return {}
        self.p2p_communicator.begin_iteration(iteration)
        return {"p2p_communicator": self.p2p_communicator, "pg_collection": self.pg_collection}

    @property
    def persisted_checkpoint(self) -> SparseCheckpoint | None:
        """The newest sparse checkpoint whose slots are all captured and replicated."""
        for ckpt in reversed(self.checkpoints):
            if ckpt.persisted:
                return ckpt
        return None

    @property
    def in_flight_checkpoint(self) -> SparseCheckpoint | None:
        last = self.checkpoints[-1] if self.checkpoints else None
        return None if last is None or last.persisted else last

    def host_memory_bytes(self) -> dict[str, int]:
        """Host bytes held: snapshot buffers, peer replicas, upstream logs, and their sum."""
        snap = self.engine.pool.nbytes
        repl = self.replicator.host_bytes
        logs = 0 if self.upstream_log is None else self.upstream_log.nbytes
        return {
            "snapshots": snap,
            "replicas": repl,
            "upstream_log": logs,
            "total": snap + repl + logs,
        }

    def flush(self) -> None:
        """Waits for every pending copy and replication (e.g. before a planned shutdown)."""
        self.engine.drain()
        self.replicator.drain()

    def shutdown(self) -> None:
        """Flushes, removes hooks and restores ``optimizer.step``."""
        try:
            self.flush()
        finally:
            for h in self._hooks:
                h.remove()
            self._hooks = []
            self.policy.detach()
            self.optimizer.step = self._original_step
            self.engine.shutdown()
            self.replicator.shutdown()
            self.durable.close(self)


def expert_capacity(config, routing_shape) -> float:
    """Tokens an expert can take from one microbatch of ``routing_shape`` (``[tokens,
    experts]``): Megatron's capacity with a capacity factor (``ceil(tokens * topk / experts *
    factor)``), else every token once (dropless routing)."""
    tokens, experts = int(routing_shape[0]), int(routing_shape[1])
    factor = getattr(config, "moe_expert_capacity_factor", None)
    if factor is None:
        return float(tokens)
    topk = int(getattr(config, "moe_router_topk", 1))
    return float(math.ceil(tokens * topk / experts * factor))


def _local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
