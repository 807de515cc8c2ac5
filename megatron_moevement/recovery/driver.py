"""Failure detection, spare join, group rebuild and rollback recovery.

Mechanism (chosen over a home-made protocol): torch.distributed's own ``TCPStore`` and
``PrefixStore``. The job's agent (the local launcher, or the per-task agent under SLURM) hosts
the store, so it outlives any worker. Each process-group *generation* ``g`` is initialized on
``PrefixStore("gen<g>/", store)``; after a failure the survivors and the spares that replace the
failed ranks initialize generation ``g+1`` on the same store, keeping their in-memory state. The
agent, which sees its children die, announces a generation with the failed ranks (``gen/<g>``) and
assigns spares (``spare/<id>``). This is the same pattern as torchrun's rendezvous and
nvidia-resiliency-ext's in-job restart, without their extra daemons (neither is needed on the
CPU/gloo harness; on GPUs the store and generations are unchanged and NCCL groups are rebuilt the
same way). :class:`JobCoordinator` is the agent's side of this protocol, shared by the local
agent (:class:`~megatron_moevement.harness.launcher.ElasticAgent`) and the SLURM task agents
(:mod:`megatron_moevement.megatron.elastic`).

Detection, by what fails:

* **Crash** (process killed, node lost): a dead peer makes gloo (and NCCL with async error
  handling) raise in the survivors that talk to it within milliseconds; each survivor then tears
  down its groups and shuts down its connections to job hosts, which makes every other rank's
  pending collective fail too, so the whole job notices without waiting for timeouts.
* **Hang** (a stopped process, a frozen node, a thread stuck holding the GIL): its sockets stay
  open, so nothing fails. Every rank runs a :class:`Heartbeat` thread that rewrites ``hb/<rank>`` in the store
  every ``MoEvementConfig.heartbeat_interval_s``; the coordinator declares a rank whose heartbeat
  has not changed for ``heartbeat_timeout_s`` failed: it sets ``abort/<g>`` (each survivor's
  heartbeat thread sees it and shuts down its connections: the crash path from here on) and kills
  the silent process by pid, after which it is replaced like a crashed rank.
* Collective timeouts remain the last resort.

Recovery (:meth:`RecoveryDriver.recover`), scoped when possible (:mod:`megatron_moevement.recovery.scope`):

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
The recovery *path* is reported and logged: ``scoped`` (in-memory, the failed stages only), else
``global`` (in-memory, every rank rolls back: every stage failed, upstream logging is off, or the
ranks outside the failed stages disagree on the last committed iteration), else ``durable``: when
no surviving replica holds a failed rank's checkpoint, the driver asks its pluggable
:class:`DurableCheckpointLoader` (configured with ``MoEvementConfig.durable_dir``); without one,
recovery stops with an error that names the missing replica and the next tier.

A failure before the first sparse checkpoint has persisted (in the job's first window) has no
checkpoint to roll back to. The *initial-state* tier covers it: when the job starts, every rank
records its first iteration and a fingerprint of its weights in the store; after the rebuild
every rank checks that its fresh, seeded build reproduces them and replays (globally, with the
logged scalars) from the first iteration to the last committed one. A build that does not
reproduce the initial weights stops recovery with an error that says so.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterable, Protocol

import torch

from megatron_moevement.logging_utils import get_logger
from megatron_moevement.snapshot.transport import recv_bytes, recv_slot, send_bytes, send_slot

logger = get_logger(__name__)

_POLL_S = 0.05

HEARTBEAT_KEY = "hb/{rank}"
"""Store key a rank's :class:`Heartbeat` rewrites (JSON: beat, pid, host, generation, interval_s,
timeout_s, done)."""
ABORT_KEY = "abort/{generation}"
"""Store key the coordinator sets to make every survivor of a generation abort its collectives."""


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
    heartbeat: "Heartbeat | None" = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _live_generation: int | None = field(default=None, repr=False)
    """Generation whose process groups are up in this process (None while torn down)."""
    _aborted_generation: int | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, timeout_s: float = 120.0, wait_s: float = 600.0) -> "ElasticContext":
        """Joins as ``RANK`` or, for a spare (``MOEVEMENT_SPARE=1``), waits to be assigned."""
        store = connect_store()
        world = int(os.environ["WORLD_SIZE"])
        if os.environ.get("MOEVEMENT_SPARE") == "1":
            spare_id = os.environ["LOCAL_PROC_ID"]
            key = f"spare/{spare_id}"
            deadline = time.monotonic() + wait_s
            logger.info("spare %s waits in the rendezvous for a rank to take", spare_id)
            while not _has(store, key):
                if _has(store, "job/done") or _has(store, "job/failed"):
                    logger.info("spare %s: the job ended without needing it", spare_id)
                    raise SystemExit(0)
                if time.monotonic() > deadline:
                    logger.info("spare %s: not needed within %.0f s; leaving", spare_id, wait_s)
                    raise SystemExit(0)
                time.sleep(_POLL_S)
            assignment = _get_json(store, key)
            logger.warning(
                "spare %s takes rank %d in generation %d",
                spare_id,
                assignment["rank"],
                assignment["generation"],
            )
            return cls(store, assignment["rank"], world, assignment["generation"], timeout_s)
        return cls(store, int(os.environ["RANK"]), world, 0, timeout_s)

    @property
    def is_spare_join(self) -> bool:
        return self.generation > 0

    def job_hosts(self, store=None) -> set[str]:
        """Addresses of every rank's host, as published in the store."""
        store = store if store is not None else self.store
        hosts: set[str] = set()
        for rank in range(self.world_size):
            key = f"hosts/{rank}"
            if _has(store, key):
                hosts.update(_get_json(store, key))
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
        with self._lock:
            self._live_generation = self.generation

    def mark_torn_down(self) -> None:
        """The process groups of the current generation are being destroyed (no more aborts)."""
        with self._lock:
            self._live_generation = None

    def start_heartbeat(self, interval_s: float, timeout_s: float) -> "Heartbeat":
        """Starts (once) this rank's :class:`Heartbeat` thread."""
        if self.heartbeat is None:
            self.heartbeat = Heartbeat(self, interval_s, timeout_s).start()
        return self.heartbeat

    def abort_if_requested(self, store) -> bool:
        """Called by the heartbeat thread: if the coordinator declared this rank's live generation
        failed (``abort/<g>``), shuts down the connections of its process groups so that every
        pending collective of this rank fails now (the crash path). Returns True if it did."""
        if not self._lock.acquire(blocking=False):
            return False  # the main thread is (re)initializing or tearing down groups
        try:
            generation = self._live_generation
            if generation is None or generation == self._aborted_generation:
                return False
            key = ABORT_KEY.format(generation=generation)
            if not _has(store, key):
                return False
            self._aborted_generation = generation
            info = _get_json(store, key)
            logger.warning(
                "rank %d: the agent declared generation %d failed (%s); aborting this rank's "
                "collectives",
                self.rank,
                generation,
                info.get("reason", "no reason given"),
            )
            self._abort_collectives(store)
            return True
        finally:
            self._lock.release()

    def _abort_collectives(self, store) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            return
        if dist.get_backend() == "gloo":
            # gloo's abort() does not close its TCP pairs; shutting the sockets down does.
            from megatron_moevement.runtime.connections import sever_connections

            n = sever_connections([int(os.environ["MASTER_PORT"])], self.job_hosts(store))
            logger.debug("severed %d gloo connections", n)
            return
        for group in list(dist.distributed_c10d._world.pg_map.keys()):
            try:  # NCCL: abort() is ncclCommAbort, meant to be called from another thread
                group.abort()
            except Exception as exc:  # pragma: no cover - best effort, needs NCCL
                logger.debug("abort of a process group failed: %s", exc)

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
            if _has(self.store, "job/failed"):
                raise RecoveryError(
                    f"the job's agent gave up: {self.store.get('job/failed').decode()}"
                )
            if time.monotonic() > deadline:
                raise RecoveryError(
                    f"no new process-group generation after {after} was announced within "
                    f"{wait_s:.0f}s: the agent saw no failed or silent rank (a collective timeout "
                    "without a crash or a missed heartbeat?). Restart the job from the durable "
                    "tier."
                )
            time.sleep(_POLL_S)


