"""The workers' side of the elastic protocol: the job store's keys, a rank's place across
process-group generations, and its heartbeat.

Mechanism (chosen over a home-made protocol): torch.distributed's own ``TCPStore`` and
``PrefixStore``. The job's agent hosts the store, so it outlives any worker. Each process-group
*generation* ``g`` is initialized on ``PrefixStore("gen<g>/", store)``; after a failure the
survivors and the spares that replace the failed ranks initialize generation ``g+1`` on the same
store, keeping their in-memory state. The agent, which sees its children die, announces a
generation with the failed ranks and assigns spares. This is the pattern of torchrun's rendezvous
and nvidia-resiliency-ext's in-job restart, without their extra daemons; on GPUs the store and
generations are unchanged and NCCL groups are rebuilt the same way.

Every key of the store is named once, in :class:`StoreKeys`.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

from megatron_moevement.logging_utils import get_logger
from megatron_moevement.recovery.errors import RecoveryError
from megatron_moevement.recovery.warm_spare import is_spare_process
from megatron_moevement.runtime.connections import (
    connections_to_port,
    sever_connections,
    sever_fds,
)

logger = get_logger(__name__)


POLL_S = 0.01
"""Seconds between two checks of the job's store while waiting. A check is a ~0.1 ms round trip,
so 100 Hz costs about 1% of a core and keeps each hand-off of a recovery (the agent sees the
failure, announces the generation, assigns a spare; ranks see it) to about 10 ms."""

STUCK_CHECK_S = 0.2
"""Seconds between two checks, by a rank's heartbeat thread, whether a newer generation was
announced while the rank's main thread still waits in its own (:meth:`ElasticContext.
break_superseded_wait`): one ~0.1 ms store request, five a second."""

STUCK_GRACE_S = 0.2
"""How long a rank may take to notice a newer generation itself before its heartbeat thread
breaks the wait it is in. A failure noticed through a failed collective is noticed in tens of
milliseconds; a wait on the store (a group's rendezvous with a rank that died before joining it)
is never noticed."""


class StoreKeys:
    """The keys of the job's store, for the agent and the workers alike."""

    JOB_DONE = "job/done"
    """Set by the coordinator when every rank finished."""
    JOB_FAILED = "job/failed"
    """Set (to the reason) when the job cannot go on; spares and waiting ranks leave."""

    @staticmethod
    def generation(generation: int) -> str:
        """``{"generation": g, "failed": [ranks]}``: the coordinator announces generation ``g``."""
        return f"gen/{generation}"

    @staticmethod
    def spare(spare_id) -> str:
        """``{"rank": r, "generation": g}``: spare process ``spare_id`` takes rank ``r``."""
        return f"spare/{spare_id}"

    @staticmethod
    def arrived(generation: int) -> str:
        """Counter of the ranks that arrived at recovery ``generation`` (before joining it)."""
        return f"arrived/{generation}"

    @staticmethod
    def stable(generation: int) -> str:
        """Counter of the ranks that finished recovering into ``generation``."""
        return f"stable/{generation}"

    @staticmethod
    def hosts(rank: int) -> str:
        """The addresses of ``rank``'s host (for severing its gloo connections)."""
        return f"hosts/{rank}"

    @staticmethod
    def heartbeat(rank: int) -> str:
        """What ``rank``'s :class:`Heartbeat` rewrites (JSON: beat, pid, host, generation,
        interval_s, timeout_s, done)."""
        return f"hb/{rank}"

    @staticmethod
    def abort(generation: int) -> str:
        """Set by the coordinator to make every survivor of ``generation`` abort its
        collectives (a silent rank was declared failed)."""
        return f"abort/{generation}"

    @staticmethod
    def initial_state(rank: int) -> str:
        """Where ``rank``'s training started (first iteration, weight fingerprint), for the
        initial-state recovery tier."""
        return f"moevement/initial/{rank}"

    @staticmethod
    def task(task: int) -> str:
        """A SLURM task agent's report of its worker (pid, exit status)."""
        return f"task/{task}"


def connect_store(timeout_s: float = 300.0):
    """Client connection to the job's store (hosted by the agent at MASTER_ADDR:MASTER_PORT)."""
    return dist.TCPStore(
        os.environ.get("MASTER_ADDR", "127.0.0.1"),
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def connect_store_tracked(timeout_s: float = 300.0) -> tuple[object, frozenset[int]]:
    """:func:`connect_store`, and the file descriptor of the connection it opened (empty when it
    cannot be told apart, e.g. another thread connected at the same moment)."""
    port = int(os.environ["MASTER_PORT"])
    before = connections_to_port(port)
    store = connect_store(timeout_s)
    opened = connections_to_port(port) - before
    return store, frozenset(opened) if len(opened) == 1 else frozenset()


def _get_json(store, key: str):
    return json.loads(store.get(key).decode())


def _has(store, key: str) -> bool:
    return store.check([key])


class GenerationSuperseded(RuntimeError):
    """A recovery generation was superseded by a newer one before every rank joined it."""


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
    store_fds: frozenset = field(default=frozenset(), repr=False)
    """The file descriptor of ``store``'s connection (:func:`connect_store_tracked`); empty:
    unknown, and a wait on the store cannot be broken (see :meth:`break_superseded_wait`)."""
    _recovering: bool = field(default=False, repr=False)
    """Between the teardown of a generation and joining the next: the main thread waits on the
    store by polling, and notices newer generations itself."""
    _severed_for: int | None = field(default=None, repr=False)
    """The generation whose waits :meth:`break_superseded_wait` broke (its store connection is
    shut down until :meth:`_reconnect_store`)."""
    _superseded_seen: tuple[int, float] | None = field(default=None, repr=False)
    """(generation, monotonic time) when the heartbeat first saw that generation superseded."""

    @classmethod
    def from_env(cls, timeout_s: float = 120.0, wait_s: float = 600.0) -> "ElasticContext":
        """Joins as ``RANK`` or, for a spare (``MOEVEMENT_SPARE=1``), waits to be assigned."""
        store, store_fds = connect_store_tracked()
        world = int(os.environ["WORLD_SIZE"])
        if is_spare_process():
            spare_id = os.environ["LOCAL_PROC_ID"]
            key = StoreKeys.spare(spare_id)
            deadline = time.monotonic() + wait_s
            logger.info("spare %s waits in the rendezvous for a rank to take", spare_id)
            while not _has(store, key):
                if _has(store, StoreKeys.JOB_DONE) or _has(store, StoreKeys.JOB_FAILED):
                    logger.info("spare %s: the job ended without needing it", spare_id)
                    raise SystemExit(0)
                if time.monotonic() > deadline:
                    logger.info("spare %s: not needed within %.0f s; leaving", spare_id, wait_s)
                    raise SystemExit(0)
                time.sleep(POLL_S)
            assignment = _get_json(store, key)
            logger.warning(
                "spare %s takes rank %d in generation %d",
                spare_id,
                assignment["rank"],
                assignment["generation"],
            )
            return cls(
                store,
                assignment["rank"],
                world,
                assignment["generation"],
                timeout_s,
                store_fds=store_fds,
            )
        return cls(store, int(os.environ["RANK"]), world, 0, timeout_s, store_fds=store_fds)

    @property
    def is_spare_join(self) -> bool:
        return self.generation > 0

    def job_hosts(self, store=None) -> set[str]:
        """Addresses of every rank's host, as published in the store."""
        store = store if store is not None else self.store
        hosts: set[str] = set()
        for rank in range(self.world_size):
            key = StoreKeys.hosts(rank)
            if _has(store, key):
                hosts.update(_get_json(store, key))
        return hosts

    def init_process_group(self) -> None:
        """Joins this rank's generation (``gen<g>/`` on the job's store).

        Raises:
            GenerationSuperseded: A recovery generation was replaced by a newer one (another rank
                failed meanwhile) before every rank arrived, or before every rank joined its
                rendezvous (the heartbeat broke the wait): join that one instead.
        """
        from megatron_moevement.runtime.connections import local_addresses

        with self._lock:
            self._recovering = False
        try:
            self.store.set(StoreKeys.hosts(self.rank), json.dumps(sorted(local_addresses())))
            if self.generation > 0:
                self._wait_for_everyone()
            dist.init_process_group(
                backend="gloo",
                store=dist.PrefixStore(f"gen{self.generation}/", self.store),
                rank=self.rank,
                world_size=self.world_size,
                timeout=timedelta(seconds=self.timeout_s),
            )
        except (RuntimeError, ConnectionError) as exc:
            broken = self._severed_for == self.generation
            if isinstance(exc, GenerationSuperseded) or broken:
                with self._lock:  # the caller joins the newer generation: it recovers
                    self._recovering = True
                    self._reconnect_store()
            if not broken:
                raise
            if dist.is_initialized():  # pragma: no cover - the rendezvous failed after it
                dist.destroy_process_group()
            raise GenerationSuperseded(
                f"generation {self.generation} was superseded by generation "
                f"{self.generation + 1} while this rank waited in its rendezvous ({exc})"
            ) from None
        with self._lock:
            self._live_generation = self.generation

    def _wait_for_everyone(self) -> None:
        """Waits until every rank arrived at this recovery generation, or a newer generation is
        announced. gloo's rendezvous inside ``init_process_group`` cannot be interrupted, so a
        generation that a second failure supersedes (the coordinator batches no failures by
        waiting: a later one widens the recovery under way) must be left before it."""
        key = StoreKeys.arrived(self.generation)
        self.store.add(key, 1)
        deadline = time.monotonic() + self.timeout_s
        while int(self.store.add(key, 0)) < self.world_size:
            if _has(self.store, StoreKeys.generation(self.generation + 1)):
                raise GenerationSuperseded(
                    f"generation {self.generation} was superseded by generation "
                    f"{self.generation + 1} before every rank arrived"
                )
            self._keep_waiting(
                deadline,
                f"not every rank arrived at generation {self.generation} within "
                f"{self.timeout_s:.0f}s. Restart the job from the durable tier.",
            )

    def mark_torn_down(self) -> None:
        """The process groups of the current generation are being destroyed (no more aborts);
        this rank recovers, and its store connection is whole again if it was broken."""
        with self._lock:
            self._live_generation = None
            self._recovering = True
            self._reconnect_store()

    def break_superseded_wait(self, store, now: float) -> bool:
        """Called by the heartbeat thread: if a newer generation was announced (a peer failed)
        and, :data:`STUCK_GRACE_S` later, this rank's main thread still has not started
        recovering, it waits for something the failed rank will never do, such as joining a
        process group's rendezvous. Then the connections it may wait on are shut down (its
        gloo connections to job hosts, NCCL communicators, its store connection), so the wait
        fails now instead of at the group timeout. Returns True if it did."""
        if not self._lock.acquire(blocking=False):
            return False  # the main thread is (re)initializing or tearing down groups
        try:
            generation = self.generation
            if self._recovering or self._severed_for == generation:
                return False
            if not _has(store, StoreKeys.generation(generation + 1)):
                self._superseded_seen = None
                return False
            if self._superseded_seen is None or self._superseded_seen[0] != generation:
                self._superseded_seen = (generation, now)
                return False
            if now - self._superseded_seen[1] < STUCK_GRACE_S:
                return False
            self._severed_for = generation
            logger.warning(
                "rank %d: generation %d was superseded (a peer failed) %.2fs ago and this rank "
                "still waits in it (a rendezvous with the failed rank?); shutting down its "
                "connections so that the wait fails now",
                self.rank,
                generation,
                now - self._superseded_seen[1],
            )
            if dist.is_initialized() and dist.get_backend() != "gloo":
                self.abort_collectives(store, from_heartbeat=True)
            port = int(os.environ["MASTER_PORT"])
            n = sever_connections([port], self.job_hosts(store))
            n_store = sever_fds(self.store_fds, port)
            logger.debug("severed %d gloo and %d store connections", n, n_store)
            return True
        finally:
            self._lock.release()

    def _reconnect_store(self) -> None:
        """Replaces ``store`` by a new connection if :meth:`break_superseded_wait` shut it down
        (called with the lock held)."""
        if self._severed_for is None:
            return
        self._severed_for = None
        if self.store_fds:
            self.store, self.store_fds = connect_store_tracked()
            logger.debug("rank %d: reconnected to the job's store", self.rank)

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
            key = StoreKeys.abort(generation)
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
            self.abort_collectives(store, from_heartbeat=True)
            return True
        finally:
            self._lock.release()

    def abort_collectives(self, store=None, from_heartbeat: bool = False) -> None:
        """Makes every pending collective of this rank fail now, so that its peers notice too.

        NCCL: ``abort()`` of every group (``ncclCommAbort``, safe from another thread). gloo:
        ``abort()`` does not close its TCP pairs, so the connections to job hosts are shut down
        (:func:`~megatron_moevement.runtime.connections.sever_connections`); on the training
        thread the groups are aborted first as well. ``from_heartbeat``: called by the heartbeat
        thread while the training thread may be inside a collective.
        """
        if not dist.is_initialized():
            return
        gloo = dist.get_backend() == "gloo"
        if not (gloo and from_heartbeat):
            for group in list(dist.distributed_c10d._world.pg_map.keys()):
                try:
                    group.abort()
                except Exception as exc:  # pragma: no cover - best effort
                    logger.debug("abort of a process group failed: %s", exc)
        if gloo:
            n = sever_connections([int(os.environ["MASTER_PORT"])], self.job_hosts(store))
            logger.debug("severed %d gloo connections", n)

    def wait_for_generation(self, after: int, wait_s: float = 120.0) -> dict:
        """The agent's announcement of the first generation after ``after``."""
        deadline = time.monotonic() + wait_s
        while True:
            key = StoreKeys.generation(after + 1)
            if _has(self.store, key):
                info = _get_json(self.store, key)
                # Skip generations that were superseded before this rank got here.
                while _has(self.store, StoreKeys.generation(info["generation"] + 1)):
                    info = _get_json(self.store, StoreKeys.generation(info["generation"] + 1))
                return info
            self._keep_waiting(
                deadline,
                f"no new process-group generation after {after} was announced within "
                f"{wait_s:.0f}s: the agent saw no failed or silent rank (a collective timeout "
                "without a crash or a missed heartbeat?). Restart the job from the durable tier.",
            )

    def _keep_waiting(self, deadline: float, timed_out: str) -> None:
        """One poll of a wait on the store: raises if the agent gave up or ``deadline`` passed
        (with ``timed_out`` as the message), else sleeps one poll period."""
        if _has(self.store, StoreKeys.JOB_FAILED):
            raise RecoveryError(
                f"the job's agent gave up: {self.store.get(StoreKeys.JOB_FAILED).decode()}"
            )
        if time.monotonic() > deadline:
            raise RecoveryError(timed_out)
        time.sleep(POLL_S)


class Heartbeat:
    """A daemon thread that proves this rank is alive and relays the coordinator's aborts.

    Every ``interval_s`` it rewrites ``hb/<rank>`` in the job's store (on a connection of its
    own, so it never waits behind the main thread's store calls) and checks whether the
    coordinator declared the rank's generation failed (:meth:`ElasticContext.abort_if_requested`);
    every :data:`STUCK_CHECK_S` it checks whether the main thread waits in a superseded generation
    (:meth:`ElasticContext.break_superseded_wait`).
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
        self._store.set(StoreKeys.heartbeat(self.ctx.rank), json.dumps(value))

    def _run(self) -> None:
        next_beat = time.monotonic() + self.interval_s
        while not self._stop.wait(min(self.interval_s, STUCK_CHECK_S)):
            try:
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + self.interval_s
                    self._beat()
                    self.ctx.abort_if_requested(self._store)
                self.ctx.break_superseded_wait(self._store, now)
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
