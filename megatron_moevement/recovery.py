"""Failure detection, spare join, group rebuild and rollback recovery.

Mechanism (chosen over a home-made protocol): torch.distributed's own ``TCPStore`` and
``PrefixStore``. The job's agent (the local launcher, or the per-node launcher under SLURM) hosts
the store, so it outlives any worker. Each process-group *generation* ``g`` is initialized on
``PrefixStore("gen<g>/", store)``; after a failure the survivors and the spares that replace the
failed ranks initialize generation ``g+1`` on the same store, keeping their in-memory state. The
agent, which sees its children die, announces a generation with the failed ranks (``gen/<g>``) and
assigns spares (``spare/<id>``). This is the same pattern as torchrun's rendezvous and
nvidia-resiliency-ext's in-job restart, without their extra daemons (neither is needed on the
CPU/gloo harness; on GPUs the store and generations are unchanged and NCCL groups are rebuilt the
same way).

Detection: a dead peer makes gloo (and NCCL with async error handling) raise in the survivors
that talk to it within milliseconds; each survivor then destroys its process group, which closes
its connections and makes every other rank's pending collective fail too, so the whole job notices
without waiting for timeouts. Collective timeouts remain the last resort.

Recovery (:meth:`RecoveryDriver.recover`), scoped when possible (:mod:`megatron_moevement.scope`):

1. tear down Megatron state and the process group, keep host memory (sparse checkpoints, peer
   replicas, the scalar log);
2. wait for the agent's announcement and join the next generation (spares take the failed ranks);
3. agree on the last committed iteration and on the newest sparse checkpoint persisted everywhere;
4. rebuild model, optimizer and MoEvement strategy on the new groups; spares fetch their sparse
   checkpoint from a surviving peer replica and the scalar log from a survivor;
5. the ranks of the failed stages (the *scope*) roll back to that checkpoint and replay to the
   last committed iteration (sparse-to-dense conversion, then all-active replay with logged
   scalars), fed by their neighbours' upstream logs; all other ranks restore their live state and
   wait. Training resumes after it.

A failure during recovery restarts it on the next generation with the widened set of failed ranks.
When the scope cannot be isolated (every stage failed, upstream logging is off, or the ranks
outside the failed stages disagree on the last committed iteration) every rank rolls back:
*global* rollback, the fallback tier, which needs no upstream logs. When no surviving replica
holds a failed rank's checkpoint, recovery stops with an error that names the missing replica and
the next tier.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Callable

import torch

from megatron_moevement.logging_utils import get_logger
from megatron_moevement.transport import recv_bytes, send_bytes

logger = get_logger(__name__)

_POLL_S = 0.05


class RecoveryError(RuntimeError):
    """Recovery is impossible at this tier (the message says why and what to fall back to)."""


def connect_store(timeout_s: float = 300.0):
    """Client connection to the job's store (hosted by the agent at MASTER_ADDR:MASTER_PORT)."""
    import torch.distributed as dist

    return dist.TCPStore(
        os.environ.get("MASTER_ADDR", "127.0.0.1"),
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def _get_json(store, key: str):
    return json.loads(store.get(key).decode())


def _has(store, key: str) -> bool:
    return store.check([key])


@dataclass
class ElasticContext:
    """This process's place in the job across process-group generations."""

    store: object
    rank: int
    world_size: int
    generation: int = 0
    timeout_s: float = 120.0

    @classmethod
    def from_env(cls, timeout_s: float = 120.0, wait_s: float = 600.0) -> "ElasticContext":
        """Joins as ``RANK`` or, for a spare (``MOEVEMENT_SPARE=1``), waits to be assigned."""
        store = connect_store()
        world = int(os.environ["WORLD_SIZE"])
        if os.environ.get("MOEVEMENT_SPARE") == "1":
            key = f"spare/{os.environ['LOCAL_PROC_ID']}"
            deadline = time.monotonic() + wait_s
            while not _has(store, key):
                if _has(store, "job/done") or time.monotonic() > deadline:
                    raise SystemExit(0)  # the job finished without needing this spare
                time.sleep(_POLL_S)
            assignment = _get_json(store, key)
            logger.warning("spare %s takes rank %d in generation %d",
                           os.environ["LOCAL_PROC_ID"], assignment["rank"],
                           assignment["generation"])
            return cls(store, assignment["rank"], world, assignment["generation"], timeout_s)
        return cls(store, int(os.environ["RANK"]), world, 0, timeout_s)

    @property
    def is_spare_join(self) -> bool:
        return self.generation > 0

    def job_hosts(self) -> set[str]:
        """Addresses of every rank's host, as published in the store."""
        hosts: set[str] = set()
        for rank in range(self.world_size):
            key = f"hosts/{rank}"
            if _has(self.store, key):
                hosts.update(_get_json(self.store, key))
        return hosts

    def init_process_group(self) -> None:
        import torch.distributed as dist

        from megatron_moevement.runtime.connections import local_addresses

        self.store.set(f"hosts/{self.rank}", json.dumps(sorted(local_addresses())))
        dist.init_process_group(
            backend="gloo",
            store=dist.PrefixStore(f"gen{self.generation}/", self.store),
            rank=self.rank,
            world_size=self.world_size,
            timeout=timedelta(seconds=self.timeout_s),
        )

    def wait_for_generation(self, after: int, wait_s: float = 120.0) -> dict:
        """The agent's announcement of the first generation after ``after``."""
        deadline = time.monotonic() + wait_s
        while True:
            key = f"gen/{after + 1}"
            if _has(self.store, key):
                info = _get_json(self.store, key)
                # Skip generations that were superseded before this rank got here.
                while _has(self.store, f"gen/{info['generation'] + 1}"):
                    info = _get_json(self.store, f"gen/{info['generation'] + 1}")
                return info
            if time.monotonic() > deadline:
                raise RecoveryError(
                    f"no new process-group generation after {after} was announced within "
                    f"{wait_s:.0f}s: the agent did not see a failed process (a hang rather than "
                    "a crash?). Restart the job from the durable tier."
                )
            time.sleep(_POLL_S)


@dataclass
class RecoveryReport:
    """What one recovery did, for logs and tests."""

    generation: int
    failed_ranks: list[int]
    scope: str
    """"scoped": only the ranks of the failed stages rolled back; "global": every rank did."""
    scope_ranks: list[int]
    """Ranks that rolled back and replayed."""
    reason: str
    """Why recovery was global rather than scoped (empty when scoped)."""
    tier: str
    """Where the state came from: "sparse-checkpoint" (local + peer replicas)."""
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

    def to_dict(self) -> dict:
        return asdict(self)


def ensure_optimizer_state(optimizer) -> None:
    """Creates Adam state (step, moments) for parameters that have none yet, as torch's Adam does
    at its first step, so a rebuilt optimizer has tensors to restore into."""
    from megatron_moevement.optim_view import iter_optimizers

    for leaf in iter_optimizers(optimizer):
        for group in leaf.optimizer.param_groups:
            for p in group["params"]:
                state = leaf.optimizer.state[p]
                if state:
                    continue
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


class RecoveryDriver:
    """Runs a training loop that survives killed ranks.

    Args:
        ctx: This process's :class:`ElasticContext`.
        build: ``build() -> (trainer, strategy)`` constructs Megatron state and a
            :class:`~megatron_moevement.strategy.MoEvementStrategy` on the current process group;
            ``trainer.train_iteration(i)`` runs one iteration.
        fault_hook: Optional ``f(iteration, phase, driver)`` called at fault-injection points.
    """

    def __init__(self, ctx: ElasticContext, build: Callable, fault_hook: Callable | None = None):
        self.ctx = ctx
        self.build = build
        self.fault_hook = fault_hook or (lambda *a: None)
        self.trainer = None
        self.strategy = None
        self.committed = -1
        self.reports: list[RecoveryReport] = []
        self.joined_as_spare = ctx.is_spare_join
        self.has_state = not ctx.is_spare_join
        self._received_ckpt = None  # a replacement's fetched checkpoint, kept across attempts
        self._dirty = False
        """True when the failure interrupted this rank's optimizer step (state half-updated)."""
        self._live_backup: dict | None = None
        """Host copy of the live training state, restored after the rebuild if this rank is
        outside the recovery scope."""
        self._received_log: dict | None = None
        """False until a spare has received its state (a failure during its recovery keeps it
        stateless for the next attempt)."""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.ctx.init_process_group()
        if self.joined_as_spare:
            self._recover_as_spare(time.perf_counter())
        else:
            self.trainer, self.strategy = self.build()

    def train(self, iterations: int, on_iteration: Callable | None = None) -> None:
        """Trains until ``iterations`` iterations are committed on every rank and the last
        snapshots are flushed, recovering from failures on the way (also during the flush)."""
        import torch.distributed as dist

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
                failure = _describe(exc)
            # Outside the except block: the traceback (and the training frames it keeps alive,
            # with their process groups) must be gone before the teardown.
            self.recover(failure)

    # ------------------------------------------------------------------ recovery
    def recover(self, failure: str) -> RecoveryReport:
        """Recovers from a failed collective (``failure`` describes it)."""
        t0 = time.perf_counter()
        logger.warning("rank %d: failure detected at generation %d (%s); recovering",
                       self.ctx.rank, self.ctx.generation, failure)
        old = self.strategy
        if old is not None and self.has_state and self._live_backup is None:
            self._dirty = old.step_in_progress
            if not self._dirty:
                from megatron_moevement.scope import capture_live_state

                self._live_backup = capture_live_state(old.registry)
        while True:
            self._teardown()
            info = self.ctx.wait_for_generation(self.ctx.generation)
            self.ctx.generation = info["generation"]
            again = None
            try:
                self.ctx.init_process_group()
                return self._recover_in_generation(old if self.has_state else None, info, t0)
            except (RuntimeError, ConnectionError) as exc:
                if isinstance(exc, RecoveryError):
                    raise
                again = _describe(exc)
            logger.warning("rank %d: failure during recovery (%s); widening and restarting",
                           self.ctx.rank, again)

    def _teardown(self) -> None:
        """Destroys every process group *and every reference to one*, so that the gloo/NCCL
        connections really close: that is what makes peers blocked on this rank fail fast."""
        import gc

        import torch.distributed as dist
        from megatron.core import parallel_state

        if self.strategy is not None:
            self.strategy.abandon()
        if dist.is_initialized():
            # Abort every group first: it closes the connections even while something still
            # references the group objects.
            for group in list(dist.distributed_c10d._world.pg_map.keys()):
                try:
                    group.abort()
                except Exception as exc:  # pragma: no cover - best effort
                    logger.debug("abort of a process group failed: %s", exc)
            if dist.get_backend() == "gloo":
                from megatron_moevement.runtime.connections import sever_connections

                n = sever_connections([int(os.environ["MASTER_PORT"])], self.ctx.job_hosts())
                logger.debug("severed %d gloo connections", n)
            try:
                dist.destroy_process_group()
            except Exception as exc:  # pragma: no cover - best effort on a broken group
                logger.debug("destroy_process_group failed: %s", exc)
        parallel_state.destroy_model_parallel()
        self.trainer = None
        gc.collect()

    def _agree(self, value: int, op) -> int:
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=op)
        return int(t.item())

    def _recover_as_spare(self, t0: float) -> None:
        info = _get_json(self.ctx.store, f"gen/{self.ctx.generation}")
        failure = None
        try:
            self._recover_in_generation(None, info, t0)
        except (RuntimeError, ConnectionError) as exc:
            if isinstance(exc, RecoveryError):
                raise
            failure = _describe(exc)
        if failure is not None:
            self.recover(failure)

    def _recover_in_generation(self, old, info: dict, t0: float) -> RecoveryReport:
        import torch.distributed as dist

        from megatron_moevement.scope import (
            RankStatus,
            exchange_logs,
            gather_status,
            make_replay_communicator,
            plan_scope,
            restore_live_state,
        )

        failed = sorted(info["failed"])
        spare = old is None or not self.has_state
        t_detect = time.perf_counter() - t0
        big = 1 << 62
        # 1. Rebuild Megatron state and the strategy on the new groups.
        t1 = time.perf_counter()
        self.trainer, self.strategy = self.build()
        ensure_optimizer_state(self.trainer.optimizer)
        self.strategy.registry.refresh()
        t_rebuild = time.perf_counter() - t1
        # 2. Where everyone stands; choose the scope (scoped if the cut allows, else global).
        statuses = gather_status(
            RankStatus(self.ctx.rank, self.trainer.pp_rank, self.trainer.dp_rank,
                       -1 if spare else self.committed, self._dirty and not spare, not spare,
                       self.strategy.upstream_log is not None),
            self.ctx.world_size,
        )
        cfg = self.strategy.config
        plan = plan_scope(statuses, failed,
                          cfg.upstream_logging and cfg.recovery_scope == "auto")
        in_scope = self.ctx.rank in plan.ranks
        committed = plan.committed
        if spare:
            persisted = big if self._received_ckpt is None else self._received_ckpt.generation
        else:
            ckpt_old = old.persisted_checkpoint
            persisted = -1 if ckpt_old is None else ckpt_old.generation
        window = self._agree(persisted, dist.ReduceOp.MIN)
        window_count = self._agree(0 if spare else old._window_count, dist.ReduceOp.MAX)
        if window < 0:
            raise RecoveryError(
                "no sparse checkpoint is persisted on every surviving rank yet (failure in the "
                "first window); restart from the durable tier"
            )
        # 3. Host state: survivors adopt theirs; replacements fetch from peer replicas.
        t2 = time.perf_counter()
        if not spare:
            self.strategy.adopt_host_state(old)
        elif self._received_ckpt is not None:
            self.strategy.checkpoints = [self._received_ckpt]
        if spare and self._received_log is not None:
            self.strategy.scalar_log.load_dict(self._received_log)
        have = [c.generation for c in self.strategy.checkpoints]
        needs_ckpt = self._gather_flags(in_scope and window not in have)
        needs_log = self._gather_flags(
            in_scope and (plan.scoped or (spare and self._received_log is None)))
        ckpt = self._exchange_checkpoints(failed, window, needs_ckpt)
        log_source = min(r for r in range(self.ctx.world_size)
                         if (r not in plan.ranks if plan.scoped else statuses[r].has_state))
        self._exchange_scalar_log(log_source, needs_log)
        feed = {}
        if plan.scoped:
            iterations = list(range(ckpt.start_iteration + 1, committed + 1))
            feed = exchange_logs(self.ctx.rank, statuses, plan, self.strategy.upstream_log,
                                 iterations, self.trainer.model_config.num_microbatches)
        t_fetch = time.perf_counter() - t2
        # 4. In scope: roll back and replay to the committed iteration. Outside: keep live state.
        t3 = time.perf_counter()
        if in_scope:
            def replay_iteration(it: int) -> None:
                self.fault_hook(it, "replay", self)
                self.trainer.train_iteration(it)

            if plan.scoped and self.trainer.layout.pp > 1:
                pp = self.trainer.pp_rank
                self.trainer.p2p_communicator = make_replay_communicator(
                    self.strategy.gpt_model.config, feed,
                    prev_in_scope=(pp - 1) in plan.stages, next_in_scope=(pp + 1) in plan.stages,
                    upstream_log=self.strategy.upstream_log)
            try:
                replay = self.strategy.rollback_and_replay(committed, replay_iteration, ckpt)
            finally:
                self.trainer.p2p_communicator = self.strategy.p2p_communicator
        else:
            restore_live_state(self.strategy.registry, self._live_backup)
            replay = {"iterations_replayed": []}
            self.fault_hook(committed, "recovery_wait", self)
        dist.barrier()  # ranks outside the scope wait here for the replay to finish
        t_replay = time.perf_counter() - t3
        self.strategy.resume_after_recovery(committed, window_count, ckpt)
        self.committed = committed
        self.has_state = True
        self._dirty = False
        self._live_backup = None
        self.ctx.store.add(f"stable/{self.ctx.generation}", 1)
        report = RecoveryReport(
            generation=self.ctx.generation,
            failed_ranks=failed,
            scope="scoped" if plan.scoped else "global",
            scope_ranks=plan.ranks,
            reason=plan.reason,
            tier="sparse-checkpoint",
            committed_iteration=committed,
            window=ckpt.generation,
            window_start=ckpt.start_iteration,
            iterations_replayed=replay["iterations_replayed"],
            microbatches_replayed=len(replay["iterations_replayed"])
            * self.trainer.model_config.num_microbatches,
            spare=spare,
            times_s=dict(detect=t_detect, rebuild=t_rebuild, fetch=t_fetch, replay=t_replay),
        )
        self.reports.append(report)
        logger.warning(
            "rank %d recovered (generation %d, failed %s, %s recovery of ranks %s from window "
            "%d%s): replayed iterations %s; detect %.3fs rebuild %.3fs fetch %.3fs replay %.3fs",
            self.ctx.rank, report.generation, failed, report.scope, plan.ranks, report.window,
            f", because {plan.reason}" if plan.reason else "", report.iterations_replayed,
            t_detect, t_rebuild, t_fetch, t_replay,
        )
        return report

    def _gather_flags(self, flag: bool) -> list[bool]:
        import torch.distributed as dist

        t = torch.zeros(self.ctx.world_size, dtype=torch.int64)
        t[self.ctx.rank] = int(bool(flag))
        dist.all_reduce(t)
        return [bool(v) for v in t.tolist()]

    def _exchange_checkpoints(self, failed: list[int], window: int, needs: list[bool]):
        """Each rank lacking its window-``window`` checkpoint receives it from the lowest
        surviving rank that holds a replica; returns this rank's checkpoint of that window."""
        import torch.distributed as dist

        from megatron_moevement.replication import choose_peers
        from megatron_moevement.snapshot import SlotSnapshot, SparseCheckpoint, allocate_host_buffer

        cfg = self.strategy.config
        world = self.ctx.world_size
        ranks_per_node = self.strategy.replicator_ranks_per_node
        for lost in [r for r in range(world) if needs[r]]:
            holders = [p for p in choose_peers(lost, world, cfg.replication_factor, ranks_per_node)
                       if p not in failed]
            if not holders:
                raise RecoveryError(
                    f"rank {lost}'s sparse checkpoint has no surviving replica (its peers "
                    f"{choose_peers(lost, world, cfg.replication_factor, ranks_per_node)} failed "
                    "too); fall back to the durable tier (MoEvementConfig.durable_dir) or raise "
                    "replication_factor"
                )
            sender = holders[0]
            if self.ctx.rank == sender:
                slots = self.strategy.replicator.replicas[lost].windows.get(window)
                if slots is None or any(s is None for s in slots):
                    raise RecoveryError(
                        f"rank {sender} lacks a complete replica of rank {lost}'s window {window}"
                    )
                send_bytes(json.dumps(len(slots)).encode(), lost)
                for slot in slots:
                    slot.verify()
                    used = max((r.offset + r.nbytes for r in slot.records.values()), default=0)
                    send_bytes(json.dumps(slot.manifest()).encode(), lost)
                    send_bytes(bytes(slot.buffer[:used].numpy()), lost)
            elif self.ctx.rank == lost:
                count = json.loads(recv_bytes(sender))
                slots = []
                for _ in range(count):
                    manifest = json.loads(recv_bytes(sender))
                    payload = recv_bytes(sender)
                    buf = allocate_host_buffer(len(payload))
                    if payload:
                        buf[: len(payload)].copy_(torch.frombuffer(bytearray(payload),
                                                                   dtype=torch.uint8))
                    slot = SlotSnapshot.from_manifest(manifest, buf)
                    slot.verify()
                    slots.append(slot)
                ckpt = SparseCheckpoint.from_slots(slots)
                self.strategy.checkpoints = [ckpt]
                self._received_ckpt = ckpt
        mine = [c for c in self.strategy.checkpoints if c.generation == window]
        if not mine:
            raise RecoveryError(f"rank {self.ctx.rank} has no sparse checkpoint of window {window}")
        return mine[0]

    def _exchange_scalar_log(self, source: int, needs: list[bool]) -> None:
        """``source`` sends its scalar log (global values) to every rank that needs it."""
        for lost in [r for r in range(self.ctx.world_size) if needs[r] and r != source]:
            if self.ctx.rank == source:
                send_bytes(json.dumps(self.strategy.scalar_log.to_dict()).encode(), lost)
            elif self.ctx.rank == lost:
                self._received_log = json.loads(recv_bytes(source))
                self.strategy.scalar_log.load_dict(self._received_log)
