"""The agent's side of the elastic protocol: the process table and the job coordinator.

The job's agent (the local :class:`~megatron_moevement.launch.local.ElasticAgent`, or the SLURM
task agents of :mod:`megatron_moevement.megatron.elastic`) hosts the job's store, so it outlives
any worker, and runs a :class:`JobCoordinator` over a :class:`ProcessTable`: when a worker dies
or falls silent it assigns a spare to the failed rank and announces the next process-group
generation (the store keys are in :mod:`megatron_moevement.recovery.protocol`). A job that cannot
go on (no spare left, a worker that cannot take over a rank, a timeout) ends with
:class:`JobFailed` or :class:`JobTimeout`.
"""

from __future__ import annotations

import json
import time
from typing import Iterable, Protocol

from megatron_moevement.logging_utils import get_logger
from megatron_moevement.recovery.protocol import POLL_S, StoreKeys, _has

logger = get_logger(__name__)


class JobTimeout(RuntimeError):
    """A job did not finish within its time limit (its processes were killed)."""


class JobFailed(RuntimeError):
    """A process of a job exited with a non-zero code and the job cannot go on."""


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
        batch_window_s: After a first failure, how long to wait for simultaneous ones so that
            they are recovered in one generation. Default 0: no fixed wait; a failure noticed
            later announces the next generation, which widens the recovery under way (ranks that
            have not all joined the superseded one leave it, see
            ``ElasticContext.init_process_group``).
        elastic: Whether the workers can take over a rank of a running job (they run a
            :class:`RecoveryDriver` or Megatron-LM's loop in an elastic session). If not, a
            failure ends the job at once: every rank is killed by pid and ``job/failed`` says why.
        refill_spares: Whenever a spare takes over a rank, start a new one
            (``table.start_spare(failed_proc)``, which returns its process id, or None where no
            healthy host can run it), so that the job survives more failures than it had
            spares.
    """

    BEAT_CHECK_S = 0.1
    """How often heartbeats are read."""

    def __init__(
        self,
        store,
        world_size: int,
        spares: Iterable[int],
        batch_window_s: float = 0.0,
        elastic: bool = True,
        refill_spares: bool = False,
    ) -> None:
        self.store = store
        self.world_size = world_size
        self.batch_window_s = batch_window_s
        self.elastic = elastic
        self.refill_spares = refill_spares
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
                if self.batch_window_s:
                    time.sleep(self.batch_window_s)  # gather simultaneous failures in one batch
                self._replace(table, self._dead(table))
                continue
            if now >= next_beat_check:
                next_beat_check = now + self.BEAT_CHECK_S
                silent = self._silent(table, now)
                if silent:
                    self._abort(table, silent)
                    continue
            if all(table.returncode(p) == 0 for p in self.rank_to_proc.values()):
                self.store.set(StoreKeys.JOB_DONE, "1")
                return
            time.sleep(POLL_S)

    def fail(self, reason: str) -> None:
        """Marks the job failed (spares and waiting ranks leave)."""
        self.store.set(StoreKeys.JOB_FAILED, reason)

    # ------------------------------------------------------------------ failures
    def _dead(self, table: ProcessTable) -> list[int]:
        return [r for r, p in self.rank_to_proc.items() if table.returncode(p) not in (None, 0)]

    def _stable(self, generation: int) -> bool:
        if generation == 0:
            return True
        key = StoreKeys.stable(generation)
        if not _has(self.store, key):
            return False
        return int(self.store.add(key, 0)) >= len(self.rank_to_proc)

    def _replace(self, table: ProcessTable, dead: list[int]) -> None:

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
            if self.refill_spares and hasattr(table, "start_spare"):
                # The spare pool stays full: the new spare waits for the next failure.
                refill = table.start_spare(proc)
                if refill is not None:
                    entry["refill"] = refill
                    self.free_spares.append(refill)
            self.failures.append(entry)
            self.rank_to_proc[rank] = spare
            if rank in self._beats:  # the replacement's first beat changes it: time from now
                self._beats[rank] = (self._beats[rank][0], now)
            self.store.set(
                StoreKeys.spare(spare), json.dumps(dict(rank=rank, generation=self.generation))
            )
        self.failures[-1]["failed"] = failed
        self.store.set(
            StoreKeys.generation(self.generation),
            json.dumps(dict(generation=self.generation, failed=failed)),
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
                if not _has(self.store, StoreKeys.heartbeat(rank)):
                    continue  # not started: a hang before the first beat is init's timeout's job
                self._known.add(rank)
            watched.append(rank)
        if not watched:
            return []
        values = self.store.multi_get([StoreKeys.heartbeat(r) for r in watched])
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
            StoreKeys.abort(self.generation),
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
