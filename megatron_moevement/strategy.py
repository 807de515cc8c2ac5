"""``MoEvementStrategy``: the one object a Megatron-Core training loop talks to.

Usage in a custom loop::

    strategy = MoEvementStrategy(gpt_model, optimizer, MoEvementConfig(replication_factor=1))
    for iteration in range(start, end):
        train_step(...)                        # forward/backward + optimizer.step()
        strategy.after_optimizer_step(iteration)
    strategy.shutdown()

Behind it: the operator registry, the EP/DP-aware sharder, the Algorithm 1 scheduler with
popularity tracking, the asynchronous snapshot engine and the peer replicator. The strategy wraps
``optimizer.step`` so that a step never mutates state that a snapshot copy is still reading.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from megatron_moevement.config import MoEvementConfig
from megatron_moevement.replay.frozen import (
    ScalarLog,
    SlotLoader,
    StepScalars,
    default_operator_groups,
    frozen_main_params,
    frozen_operators,
    learning_rates,
    replay_optimizer_step,
    restore_scaler_state,
)
from megatron_moevement.logging_utils import get_logger
from megatron_moevement.state.operators import OperatorRegistry
from megatron_moevement.schedule.popularity import ExpertPopularity
from megatron_moevement.snapshot.replication import PeerReplicator
from megatron_moevement.schedule.scheduler import ScheduleManager
from megatron_moevement.snapshot.sharding import ShardingContext, plan_shards
from megatron_moevement.snapshot.engine import SnapshotEngine, SparseCheckpoint, allocate_host_buffer

logger = get_logger(__name__)

# Bytes per parameter of the full state, for the rank-independent sizes the schedule is cut
# with: FP32 main param (4) + two FP32 Adam moments (8).
_FULL_STATE_BYTES_PER_PARAM = 12


@dataclass(frozen=True)
class ScheduledOperator:
    """An operator as the scheduler sees it: sizes that are the same on every replica, so that
    all ranks of a stage cut the same slices."""

    name: str
    kind: str
    layer: int | None
    expert: int | None
    compute_bytes: int
    full_state_bytes: int


def _scheduled(op) -> ScheduledOperator:
    numel = sum(p.param.numel() for p in op.params)
    return ScheduledOperator(
        op.name, op.kind, op.layer, op.expert, op.compute_bytes, numel * _FULL_STATE_BYTES_PER_PARAM
    )


def measure_d2h_bandwidth(
    nbytes: int = 32 << 20, repeats: int = 3, checksum_algorithm: str | None = None
) -> float:
    """Effective snapshot throughput in bytes/s, as Algorithm 1 needs it.

    On CUDA: device-to-host copies into a pinned buffer (checksums run on the host, off the
    device's critical path). On CPU the "device" is the host, and a slot is done only once it is
    copied *and* checksummed on the same cores that train, so both are timed together.
    """
    from megatron_moevement.snapshot.serialization import checksum

    dst = allocate_host_buffer(nbytes)
    if torch.cuda.is_available():
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
    else:
        src = torch.empty(nbytes, dtype=torch.uint8)
        dst.copy_(src)
        start = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src)
            if checksum_algorithm:
                checksum(dst, checksum_algorithm)
    return nbytes * repeats / max(time.perf_counter() - start, 1e-9)


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
            ``None`` (default) checks except inside :func:`rebuilding_for_recovery`, where the
            model is freshly built and about to be overwritten.
        train_iteration: The data accessor: ``f(iteration)`` that trains one iteration on that
            iteration's microbatches (forward/backward and ``optimizer.step()``). Needed by
            :meth:`recover`; :meth:`rollback_and_replay` can also take it per call.
    """

    def __init__(
        self,
        gpt_model,
        optimizer,
        config: MoEvementConfig | None = None,
        num_experts: int | None = None,
        verify_replicas: bool | None = None,
        train_iteration=None,
    ) -> None:
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        self.config = config or MoEvementConfig()
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
            distributed_optimizer=hasattr(_first_leaf(optimizer), "shard_fp32_groups"),
        )
        # Sizes that are the same on every replica, so all replicas compute the same split.
        self.shard_plan = plan_shards(
            [_scheduled(op) for op in self.registry.operators], self.sharding
        )
        if verify_replicas or (verify_replicas is None and not _REBUILDING[0]):
            verify_replicas_identical(self.registry, self.sharding, self.config.checksum)
        self.popularity = ExpertPopularity(ema_decay=self.config.ema_decay)
        self._hooks = self._install_router_hooks()
        bandwidth = self.config.d2h_bandwidth_bytes_per_s or measure_d2h_bandwidth(
            checksum_algorithm=self.config.checksum
        )
        self.d2h_bandwidth = bandwidth
        self.scheduler: ScheduleManager | None = None
        self._replaying = False
        self._scheduler_kwargs = dict(
            d2h_bandwidth_bytes_per_s=bandwidth,
            agree_window_size=self._agree_window_size,
            popularity_group=ps.get_data_parallel_group(),
            include_compute_in_full_slot=True,
        )
        self.engine = SnapshotEngine(
            self.registry, self.shard_plan, self.rank, self.config.checksum
        )
        ranks_per_node = self.config.ranks_per_node or _local_world_size()
        self.replicator_ranks_per_node = ranks_per_node
        group = dist.new_group(backend="gloo") if self.config.replication_factor > 0 else None
        self.replicator = PeerReplicator(
            self.rank, self.world_size, self.config.replication_factor, ranks_per_node, group
        )
        if self.world_size == 1 and self.config.replication_factor > 0 and self.rank == 0:
            logger.warning(
                "a single-rank job has no peer to replicate its sparse checkpoints to: a failure "
                "of this rank loses them, and only the durable tier (durable_dir) or Megatron's "
                "own checkpoints can restart the job"
            )
        self.checkpoints: list[SparseCheckpoint] = []  # oldest first: [persisted, in flight]
        # Upstream logging (pipeline-parallel jobs): hand p2p_communicator and pg_collection to
        # the schedule (forward_backward_func(..., p2p_communicator=..., pg_collection=...)).
        self.upstream_log = None
        self.p2p_communicator = None
        self.pg_collection = None
        if self.config.upstream_logging and ps.get_pipeline_model_parallel_world_size() > 1:
            from megatron_moevement.upstream.log import UpstreamLog, make_logging_communicator

            self.upstream_log = UpstreamLog(self.config.host_memory_budget_bytes)
            self.p2p_communicator, self.pg_collection = make_logging_communicator(
                gpt_model.config, self.upstream_log
            )
        self.train_iteration = train_iteration
        self.last_iteration: int | None = None
        """The last iteration reported to :meth:`after_optimizer_step`."""
        self._window_count = 0
        self.snapshots_taken = 0
        """Slots captured so far (for reports)."""
        self.snapshot_bytes_total = 0
        """Bytes those slots held on this rank (for reports)."""
        self._last_step_end: float | None = None
        self.iteration_times: list[float] = []
        self.scalar_log = ScalarLog()
        self._pending_scalars: StepScalars | None = None
        self._replay_iteration: int | None = None
        self._frozen_mains: list = []
        self.replay_reports: list[dict] = []
        self.step_in_progress = False
        """True while the wrapped optimizer step runs (a failure then leaves state half-updated)."""
        self.replay_uses_scalar_log = True
        """Diagnostics only: False recomputes the grad norm from a replay's partial gradients."""
        self.replay_probe = None
        """Diagnostics only: ``f(iteration, frozen_main_params)`` called before a replayed step."""
        self._wrap_optimizer_step()
        from megatron_moevement.durable.periodic import attach_durable

        self.durable = attach_durable(self)
        """Durable tier (``durable.periodic.DurableAttachment``): makes this the active strategy
        of the ``moevement`` dist_checkpointing backend; periodic saves with ``durable_dir``."""
        logger.info(
            "MoEvement on rank %d: %d operators, %d full-state / %d compute on this rank, "
            "replicas to %s, d2h %.2f GB/s",
            self.rank,
            len(self.registry),
            len(self.shard_plan.full_state),
            len(self.shard_plan.compute),
            self.replicator.peers,
            bandwidth / 1e9,
        )

    # ------------------------------------------------------------------ wiring
    def _wrap_optimizer_step(self) -> None:
        original = self.optimizer.step
        engine = self.engine

        def step(*args, **kwargs):
            engine.wait_for_copies()  # never mutate state a snapshot is still reading
            if self._replay_iteration is not None:
                if self.replay_probe is not None:
                    self.replay_probe(self._replay_iteration, self._frozen_mains)
                return replay_optimizer_step(
                    self.optimizer,
                    self.scalar_log.get(self._replay_iteration),
                    self._frozen_mains,
                    use_logged_norm=self.replay_uses_scalar_log,
                )
            lrs = learning_rates(self.optimizer)  # at step time: schedulers move them after
            scaler = _scaler_state(self.optimizer)
            self.step_in_progress = True  # stays True if the step is interrupted by a failure
            result = original(*args, **kwargs)
            self.step_in_progress = False
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

    def _install_router_hooks(self) -> list:
        handles = []
        for name, module in self.gpt_model.named_modules():
            if not name.endswith("mlp.router"):
                continue
            layer_module = _owning_layer(self.gpt_model, name)
            layer = int(layer_module.layer_number) - 1

            def hook(mod, args, output, layer=layer):
                if self._replaying or not mod.training:
                    return  # replayed tokens were counted by the original run; eval is not training
                probs, routing_map = output[0], output[1]
                self.popularity.update_from_routing(layer, routing_map, probs)

            handles.append(module.register_forward_hook(hook))
        return handles

    def _agree_window_size(self, w: int) -> int:
        import torch.distributed as dist

        t = torch.tensor([w], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    # ------------------------------------------------------------------ per iteration
    def after_optimizer_step(self, iteration: int) -> None:
        """Captures this iteration's slot; call once per iteration right after the step."""
        self._record_iteration(iteration)
        self._capture_slot(iteration)

    def _record_iteration(self, iteration: int) -> None:
        """Bookkeeping of every iteration: timing, scalar log, popularity, replication errors.

        Hook for other checkpointing policies (:mod:`megatron_moevement.baselines`), which
        keep this part and replace :meth:`_capture_slot`.
        """
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

    def _capture_slot(self, iteration: int) -> None:
        """Captures and replicates the slot that ``iteration`` snapshots (Algorithm 1)."""
        if self.scheduler is None:
            self.scheduler = ScheduleManager(
                [_scheduled(op) for op in self.registry.operators],
                self.config,
                self.popularity,
                iteration_time_s=self._iteration_time_estimate(),
                start_iteration=iteration,
                **self._scheduler_kwargs,
            )
        elif self.iteration_times and self.config.auto_window:
            self.scheduler.update_measurements(iteration_time_s=self._iteration_time_estimate())
        assignment = self.scheduler.slot_for_iteration(iteration)
        if assignment.slot == 0:
            self._start_window(assignment)
        ckpt = self.checkpoints[-1]
        slot = self.engine.capture(ckpt, assignment.slot, iteration)
        self.replicator.replicate(ckpt, slot)
        self._count_snapshot()
        self.durable.after_step(iteration)

    def _count_snapshot(self) -> None:
        self.snapshots_taken += 1
        self.snapshot_bytes_total += self.engine.bytes_captured_last

    def stats(self) -> dict:
        """Facts for reports: strategy, window, slots captured and mean bytes per slot."""
        window = self.scheduler.schedule.window_size if self.scheduler is not None else None
        return dict(
            strategy="moevement",
            window_size=window,
            snapshots_taken=self.snapshots_taken,
            bytes_per_snapshot=self.snapshot_bytes_total / max(1, self.snapshots_taken),
        )

    def _iteration_time_estimate(self) -> float:
        """The time budget of one slot: the (median recent) iteration time, scaled by the
        share of an iteration a snapshot may take."""
        fraction = self.config.snapshot_budget_fraction
        if fraction is None:
            fraction = 1.0 if torch.cuda.is_available() else 0.05
        if self.iteration_times:
            recent = self.iteration_times[-5:]
            return fraction * sorted(recent)[len(recent) // 2]
        return fraction * (self.config.iteration_time_s or 1.0)

    def _start_window(self, assignment) -> None:
        # Keep one persisted and one in flight: the previous window must finish replicating
        # before its predecessor can be dropped.
        if self.checkpoints and not self.checkpoints[-1].persisted:
            self.engine.drain()
            self.replicator.drain()
        self.durable.before_buffer_reuse(self._window_count)
        ckpt = self.engine.begin_window(
            assignment.schedule, assignment.iteration, self._window_count
        )
        self._window_count += 1
        self.checkpoints.append(ckpt)
        while len(self.checkpoints) > 2:
            dropped = self.checkpoints.pop(0)
            logger.debug("freed sparse checkpoint of window %d", dropped.generation)
        # Scalars and upstream logs older than the oldest kept checkpoint are never replayed.
        # Until a checkpoint persists, a recovery replays from the job's initial state
        # (RecoveryDriver's initial-state tier, all ranks live), which needs every scalar.
        persisted = self.persisted_checkpoint
        if persisted is not None:
            self.scalar_log.discard_before(persisted.start_iteration)
        if self.upstream_log is not None:
            self.upstream_log.discard_before(self.checkpoints[0].start_iteration)

    # ------------------------------------------------------------------ replay
    def rollback_and_replay(self, target_iteration: int, train_iteration, ckpt=None) -> dict:
        """Rebuilds the dense state of ``target_iteration`` from a sparse checkpoint.

        Loads slot 0 of ``ckpt`` (default: the persisted checkpoint), replays the next iteration
        with the operators of later slices frozen, loads slot 1, ... until every operator is
        active (the dense state of the window's last iteration), then replays on, all active, to
        ``target_iteration``. Every replayed optimizer step uses the original run's logged
        scalars. All ranks that hold replicas of the replayed operators must call this together.

        Args:
            target_iteration: Last iteration to replay (the last one completed before the fault).
            train_iteration: ``f(iteration)`` that runs one training iteration (forward/backward
                over the iteration's microbatches and ``optimizer.step()``), e.g.
                ``HarnessTrainer.train_iteration``.
            ckpt: The sparse checkpoint to start from.

        Returns:
            A report: window, iterations replayed, and per-iteration frozen operator counts.
        """
        ckpt = ckpt or self.persisted_checkpoint
        if ckpt is None:
            raise RuntimeError(
                "no persisted sparse checkpoint to roll back to (the first window has not been "
                "captured and replicated yet); restart from the durable tier"
            )
        self.flush()
        start, window = ckpt.start_iteration, ckpt.window_size
        if target_iteration < start + window - 1:
            raise ValueError(
                f"target iteration {target_iteration} precedes the end of window "
                f"{ckpt.generation} ({start}..{start + window - 1})"
            )
        loader = SlotLoader(
            self.registry, self.shard_plan, self.sharding, default_operator_groups()
        )
        slices = ckpt.schedule["slices"]
        frozen_counts: dict[int, int] = {}
        replayed: list[int] = []
        self._replaying = True
        try:
            for k in range(window):
                loader.apply(ckpt, k)
                iteration = start + k + 1
                if k == window - 1 or iteration > target_iteration:
                    break
                frozen = [n for sl in slices[k + 1 :] for n in sl]
                with frozen_operators(self.registry, frozen):
                    self._frozen_mains = frozen_main_params(self.registry, frozen)
                    self._replay_iteration = iteration
                    restore_scaler_state(self.optimizer, self.scalar_log.get(iteration))
                    train_iteration(iteration)
                frozen_counts[iteration] = len(frozen)
                replayed.append(iteration)
            self._frozen_mains = []
            for iteration in range(start + window, target_iteration + 1):
                self._replay_active(iteration, train_iteration)
                frozen_counts[iteration] = 0
                replayed.append(iteration)
        finally:
            self._replay_iteration = None
            self._frozen_mains = []
            self._replaying = False
        report = dict(
            window=ckpt.generation,
            window_start=start,
            window_size=window,
            target_iteration=target_iteration,
            iterations_replayed=replayed,
            frozen_operators=frozen_counts,
        )
        self.replay_reports.append(report)
        logger.info(
            "replayed iterations %s from window %d (start %d, W=%d)",
            replayed,
            ckpt.generation,
            start,
            window,
        )
        return report

    def _replay_active(self, iteration: int, train_iteration) -> None:
        """Replays ``iteration`` with every operator active and the original run's scalars."""
        self._replay_iteration = iteration
        restore_scaler_state(self.optimizer, self.scalar_log.get(iteration))
        train_iteration(iteration)

    def replay_from_initial_state(
        self, first_iteration: int, target_iteration: int, train_iteration
    ) -> dict:
        """Replays iterations ``first_iteration..target_iteration`` from the job's initial state.

        The model and optimizer must hold the state the job started from (a fresh, seeded
        build), on every rank: this is the recovery of a failure before the first sparse
        checkpoint persisted (``RecoveryDriver``'s initial-state tier, always global). Every
        optimizer step uses the original run's logged scalars, as in
        :meth:`rollback_and_replay`.

        Returns:
            A report like :meth:`rollback_and_replay`'s, with ``window`` -1.
        """
        self.flush()
        replayed: list[int] = []
        self._replaying = True
        try:
            for iteration in range(first_iteration, target_iteration + 1):
                self._replay_active(iteration, train_iteration)
                replayed.append(iteration)
        finally:
            self._replay_iteration = None
            self._replaying = False
        report = dict(
            window=-1,
            window_start=first_iteration - 1,
            window_size=0,
            target_iteration=target_iteration,
            iterations_replayed=replayed,
            frozen_operators={it: 0 for it in replayed},
        )
        self.replay_reports.append(report)
        logger.info("replayed iterations %s from the initial state", replayed)
        return report

    def recover(self, target_iteration: int | None = None, ckpt=None) -> dict:
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
        self.durable.abandon(self)
        self.engine._copier._executor.shutdown(wait=False, cancel_futures=True)
        self.replicator._executor.shutdown(wait=False, cancel_futures=True)
        # Drop every reference to Megatron objects (and through them to process groups).
        self.gpt_model = self.optimizer = self.registry = self.scheduler = None
        self.engine.registry = None
        self.replicator.group = None
        self._original_step = None

    def adopt_host_state(self, old: "MoEvementStrategy") -> None:
        """Takes over a failed-over predecessor's host state: its sparse checkpoints, the replicas
        it holds for peers, the scalar log and the popularity statistics."""
        for ckpt in old.checkpoints:
            for slot in ckpt.slots:
                if slot is not None:
                    slot.ready.wait(timeout=60)
        self.checkpoints = list(old.checkpoints)
        self.scalar_log = old.scalar_log
        self.replicator.replicas.update(old.replicator.replicas)
        if old.upstream_log is not None and self.upstream_log is not None:
            self.upstream_log = old.upstream_log
            self.p2p_communicator.log = old.upstream_log
        self.popularity.load_state_dict(old.popularity.state_dict())
        self._window_count = old._window_count
        self.snapshots_taken = old.snapshots_taken
        self.snapshot_bytes_total = old.snapshot_bytes_total

    def resume_after_recovery(self, committed: int, window_count: int, ckpt) -> None:
        """After a rollback to ``ckpt`` and a replay to ``committed``: keep ``ckpt`` as the
        persisted checkpoint (none after a replay from the initial state) and start a fresh
        window at the next iteration (on every rank)."""
        self.checkpoints = [] if ckpt is None else [ckpt]
        self._window_count = window_count
        self.scheduler = None
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
        """Host bytes held: snapshot buffers, peer replicas, and their sum."""
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
            self.optimizer.step = self._original_step
            self.engine.shutdown()
            self.replicator.shutdown()
            self.durable.close(self)


_REBUILDING = [False]


@contextmanager
def rebuilding_for_recovery():
    """Marks strategies constructed inside as part of a recovery rebuild (their model state is
    about to be replaced from snapshots, so the replica check is skipped)."""
    previous, _REBUILDING[0] = _REBUILDING[0], True
    try:
        yield
    finally:
        _REBUILDING[0] = previous


class ReplicaMismatchError(RuntimeError):
    """Data-parallel replicas of an operator hold different compute weights."""


def verify_replicas_identical(
    registry, sharding: ShardingContext, algorithm: str = "crc32"
) -> None:
    """Raises :class:`ReplicaMismatchError` unless every replicated operator has the same compute
    weights on all of its data-parallel replicas (collective over the DP and expert-DP groups)."""
    import torch.distributed as dist

    from megatron_moevement.snapshot.serialization import checksum

    groups = default_operator_groups()
    for kind, group, size in (
        ("dense", groups.dense, sharding.dp_size),
        ("expert", groups.expert, sharding.expert_dp_size),
    ):
        if size <= 1:
            continue
        ops = [op for op in registry.operators if (op.kind == "expert") == (kind == "expert")]
        # Experts are named by global id, so replicas of one expert share the name.
        mine = {op.name: [checksum(p.param, algorithm) for p in op.params] for op in ops}
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, (dist.get_rank(), mine), group=group)
        differing = sorted(
            {
                name
                for _, other in gathered
                for name, digest in other.items()
                if mine.get(name, digest) != digest
            }
        )
        if differing:
            ranks = [
                r for r, other in gathered if any(other.get(n) != mine.get(n) for n in differing)
            ]
            raise ReplicaMismatchError(
                f"rank {dist.get_rank()}: {len(differing)} {kind} operator(s) differ between "
                f"data-parallel replicas (e.g. {differing[:3]}; ranks {ranks} disagree with this "
                "one). MoEvement snapshots a replicated operator on one replica and restores it "
                "on all of them, so replicas must hold identical weights. Fix: seed every rank "
                "identically before building the model (torch.manual_seed and "
                "tensor_parallel.model_parallel_cuda_manual_seed), or load/broadcast the same "
                "checkpoint on every replica before constructing MoEvementStrategy."
            )


def _scaler_state(optimizer) -> dict | None:
    """The fp16 dynamic loss scaler's state as plain numbers (``None`` without a scaler)."""
    scaler = getattr(_first_leaf(optimizer), "grad_scaler", None)
    if scaler is None:
        return None
    return {
        k: (float(v.item()) if torch.is_tensor(v) else v) for k, v in scaler.state_dict().items()
    }


def _first_leaf(optimizer):
    from megatron_moevement.state.optim_view import iter_optimizers

    return iter_optimizers(optimizer)[0]


def _owning_layer(model, module_name: str):
    parts = module_name.split(".")
    idx = parts.index("layers")
    return model.get_submodule(".".join(parts[: idx + 2]))


def _local_world_size() -> int:
    import os

    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