class Heartbeat:
    """A daemon thread that proves this rank is alive and relays the coordinator's aborts.

    Every ``interval_s`` it rewrites ``hb/<rank>`` in the job's store (on a connection of its
    own, so it never waits behind the main thread's store calls) and checks whether the
    coordinator declared the rank's generation failed (:meth:`ElasticContext.abort_if_requested`).
    A stopped process (SIGSTOP, a frozen node) stops beating, which is what the coordinator
    watches for; a rank whose main thread is merely busy keeps beating.

    Args:
        ctx: This rank's elastic context.
        interval_s: Seconds between beats.
        timeout_s: Silence after which the coordinator declares this rank failed (published with
            every beat, so the coordinator needs no configuration of its own).
    """

    def __init__(self, ctx: ElasticContext, interval_s: float, timeout_s: float) -> None:
        self.ctx = ctx
        self.interval_s = float(interval_s)
        self.timeout_s = float(timeout_s)
        self.beats = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store = None
        self._failed_writes = 0

    def start(self) -> "Heartbeat":
        try:
            self._store = self.ctx.store.clone()
        except Exception:  # pragma: no cover - stores without clone(): a fresh client
            self._store = connect_store()
        self._beat()  # the first beat before returning: the coordinator sees us at once
        self._thread = threading.Thread(
            target=self._run, name=f"moevement-heartbeat-r{self.ctx.rank}", daemon=True
        )
        self._thread.start()
        logger.debug(
            "heartbeat of rank %d every %.2fs (timeout %.2fs)",
            self.ctx.rank,
            self.interval_s,
            self.timeout_s,
        )
        return self

    def _beat(self, done: bool = False) -> None:
        self.beats += 1
        value = dict(
            beat=self.beats,
            pid=os.getpid(),
            host=socket.gethostname(),
            generation=self.ctx.generation,
            interval_s=self.interval_s,
            timeout_s=self.timeout_s,
            done=done,
        )
        self._store.set(HEARTBEAT_KEY.format(rank=self.ctx.rank), json.dumps(value))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
                self.ctx.abort_if_requested(self._store)
                self._failed_writes = 0
            except Exception as exc:  # the store is gone (agent died) or a transient error
                self._failed_writes += 1
                if self._failed_writes == 3:
                    logger.warning(
                        "rank %d: heartbeat cannot reach the job's store (%s)", self.ctx.rank, exc
                    )

    def stop(self, done: bool = True) -> None:
        """Stops beating; with ``done`` the last beat says this rank finished (not silent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, 2 * self.interval_s))
        if done and self._store is not None:
            try:
                self._beat(done=True)
            except Exception as exc:  # pragma: no cover - store gone at shutdown
                logger.debug("final heartbeat failed: %s", exc)


class ProcessTable(Protocol):
    """The processes a :class:`JobCoordinator` supervises, by process id (the ``LOCAL_PROC_ID``
    of the local launcher, the SLURM task id under SLURM): ids ``0..world_size-1`` start as the
    ranks of the same number, the others are spares."""

    def returncode(self, proc: int) -> int | None:
        """The exit status of ``proc`` (negative: killed by that signal), None while it runs."""

    def pid(self, proc: int) -> int | None:
        """Its process id on its host, if known."""

    def kill(self, proc: int) -> None:
        """Kills ``proc`` by pid (SIGKILL), also when it is stopped."""

    def log_hint(self, procs: list[int] | None = None) -> str:
        """The tails of the logs of ``procs`` (all when None), for error messages."""


class JobCoordinator:
    """The agent's side of the elastic protocol: replaces failed ranks by spares and announces
    process-group generations in the job's store; declares silent ranks failed.

    Shared by the local :class:`~megatron_moevement.harness.launcher.ElasticAgent` and the
    SLURM task agents (:mod:`megatron_moevement.megatron.elastic`), which differ only in how
    they see and kill processes (:class:`ProcessTable`).

    Store keys it writes: ``gen/<g>`` (``{"generation": g, "failed": [ranks]}``), ``spare/<id>``
    (``{"rank": r, "generation": g}``), ``abort/<g>`` (a silent rank made generation ``g``
    fail), ``job/done`` and ``job/failed`` (the reason). It reads ``hb/<rank>`` (heartbeats) and
    ``stable/<g>`` (how many ranks finished recovering into generation ``g``).

    Args:
        store: The job's store (the agent hosts it).
        world_size: Number of ranks.
        spares: Process ids of the spares, in the order they are used.
        batch_window_s: After a first failure, how long to wait for simultaneous ones, so that
            they are recovered in one generation.
        elastic: Whether the workers can take over a rank of a running job (they run a
            :class:`RecoveryDriver`). If not (e.g. Megatron-LM's ``pretrain_gpt.py``), a failure
            ends the job at once: every rank is killed by pid and ``job/failed`` says why.
    """

    BEAT_CHECK_S = 0.1
    """How often heartbeats are read."""

    def __init__(
        self,
        store,
        world_size: int,
        spares: Iterable[int],
        batch_window_s: float = 0.5,
        elastic: bool = True,
    ) -> None:
        self.store = store
        self.world_size = world_size
        self.batch_window_s = batch_window_s
        self.elastic = elastic
        self.generation = 0
        self.rank_to_proc: dict[int, int] = {r: r for r in range(world_size)}
        self.free_spares: list[int] = list(spares)
        self.failures: list[dict] = []
        """One entry per failed rank: rank, pid, code, generation, spare, cause ("exit" or
        "heartbeat"; then also silent_s and detected_at), and on the last of a batch "failed"."""
        self.pending_failed: set[int] = set()
        self._beats: dict[int, tuple[bytes, float]] = {}
        """Per rank: its last heartbeat value and when it changed (monotonic)."""
        self._known: set[int] = set()
        """Ranks whose heartbeat key exists."""
        self._silenced: dict[int, dict] = {}

    # ------------------------------------------------------------------ main loop
    def run(self, table: ProcessTable, timeout: float) -> None:
        """Supervises until every rank exited 0 (then sets ``job/done``).

        Raises:
            JobFailed: More ranks failed than spares are left, or a failure in a non-elastic job.
            JobTimeout: ``timeout`` seconds passed.
        """
        from megatron_moevement.harness.launcher import JobTimeout

        deadline = time.monotonic() + timeout
        next_beat_check = 0.0
        while True:
            now = time.monotonic()
            if now > deadline:
                self.fail(f"the job did not finish within {timeout:.0f}s")
                raise JobTimeout(
                    f"elastic job did not finish within {timeout:.0f}s" + table.log_hint()
                )
            dead = self._dead(table)
            if dead:
                time.sleep(self.batch_window_s)  # gather simultaneous failures into one batch
                self._replace(table, self._dead(table))
                continue
            if now >= next_beat_check:
                next_beat_check = now + self.BEAT_CHECK_S
                silent = self._silent(table, now)
                if silent:
                    self._abort(table, silent)
                    continue
            if all(table.returncode(p) == 0 for p in self.rank_to_proc.values()):
                self.store.set("job/done", "1")
                return
            time.sleep(_POLL_S)

    def fail(self, reason: str) -> None:
        """Marks the job failed (spares and waiting ranks leave)."""
        self.store.set("job/failed", reason)

    # ------------------------------------------------------------------ failures
    def _dead(self, table: ProcessTable) -> list[int]:
        return [r for r, p in self.rank_to_proc.items() if table.returncode(p) not in (None, 0)]

    def _stable(self, generation: int) -> bool:
        if generation == 0:
            return True
        key = f"stable/{generation}"
        if not _has(self.store, key):
            return False
        return int(self.store.add(key, 0)) >= len(self.rank_to_proc)

    def _replace(self, table: ProcessTable, dead: list[int]) -> None:
        from megatron_moevement.harness.launcher import JobFailed

        now = time.monotonic()
        codes = {r: table.returncode(self.rank_to_proc[r]) for r in dead}
        if not self.elastic:
            reason = (
                f"ranks {dead} failed (exit codes {[codes[r] for r in dead]}) and the "
                "workers cannot take over a rank of a running job; restart the job"
            )
            self._end(table, reason)
            raise JobFailed(reason + table.log_hint([self.rank_to_proc[r] for r in dead]))
        if len(dead) > len(self.free_spares):
            reason = (
                f"ranks {dead} died and only {len(self.free_spares)} spare(s) are left; "
                "restart the job with more spares (--spares)"
            )
            self._end(table, reason)
            raise JobFailed(reason + table.log_hint())
        if not self._stable(self.generation):
            # The previous recovery did not finish: its failed ranks are still without state.
            self.pending_failed |= set(self.failures[-1]["failed"]) if self.failures else set()
        else:
            self.pending_failed = set()
        self.generation += 1
        failed = sorted(set(dead) | self.pending_failed)
        for rank in dead:
            proc = self.rank_to_proc[rank]
            spare = self.free_spares.pop(0)
            silenced = self._silenced.pop(rank, None)
            entry = dict(
                rank=rank,
                pid=table.pid(proc),
                code=codes[rank],
                generation=self.generation,
                spare=spare,
                cause="exit" if silenced is None else "heartbeat",
            )
            entry.update(silenced or {})
            self.failures.append(entry)
            self.rank_to_proc[rank] = spare
            if rank in self._beats:  # the replacement's first beat changes it: time from now
                self._beats[rank] = (self._beats[rank][0], now)
            self.store.set(
                f"spare/{spare}", json.dumps(dict(rank=rank, generation=self.generation))
            )
        self.failures[-1]["failed"] = failed
        self.store.set(
            f"gen/{self.generation}", json.dumps(dict(generation=self.generation, failed=failed))
        )
        logger.warning(
            "agent: ranks %s failed; generation %d with spares %s",
            dead,
            self.generation,
            [self.rank_to_proc[r] for r in dead],
        )

    def _end(self, table: ProcessTable, reason: str) -> None:
        self.fail(reason)
        for proc in self.rank_to_proc.values():
            if table.returncode(proc) is None:
                table.kill(proc)

    # ------------------------------------------------------------------ heartbeats
    def _silent(self, table: ProcessTable, now: float) -> list[tuple[int, float]]:
        """Ranks whose process runs but whose heartbeat has not changed for their timeout."""
        watched = []
        for rank, proc in self.rank_to_proc.items():
            if rank in self._silenced or table.returncode(proc) is not None:
                continue
            if rank not in self._known:
                if not _has(self.store, HEARTBEAT_KEY.format(rank=rank)):
                    continue  # not started: a hang before the first beat is init's timeout's job
                self._known.add(rank)
            watched.append(rank)
        if not watched:
            return []
        values = self.store.multi_get([HEARTBEAT_KEY.format(rank=r) for r in watched])
        silent = []
        for rank, raw in zip(watched, values):
            info = json.loads(raw.decode())
            previous = self._beats.get(rank)
            if previous is None or previous[0] != raw:
                self._beats[rank] = (raw, now)
                continue
            if info.get("done"):
                continue
            age = now - previous[1]
            if age > float(info["timeout_s"]):
                silent.append((rank, age))
        return silent

    def _abort(self, table: ProcessTable, silent: list[tuple[int, float]]) -> None:
        ranks = [r for r, _ in silent]
        reason = ", ".join(f"rank {r} sent no heartbeat for {age:.1f}s" for r, age in silent)
        # Survivors first (their heartbeat threads shut their connections down), then the kill.
        self.store.set(
            ABORT_KEY.format(generation=self.generation),
            json.dumps(dict(ranks=ranks, reason=reason)),
        )
        for rank, age in silent:
            proc = self.rank_to_proc[rank]
            self._silenced[rank] = dict(silent_s=round(age, 3), detected_at=time.time())
            logger.warning(
                "agent: %s (pid %s); killing it and aborting generation %d",
                f"rank {rank} sent no heartbeat for {age:.1f}s",
                table.pid(proc),
                self.generation,
            )
            table.kill(proc)


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


def ensure_optimizer_state(optimizer) -> None:
    """Creates Adam state (step, moments) for parameters that have none yet, as torch's Adam does
    at its first step, so a rebuilt optimizer has tensors to restore into."""
    from megatron_moevement.state.optim_view import iter_optimizers

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


class DurableCheckpointLoader(Protocol):
    """The durable tier's side of recovery (the last fallback, after scoped and global in-memory
    recovery): returns ``rank``'s newest sparse checkpoint from durable storage, or None.

    Called on every rank, with the rank and its parallel layout (``trainer.layout``, None if the
    trainer has none), when a failed rank's checkpoint has no surviving replica. All ranks must
    return checkpoints of the same window (``SparseCheckpoint.generation``).
    """

    def __call__(self, rank: int, layout: Any) -> Any:  # -> SparseCheckpoint | None
        ...


class RecoveryDriver:
    """Runs a training loop that survives killed and hung ranks.

    Args:
        ctx: This process's :class:`ElasticContext`.
        build: ``build() -> (trainer, strategy)`` constructs Megatron state and a
            :class:`~megatron_moevement.strategy.MoEvementStrategy` on the current process group;
            ``trainer.train_iteration(i)`` runs one iteration.
        fault_hook: Optional ``f(iteration, phase, driver)`` called at fault-injection points.
        config: The job's :class:`~megatron_moevement.config.MoEvementConfig` (heartbeat settings,
            durable tier); default: the defaults.
        durable_loader: The durable tier's :class:`DurableCheckpointLoader`, used when
            ``config.durable_dir`` is set and a failed rank's checkpoint has no surviving replica.
            Default with ``durable_dir`` set:
            :class:`~megatron_moevement.durable.recovery_loader.DurableTierLoader` over it.
    """

    def __init__(
        self,
        ctx: ElasticContext,
        build: Callable,
        fault_hook: Callable | None = None,
        config=None,
        durable_loader: DurableCheckpointLoader | None = None,
    ):
        from megatron_moevement.config import MoEvementConfig

        self.ctx = ctx
        self.build = build
        self.fault_hook = fault_hook or (lambda *a: None)
        self.config = config or MoEvementConfig()
        if durable_loader is None and self.config.durable_dir is not None:
            # The real tier: the newest complete `dist_checkpointing` (backend moevement)
            # checkpoint the strategy's periodic saver wrote under durable_dir.
            from megatron_moevement.durable.recovery_loader import DurableTierLoader

            durable_loader = DurableTierLoader(
                self.config.durable_dir, strategy_of=lambda: self.strategy
            )
        self.durable_loader = durable_loader
        """The durable tier's loader (a :class:`DurableCheckpointLoader`), or None."""
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
                self._noticed_at = time.time()
                failure = _describe(exc)
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
        t0 = time.perf_counter()
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
                from megatron_moevement.recovery.scope import capture_live_state

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
                self._noticed_at = time.time()
                again = _describe(exc)
            logger.warning(
                "rank %d: failure during recovery (%s); widening and restarting",
                self.ctx.rank,
                again,
            )

    def _teardown(self) -> None:
        """Destroys every process group *and every reference to one*, so that the gloo/NCCL
        connections really close: that is what makes peers blocked on this rank fail fast."""
        import gc

        import torch.distributed as dist
        from megatron.core import parallel_state

        self.ctx.mark_torn_down()
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
        self._noticed_at = time.time()
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

        from megatron_moevement.recovery.scope import (
            RankStatus,
            exchange_logs,
            gather_status,
            global_plan,
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
        from megatron_moevement.strategy import rebuilding_for_recovery

        with rebuilding_for_recovery():  # fresh model, overwritten below: skip the replica check
            self.trainer, self.strategy = self.build()
        ensure_optimizer_state(self.trainer.optimizer)
        self.strategy.registry.refresh()
        t_rebuild = time.perf_counter() - t1
        # 2. Where everyone stands; choose the scope (scoped if the cut allows, else global).
        statuses = gather_status(
            RankStatus(
                self.ctx.rank,
                self.trainer.pp_rank,
                self.trainer.dp_rank,
                -1 if spare else self.committed,
                self._dirty and not spare,
                not spare,
                self.strategy.upstream_log is not None,
            ),
            self.ctx.world_size,
        )
        cfg = self.strategy.config
        if not any(s.has_state for s in statuses):
            # Host memory (checkpoints, replicas, scalar log) died with every process: nothing
            # in memory can rebuild the run, and waiting for another generation would not help.
            raise RecoveryError(
                f"every rank lost its state (ranks {failed} failed and no rank survived: all "
                "failed at once, or the job has a single rank, whose sparse checkpoints have no "
                "peer to be replicated to). In-memory recovery needs a surviving replica. Fix: "
                "restart the job from the durable tier (MoEvementConfig.durable_dir) or from "
                "Megatron's --save/--load; run with at least two ranks for in-memory recovery."
            )
        plan = plan_scope(statuses, failed, cfg.upstream_logging and cfg.recovery_scope == "auto")
        in_scope = self.ctx.rank in plan.ranks
        committed = plan.committed
        if spare:
            persisted = big if self._received_ckpt is None else self._received_ckpt.generation
        else:
            ckpt_old = old.persisted_checkpoint
            persisted = -1 if ckpt_old is None else ckpt_old.generation
        window = self._agree(persisted, dist.ReduceOp.MIN)
        window_count = self._agree(0 if spare else old._window_count, dist.ReduceOp.MAX)
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
        lost = (
            self._lost_ranks(failed, needs_ckpt)
            if window >= 0
            else list(range(self.ctx.world_size))
        )
        path = "scoped" if plan.scoped else "global"
        tier = "sparse-checkpoint"
        if window < 0 and (cfg.durable_dir is None or self.durable_loader is None):
            lost, tier = [], "initial-state"  # the first window has not persisted yet
        if lost:
            # Neither scoped nor global in-memory recovery can rebuild a rank whose checkpoint
            # has no surviving replica: the durable tier is the last fallback.
            in_memory_window = window
            fallback = self._durable_fallback(lost, window, plan, statuses, failed)
            if fallback is None:  # no durable checkpoint of this run yet either
                tier = "initial-state"
            else:
                window, plan = fallback
                in_scope, committed = self.ctx.rank in plan.ranks, plan.committed
                path, tier = "durable", "durable"
                # Same window: the other ranks that lack it still fetch it from replicas. An
                # older window: every rank has just loaded it.
                needs_ckpt = [
                    n and r not in lost and window == in_memory_window
                    for r, n in enumerate(needs_ckpt)
                ]
        first_iteration = None
        if tier == "initial-state":
            first_iteration = self._check_initial_state(statuses)
            plan = global_plan(
                statuses,
                "no sparse checkpoint had persisted yet (failure in the first window): every "
                "rank replays from the job's initial state",
            )
            in_scope, committed, path = True, plan.committed, "global"
        needs_log = self._gather_flags(
            in_scope and (plan.scoped or (spare and self._received_log is None))
        )
        ckpt = None
        if tier != "initial-state":
            ckpt = self._exchange_checkpoints(failed, window, needs_ckpt)
        log_source = min(
            r
            for r in range(self.ctx.world_size)
            if (r not in plan.ranks if plan.scoped else statuses[r].has_state)
        )
        self._exchange_scalar_log(log_source, needs_log)
        feed = {}
        if plan.scoped:
            iterations = list(range(ckpt.start_iteration + 1, committed + 1))
            feed = exchange_logs(
                self.ctx.rank,
                statuses,
                plan,
                self.strategy.upstream_log,
                iterations,
                self.trainer.model_config.num_microbatches,
            )
        if tier == "durable":
            self._check_scalar_coverage(ckpt.start_iteration + 1, committed, ckpt)
        elif tier == "initial-state":
            self._check_scalar_coverage(first_iteration, committed)
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
                    self.strategy.gpt_model.config,
                    feed,
                    prev_in_scope=(pp - 1) in plan.stages,
                    next_in_scope=(pp + 1) in plan.stages,
                    upstream_log=self.strategy.upstream_log,
                )
            try:
                if ckpt is None:
                    replay = self.strategy.replay_from_initial_state(
                        first_iteration, committed, replay_iteration
                    )
                else:
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
            tier=tier,
            path=path,
            committed_iteration=committed,
            window=-1 if ckpt is None else ckpt.generation,
            window_start=first_iteration - 1 if ckpt is None else ckpt.start_iteration,
            iterations_replayed=replay["iterations_replayed"],
            microbatches_replayed=len(replay["iterations_replayed"])
            * self.trainer.model_config.num_microbatches,
            spare=spare,
            times_s=dict(detect=t_detect, rebuild=t_rebuild, fetch=t_fetch, replay=t_replay),
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
            path,
            report.scope,
            plan.ranks,
            report.window,
            tier,
            f", because {plan.reason}" if plan.reason else "",
            report.iterations_replayed,
            t_detect,
            t_rebuild,
            t_fetch,
            t_replay,
        )
        return report

    def _gather_flags(self, flag: bool) -> list[bool]:
        import torch.distributed as dist

        t = torch.zeros(self.ctx.world_size, dtype=torch.int64)
        t[self.ctx.rank] = int(bool(flag))
        dist.all_reduce(t)
        return [bool(v) for v in t.tolist()]

    def _lost_ranks(self, failed: list[int], needs: list[bool]) -> list[int]:
        """Ranks that need the window's checkpoint and have no surviving replica holder (the
        same list on every rank)."""
        from megatron_moevement.snapshot.replication import choose_peers

        cfg = self.strategy.config
        world = self.ctx.world_size
        rpn = self.strategy.replicator_ranks_per_node
        return [
            r
            for r in range(world)
            if needs[r]
            and not [
                p for p in choose_peers(r, world, cfg.replication_factor, rpn) if p not in failed
            ]
        ]

    def _durable_fallback(self, lost: list[int], window: int, plan, statuses, failed):
        """Loads the durable tier's checkpoints; returns ``(window, plan)`` to recover with.

        If every rank's durable checkpoint is of the in-memory ``window``, only the ``lost``
        ranks take theirs and the scope stays as planned; otherwise every rank rolls back to
        the durable window (global). Returns ``None`` when nothing is persisted in memory yet
        (``window`` < 0) and the durable tier holds no checkpoint either: the caller then replays
        from the initial state. Raises :class:`RecoveryError` when the durable tier is not
        configured or has no common window.
        """
        import torch.distributed as dist

        from megatron_moevement.snapshot.replication import choose_peers
        from megatron_moevement.recovery.scope import global_plan

        cfg = self.strategy.config
        world = self.ctx.world_size
        rpn = self.strategy.replicator_ranks_per_node
        if window < 0:
            why = (
                "no sparse checkpoint is persisted on every surviving rank yet (failure in the "
                "first window)"
            )
        else:
            why = "; ".join(
                f"rank {r}'s sparse checkpoint has no surviving replica (its peers "
                f"{choose_peers(r, world, cfg.replication_factor, rpn)} failed too)"
                for r in lost
            )
        if cfg.durable_dir is None or self.durable_loader is None:
            missing = (
                "MoEvementConfig.durable_dir is not set"
                if cfg.durable_dir is None
                else "no durable checkpoint loader is installed " "(RecoveryDriver.durable_loader)"
            )
            raise RecoveryError(
                f"{why}. Tried scoped and global in-memory recovery; the durable tier is the next "
                f"fallback, but {missing}. Fix: configure the durable tier "
                "(MoEvementConfig.durable_dir) or raise replication_factor; restart the job from "
                "the durable tier."
            )
        logger.warning(
            "rank %d: %s; falling back to the durable tier (%s)",
            self.ctx.rank,
            why,
            cfg.durable_dir,
        )
        try:
            mine = self.durable_loader(self.ctx.rank, getattr(self.trainer, "layout", None))
        except Exception as exc:
            raise RecoveryError(
                f"the durable checkpoint loader failed on rank {self.ctx.rank}: "
                f"{_describe(exc)}"
            ) from exc
        durable = -1 if mine is None else int(mine.generation)
        low = self._agree(durable, dist.ReduceOp.MIN)
        high = self._agree(durable, dist.ReduceOp.MAX)
        if window < 0 and high < 0:
            logger.warning(
                "rank %d: the durable tier holds no checkpoint of this run either", self.ctx.rank
            )
            return None
        if low < 0 or low != high:
            absent = [r for r, flag in enumerate(self._gather_flags(mine is None)) if flag]
            detail = (
                f"ranks {absent} have no durable checkpoint"
                if absent
                else f"durable checkpoints span windows {low}..{high}"
            )
            raise RecoveryError(
                f"{why}, and the durable tier ({cfg.durable_dir}) cannot replace it: {detail}. "
                "Restart the job from an older durable checkpoint."
            )
        if low == window:
            if self.ctx.rank in lost:
                self.strategy.checkpoints = [mine]
                self._received_ckpt = mine
            logger.warning(
                "rank %d: durable tier: window %d for ranks %s", self.ctx.rank, low, lost
            )
            return window, plan
        # An older window: every rank rolls back to it (global).
        self.strategy.checkpoints = [mine]
        if self.ctx.rank in failed:
            self._received_ckpt = mine
        reason = (
            f"the durable tier holds window {low}, not the in-memory window {window}: every "
            "rank rolls back to it"
        )
        logger.warning("rank %d: durable tier: %s", self.ctx.rank, reason)
        return low, global_plan(statuses, reason)

    def _check_scalar_coverage(self, first: int, committed: int, ckpt=None) -> None:
        """Replay from a durable checkpoint (``ckpt``) or from the initial state needs the
        scalar log of every replayed iteration, ``first..committed``."""
        import torch.distributed as dist

        log = self.strategy.scalar_log
        missing = [it for it in range(first, committed + 1) if it not in log]
        if self._agree(len(missing), dist.ReduceOp.MAX):
            source = (
                "the initial state"
                if ckpt is None
                else f"the durable checkpoint of window {ckpt.generation}"
            )
            raise RecoveryError(
                f"replay from {source} starts at iteration {first}, but the scalar log in "
                f"memory covers {log.span()} (rank {self.ctx.rank} lacks {missing[:5]}): it "
                f"cannot be replayed to iteration {committed} bitwise. Restart the job from the "
                "durable tier."
            )

    # ------------------------------------------------------------------ initial-state tier
    def _initial_key(self, rank: int) -> str:
        return f"moevement/initial/{rank}"

    def _record_initial_state(self) -> None:
        """Records where this rank's training starts (first iteration, weight fingerprint) in
        the store, for the initial-state tier: a failure before the first sparse checkpoint
        persisted is recovered by rebuilding every rank and replaying from there."""
        from megatron_moevement.recovery.scope import state_fingerprint

        record = {
            "first_iteration": self.committed + 1,
            "fingerprint": state_fingerprint(self.strategy.registry),
        }
        self.ctx.store.set(self._initial_key(self.ctx.rank), json.dumps(record))

    def _check_initial_state(self, statuses) -> int:
        """Checks on every rank that the fresh build reproduces the recorded initial state;
        returns the first iteration to replay. Raises :class:`RecoveryError` otherwise."""
        import torch.distributed as dist

        from megatron_moevement.recovery.scope import state_fingerprint

        key = self._initial_key(self.ctx.rank)
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
        bad = self._gather_flags(bool(problem))
        low = self._agree(first, dist.ReduceOp.MIN)
        high = self._agree(first, dist.ReduceOp.MAX)
        if any(bad) or low != high:
            ranks = [r for r, flag in enumerate(bad) if flag]
            detail = f"rank {self.ctx.rank}: {problem}" if problem else f"ranks {ranks} failed it"
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

    def _exchange_checkpoints(self, failed: list[int], window: int, needs: list[bool]):
        """Each rank lacking its window-``window`` checkpoint receives it from the lowest
        surviving rank that holds a replica; returns this rank's checkpoint of that window."""
        from megatron_moevement.snapshot.replication import choose_peers
        from megatron_moevement.snapshot.engine import SparseCheckpoint

        cfg = self.strategy.config
        world = self.ctx.world_size
        ranks_per_node = self.strategy.replicator_ranks_per_node
        for lost in [r for r in range(world) if needs[r]]:
            # (_lost_ranks already sent ranks without a surviving holder to the durable tier.)
            holders = [
                p
                for p in choose_peers(lost, world, cfg.replication_factor, ranks_per_node)
                if p not in failed
            ]
            sender = holders[0]
            if self.ctx.rank == sender:
                slots = self.strategy.replicator.replicas[lost].windows.get(window)
                if slots is None or any(s is None for s in slots):
                    raise RecoveryError(
                        f"rank {sender} lacks a complete replica of rank {lost}'s window {window}"
                    )
                send_bytes(json.dumps(len(slots)).encode(), lost)
                for slot in slots:
                    send_slot(slot, lost)
            elif self.ctx.rank == lost:
                count = json.loads(recv_bytes(sender))
                slots = [recv_slot(sender) for _ in range(count)]
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
