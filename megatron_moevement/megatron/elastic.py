"""Per-task elastic agent for SLURM jobs: spares that wait in the rendezvous and take over ranks.

The SLURM templates start one task per GPU on every node of the allocation, training nodes *and*
spare nodes, each as ``python -m megatron_moevement.megatron.elastic [options] -- WORKER...``.
This agent is the multi-node counterpart of the local
:class:`~megatron_moevement.harness.launcher.ElasticAgent` and speaks the same store protocol
(:class:`~megatron_moevement.recovery.driver.JobCoordinator`), so a spare task joins exactly like a local
spare process:

* task ``t`` (``SLURM_PROCID``) below ``WORLD_SIZE`` runs ``WORKER`` as rank ``t``; the others are
  spares: their worker gets ``MOEVEMENT_SPARE=1`` and ``LOCAL_PROC_ID=t`` and waits in the
  rendezvous (:meth:`~megatron_moevement.recovery.driver.ElasticContext.from_env`) until the coordinator
  assigns it a failed rank, then joins the next process-group generation and recovers;
* task 0 also hosts the job's ``TCPStore`` on ``MASTER_ADDR:MASTER_PORT`` and runs the
  :class:`~megatron_moevement.recovery.driver.JobCoordinator` (in a thread). Its children see it as any
  other store; workers that initialize ``torch.distributed`` with ``env://`` connect to it as
  clients (``TORCHELASTIC_USE_AGENT_STORE=True``, as under torchrun);
* every agent reports its worker's exit status to the coordinator (store queue ``tasks/exits``),
  kills its worker by pid when the coordinator asks (``kill/<p>``: a rank whose heartbeat
  stopped), and stays until the job ends, so that ``srun``'s status is the job's: 0 when every
  rank finished (``job/done``), 1 otherwise (``job/failed``);
* the spare pool is refilled: when a spare takes over a failed rank, the coordinator asks the
  failed task's agent (alive, since it reported the exit: its node is healthy) to start a new
  spare worker there (``respawn/<t>``), whose process id is ``t + k * SLURM_NTASKS`` for the
  task's k-th worker (``--no-refill-spares`` turns this off).

With ``--no-elastic`` (workers that cannot take over a rank of a running job, such as Megatron-LM's
``pretrain_gpt.py`` with a baseline strategy; with ``--ckpt-strategy moevement`` it recovers in
memory, :mod:`megatron_moevement.megatron.inloop`), spare tasks start no worker and the
coordinator ends the job on the first failure, killing every worker by pid, instead of leaving
the survivors blocked until their collective timeout.

The store host (task 0's node) is a single point of failure, as the master of torchrun's c10d
rendezvous is.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import List, Optional, Sequence

from megatron_moevement.argtypes import POSITIVE_FLOAT
from megatron_moevement.logging_utils import configure_logging, get_logger
from megatron_moevement.recovery.protocol import StoreKeys

__all__ = ["TaskAgent", "main"]

MODULE = "megatron_moevement.megatron.elastic"
logger = get_logger(MODULE)

EXITS_QUEUE = "tasks/exits"
"""Store queue of ``{"task": t, "code": c}`` events (one per worker exit)."""
_POLL_S = 0.1


class _StoreProcessTable:
    """The job's tasks as the coordinator sees them through the store (a
    :class:`~megatron_moevement.recovery.driver.ProcessTable`)."""

    def __init__(
        self, store, log_dir: Optional[Path], world_size: int, ntasks: Optional[int] = None
    ) -> None:
        self.store = store
        self.log_dir = log_dir
        self.world_size = world_size
        self.ntasks = ntasks if ntasks is not None else world_size
        """Process ids are ``task + k * ntasks`` for the k-th worker a task's agent started."""
        self.codes: dict[int, int] = {}
        self._pids: dict[int, int] = {}
        self._last_drain = 0.0

    def _drain(self) -> None:
        now = time.monotonic()
        if now - self._last_drain < 0.02:
            return
        self._last_drain = now
        while self.store.queue_len(EXITS_QUEUE) > 0:
            event = json.loads(self.store.queue_pop(EXITS_QUEUE, block=False).decode())
            self.codes[int(event.get("proc", event["task"]))] = int(event["code"])

    def returncode(self, proc: int) -> Optional[int]:
        self._drain()
        return self.codes.get(proc)

    def pid(self, proc: int) -> Optional[int]:
        if proc not in self._pids and self.store.check([StoreKeys.task(proc)]):
            self._pids[proc] = json.loads(self.store.get(StoreKeys.task(proc)).decode()).get("pid")
        return self._pids.get(proc)

    def kill(self, proc: int) -> None:
        self.store.set(f"kill/{proc}", "1")

    def start_spare(self, failed_proc: int) -> Optional[int]:
        """Asks the agent of ``failed_proc``'s task to start a new spare worker. Its agent
        reported the exit, so it and its node are alive; the new worker's process id is the next
        incarnation of that task."""
        if self.codes.get(failed_proc) is None:
            return None  # no agent reported it: its node may be gone
        task = failed_proc % self.ntasks
        new = failed_proc + self.ntasks
        self.store.set(respawn_key(task), str(new))
        return new

    def log_hint(self, procs: Optional[List[int]] = None) -> str:
        if self.log_dir is None:
            return ""
        lines = []
        for proc in procs if procs is not None else sorted(self.codes):
            task = proc % self.ntasks
            path = self.log_dir / log_name(task, self.world_size)
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-15:]
                lines.append(f"\n--- task {task} ({path}) ---\n" + "\n".join(tail))
        return "".join(lines)


def respawn_key(task: int) -> str:
    """``<proc id>``: the coordinator asks ``task``'s agent to start a new spare worker."""
    return f"respawn/{task}"


def log_name(task: int, world_size: int) -> str:
    """The per-task log file name the templates use: ``rank<t>.log``, or ``spare<i>.log``."""
    return f"rank{task}.log" if task < world_size else f"spare{task - world_size}.log"


class TaskAgent:
    """One SLURM task's agent (see the module docstring).

    Args:
        command: The worker command line.
        task: This task's id (``SLURM_PROCID``).
        ntasks: Number of tasks (``SLURM_NTASKS``): ranks plus spares.
        world_size: Number of ranks (``WORLD_SIZE``).
        elastic: Whether workers can take over ranks of a running job.
        timeout_s: Limit of the whole job (the coordinator ends it after that).
        log_dir: Where the per-task logs are (for error messages of the coordinator).
        refill_spares: When a spare takes over a failed rank, the agent of the failed task (its
            node is healthy: it reported the exit) starts a new spare worker.
    """

    def __init__(
        self,
        command: Sequence[str],
        task: int,
        ntasks: int,
        world_size: int,
        elastic: bool = True,
        timeout_s: float = 7 * 24 * 3600.0,
        log_dir: Optional[Path] = None,
        refill_spares: bool = True,
    ) -> None:
        if not command:
            raise ValueError("no worker command given. Fix: pass it after --.")
        if not 0 < world_size <= ntasks:
            raise ValueError(
                f"WORLD_SIZE={world_size} does not fit SLURM_NTASKS={ntasks}. Fix: run one task "
                "per rank plus the spare tasks."
            )
        if not 0 <= task < ntasks:
            raise ValueError(f"SLURM_PROCID={task} is not below SLURM_NTASKS={ntasks}")
        self.command = list(command)
        self.task = task
        self.ntasks = ntasks
        self.world_size = world_size
        self.elastic = elastic
        self.timeout_s = timeout_s
        self.log_dir = log_dir
        self.refill_spares = refill_spares
        self.is_spare = task >= world_size
        self.proc = task
        """The process id of this task's current worker (``task + k * ntasks``)."""
        self.store = None
        self.child: Optional[subprocess.Popen] = None
        self.coordinator_error: Optional[BaseException] = None
        self._coordinator: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ set-up
    def _connect(self) -> None:
        import torch.distributed as dist

        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        port = int(os.environ["MASTER_PORT"])
        timeout = timedelta(seconds=600)
        if self.task == 0:
            self.store = dist.TCPStore(
                host, port, is_master=True, timeout=timeout, wait_for_workers=False
            )
        else:
            self.store = dist.TCPStore(
                host, port, is_master=False, timeout=timeout, wait_for_workers=False
            )

    def child_env(self) -> dict:
        """The worker's environment for this task's role."""
        env = dict(os.environ)
        env.update(
            LOCAL_PROC_ID=str(self.proc),
            LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
            WORLD_SIZE=str(self.world_size),
            TORCHELASTIC_USE_AGENT_STORE="True",
        )
        if self.elastic:
            env["MOEVEMENT_ELASTIC"] = "1"
        if self.is_spare:
            env.pop("RANK", None)
            env["MOEVEMENT_SPARE"] = "1"
        else:
            env["RANK"] = str(self.task)
            env.pop("MOEVEMENT_SPARE", None)
        return env

    def _start_coordinator(self) -> None:
        from megatron_moevement.recovery.coordinator import JobCoordinator

        store = self.store.clone()
        table = _StoreProcessTable(store, self.log_dir, self.world_size, self.ntasks)
        coordinator = JobCoordinator(
            store,
            self.world_size,
            range(self.world_size, self.ntasks),
            elastic=self.elastic,
            refill_spares=self.elastic and self.refill_spares,
        )
        self.coordinator = coordinator

        def run() -> None:
            try:
                coordinator.run(table, self.timeout_s)
                logger.info(
                    "coordinator: every rank finished; failures: %s", coordinator.failures or "none"
                )
            except BaseException as exc:  # JobFailed/JobTimeout: job/failed is set already
                self.coordinator_error = exc
                logger.error("coordinator: %s", exc)
                if not store.check([StoreKeys.JOB_FAILED]):
                    store.set(StoreKeys.JOB_FAILED, str(exc).splitlines()[0])

        self._coordinator = threading.Thread(target=run, name="moevement-coordinator", daemon=True)
        self._coordinator.start()

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        """Runs the task; returns its exit status (0 when the job completed)."""
        self._connect()
        if self.task == 0:
            self._start_coordinator()
        role = f"spare {self.task - self.world_size}" if self.is_spare else f"rank {self.task}"
        if self.is_spare and not self.elastic:
            logger.info(
                "task %d (%s) reserved; the workers cannot take over ranks, so it starts "
                "no worker and waits for the job to end",
                self.task,
                role,
            )
            self.store.set(
                StoreKeys.task(self.task),
                json.dumps(dict(host=socket.gethostname(), pid=None, role="spare")),
            )
        else:
            self._start_child()
        reported = self.child is None
        try:
            while True:
                if not reported and self.child.poll() is not None:
                    code = self.child.returncode
                    self._report_exit(code)
                    reported = True
                    logger.info("task %d: worker exited with status %d", self.task, code)
                if reported and self.child is not None and self._respawn_requested():
                    self.is_spare = True  # the new worker waits for the next failed rank
                    self._start_child()
                    reported = False
                if (
                    self.child is not None
                    and self.child.poll() is None
                    and self.store.check([f"kill/{self.proc}"])
                ):
                    logger.warning(
                        "task %d: the coordinator declared the worker (pid %d) "
                        "failed; killing it",
                        self.task,
                        self.child.pid,
                    )
                    os.kill(self.child.pid, signal.SIGKILL)
                if self.store.check([StoreKeys.JOB_DONE]) or self.store.check(
                    [StoreKeys.JOB_FAILED]
                ):
                    break
                time.sleep(_POLL_S)
            done = self.store.check([StoreKeys.JOB_DONE])
            self._finish_child(graceful=done)
            if not reported:
                self._report_exit(self.child.returncode)
        finally:
            self._finish_child(graceful=False)
        return self._leave(done)

    def _start_child(self) -> None:
        # Same process group as this agent: whoever kills the agent's group kills the worker.
        self.child = subprocess.Popen(self.command, env=self.child_env())
        role = (
            f"spare {self.task - self.world_size}"
            if self.task >= self.world_size
            else (f"rank {self.task}")
        )
        if self.proc != self.task:
            role = f"spare (process {self.proc}, refilling the pool)"
        logger.info(
            "task %d (%s) on %s: worker pid %d",
            self.task,
            role,
            socket.gethostname(),
            self.child.pid,
        )
        self.store.set(
            StoreKeys.task(self.proc),
            json.dumps(
                dict(
                    host=socket.gethostname(),
                    pid=self.child.pid,
                    role="spare" if self.is_spare else "rank",
                )
            ),
        )

    def _report_exit(self, code: int) -> None:
        event = dict(task=self.task, proc=self.proc, code=code)
        self.store.queue_push(EXITS_QUEUE, json.dumps(event))

    def _respawn_requested(self) -> bool:
        """The coordinator asked this task for a new spare worker (after its worker died)."""
        key = respawn_key(self.task)
        if not self.store.check([key]):
            return False
        new = int(self.store.get(key).decode())
        if new <= self.proc:
            return False
        self.proc = new
        return True

    def _finish_child(self, graceful: bool) -> None:
        if self.child is None or self.child.poll() is not None:
            return
        if graceful:  # a spare leaves by itself on job/done; a finishing rank writes its output
            try:
                self.child.wait(timeout=60)
                return
            except subprocess.TimeoutExpired:
                pass
        os.kill(self.child.pid, signal.SIGKILL)
        self.child.wait(timeout=30)

    def _leave(self, done: bool) -> int:
        self.store.add("tasks/left", 1)
        if self.task == 0:
            # Keep the store up until every other agent has seen the end of the job.
            deadline = time.monotonic() + 60
            while (
                int(self.store.add("tasks/left", 0)) < self.ntasks and time.monotonic() < deadline
            ):
                time.sleep(_POLL_S)
            if self._coordinator is not None:
                self._coordinator.join(timeout=10)
            done = done and self.coordinator_error is None
        if done:
            return 0
        if self.store.check([StoreKeys.JOB_FAILED]):
            logger.error(
                "task %d: the job failed: %s",
                self.task,
                self.store.get(StoreKeys.JOB_FAILED).decode(),
            )
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description="Per-task elastic agent of a SLURM MoEvement job (started by the templates).",
    )
    parser.add_argument(
        "--elastic",
        dest="elastic",
        action="store_true",
        default=True,
        help="workers take over failed ranks (they run a RecoveryDriver; default)",
    )
    parser.add_argument(
        "--no-elastic",
        dest="elastic",
        action="store_false",
        help="workers cannot take over ranks: spares start no worker and the "
        "first failure ends the job",
    )
    parser.add_argument(
        "--no-refill-spares",
        dest="refill_spares",
        action="store_false",
        help="do not start a new spare worker on a failed task's healthy node",
    )
    parser.add_argument(
        "--timeout",
        type=POSITIVE_FLOAT,
        default=7 * 24 * 3600.0,
        help="seconds before the coordinator ends the job (default: 7 days)",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="folder of the per-task logs (quoted in error messages)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- WORKER [ARGS...]")
    return parser


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        raise SystemExit(
            f"{MODULE}: environment variable {name} is missing or not an integer. Fix: start "
            "this agent through srun from a rendered MoEvement sbatch template."
        ) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m megatron_moevement.megatron.elastic``."""
    configure_logging()
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        agent = TaskAgent(
            command,
            _env_int("SLURM_PROCID"),
            _env_int("SLURM_NTASKS"),
            _env_int("WORLD_SIZE"),
            args.elastic,
            args.timeout,
            args.log_dir,
            args.refill_spares,
        )
    except ValueError as exc:
        raise SystemExit(f"{MODULE}: {exc}") from None
    return agent.run()


if __name__ == "__main__":
    sys.exit(main())
