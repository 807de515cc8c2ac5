"""Local multi-process launching: one process per rank (gloo), always cleaned up by pid.

Every process is started in its own session so that it and anything it spawns can be killed as a
group. :class:`LocalJob` is a context manager: leaving it (normally, on an exception, or on a
timeout) kills every process it started that is still alive. :class:`ElasticAgent` supervises a
:class:`LocalJob` whose ranks can be lost: it hosts the job's store and runs a
:class:`~megatron_moevement.recovery.coordinator.JobCoordinator` on it, so spares take failed
ranks (the local counterpart of the SLURM task agents in :mod:`megatron_moevement.megatron.elastic`).
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from megatron_moevement.logging_utils import get_logger
from megatron_moevement.recovery.coordinator import JobFailed, JobTimeout

logger = get_logger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalJob:
    """A set of local worker processes running ``python -m <module> <args>``.

    Args:
        nprocs: Number of processes; process ``i`` gets ``LOCAL_PROC_ID=i``. The first
            ``nprocs - spares`` get ``RANK=i``; the last ``spares`` are spares (``RANK`` unset,
            ``MOEVEMENT_SPARE=1``) that wait to take a failed rank.
        module: Python module run with ``-m``.
        args: Arguments of the module.
        world_size: ``WORLD_SIZE`` of the training job (defaults to ``nprocs - spares``).
        spares: Number of spare processes.
        log_dir: Where each process's stdout/stderr goes (``proc<i>.log``); a temporary folder
            of the caller's choice. ``None`` inherits the parent's streams.
        env: Extra environment variables.
    """

    nprocs: int
    module: str
    args: list[str] = field(default_factory=list)
    world_size: int | None = None
    spares: int = 0
    log_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list, init=False)
    port: int = field(default=0, init=False)
    _base_env: dict = field(default_factory=dict, init=False, repr=False)

    def start(self) -> "LocalJob":
        if self.procs:
            raise RuntimeError("LocalJob already started")
        world = self.world_size if self.world_size is not None else self.nprocs - self.spares
        self.port = self.port or free_port()
        base = dict(os.environ)
        base.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(self.port),
            WORLD_SIZE=str(world),
            OMP_NUM_THREADS=base.get("OMP_NUM_THREADS", "1"),
            PYTHONUNBUFFERED="1",
        )
        base.update(self.env)
        if self.log_dir is not None:
            Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        self._base_env = base
        for i in range(self.nprocs):
            self._spawn(i, spare=i >= self.nprocs - self.spares)
        logger.debug("started %d processes: pids %s", self.nprocs, self.pids)
        return self

    def _spawn(self, i: int, spare: bool) -> subprocess.Popen:
        env = dict(self._base_env, LOCAL_PROC_ID=str(i))
        if not spare:
            env["RANK"] = str(i)
        else:
            env.pop("RANK", None)
            env["MOEVEMENT_SPARE"] = "1"
        out = None
        if self.log_dir is not None:
            out = open(Path(self.log_dir) / f"proc{i}.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT if out is not None else None,
            start_new_session=True,
        )
        if out is not None:
            out.close()
        self.procs.append(proc)
        return proc

    def start_spare(self) -> int:
        """Starts one more spare process (refilling the spare pool); returns its index."""
        if not self.procs:
            raise RuntimeError("LocalJob not started")
        index = len(self.procs)
        proc = self._spawn(index, spare=True)
        logger.info("started spare process %d (pid %d)", index, proc.pid)
        return index

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        """Sends ``sig`` to process ``index`` (by pid)."""
        proc = self.procs[index]
        if proc.poll() is None:
            os.kill(proc.pid, sig)

    def wait(self, timeout: float) -> list[int]:
        """Waits for every process; returns exit codes. Kills all and raises on timeout."""
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            remaining = deadline - time.monotonic()
            try:
                proc.wait(timeout=max(remaining, 0.01))
            except subprocess.TimeoutExpired:
                self.terminate()
                raise JobTimeout(
                    f"local job {self.module} did not finish within {timeout:.0f}s; "
                    f"killed pids {self.pids}" + self._log_hint()
                ) from None
        return [p.returncode for p in self.procs]

    def check(self, timeout: float, allowed_failures: set[int] | None = None) -> list[int]:
        """Like :meth:`wait`, then raises :class:`JobFailed` if a process not in
        ``allowed_failures`` (indices, e.g. the ones the test killed) exited non-zero."""
        codes = self.wait(timeout)
        allowed = allowed_failures or set()
        bad = [i for i, c in enumerate(codes) if c != 0 and i not in allowed]
        if bad:
            raise JobFailed(
                f"processes {bad} of {self.module} exited with codes "
                f"{[codes[i] for i in bad]}" + self._log_hint(bad)
            )
        return codes

    def terminate(self) -> None:
        """Kills every process of the job that is still alive, and its process group."""
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
                logger.error("process %d did not die after SIGKILL", proc.pid)

    def _log_hint(self, indices: list[int] | None = None) -> str:
        if self.log_dir is None:
            return ""
        lines = []
        for i in indices if indices is not None else range(len(self.procs)):
            path = Path(self.log_dir) / f"proc{i}.log"
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-15:]
                lines.append(f"\n--- proc{i} ({path}) ---\n" + "\n".join(tail))
        return "".join(lines)

    def __enter__(self) -> "LocalJob":
        return self.start() if not self.procs else self

    def __exit__(self, *exc) -> None:
        self.terminate()


class _LocalProcessTable:
    """A :class:`LocalJob`'s processes as a :class:`~megatron_moevement.recovery.driver.ProcessTable`."""

    def __init__(self, job: LocalJob) -> None:
        self.job = job

    def returncode(self, proc: int) -> int | None:
        return self.job.procs[proc].poll()

    def pid(self, proc: int) -> int | None:
        return self.job.procs[proc].pid

    def kill(self, proc: int) -> None:
        self.job.kill(proc, signal.SIGKILL)  # by pid; also ends a stopped process

    def start_spare(self, failed_proc: int) -> int:
        return self.job.start_spare()  # one host: always healthy while the launcher runs

    def log_hint(self, procs: list[int] | None = None) -> str:
        return self.job._log_hint(procs)


class ElasticAgent:
    """Supervises a :class:`LocalJob` that can lose ranks: hosts the job's store and runs a
    :class:`~megatron_moevement.recovery.driver.JobCoordinator` on it, which replaces a dead rank by a
    spare, announces a new process-group generation, and kills (by pid) a rank whose heartbeat
    stopped (see :mod:`megatron_moevement.recovery.driver` for the worker side).

    Store keys: see :class:`~megatron_moevement.recovery.driver.JobCoordinator`.
    """

    def __init__(
        self, job: LocalJob, batch_window_s: float = 0.0, refill_spares: bool = False
    ) -> None:
        import datetime

        import torch.distributed as dist

        self.job = job
        self.batch_window_s = batch_window_s
        self.refill_spares = refill_spares
        """Start a new spare process whenever one takes over a failed rank."""
        job.port = free_port()
        self.store = dist.TCPStore(
            "127.0.0.1",
            job.port,
            is_master=True,
            timeout=datetime.timedelta(seconds=600),
            wait_for_workers=False,
        )
        self.coordinator = None

    def start(self) -> "ElasticAgent":
        from megatron_moevement.recovery.coordinator import JobCoordinator

        job = self.job
        port = job.port
        job.env = dict(job.env, MOEVEMENT_ELASTIC="1")
        job.start()
        # LocalJob.start keeps the port set here: the workers use the agent's store.
        assert job.procs, "job did not start"
        if job.port != port:
            raise RuntimeError("internal: LocalJob must reuse the agent's port")
        world = job.nprocs - job.spares
        self.coordinator = JobCoordinator(
            self.store,
            world,
            range(world, job.nprocs),
            self.batch_window_s,
            refill_spares=self.refill_spares,
        )
        return self

    @property
    def failures(self) -> list[dict]:
        """What failed (see :attr:`~megatron_moevement.recovery.driver.JobCoordinator.failures`)."""
        return self.coordinator.failures if self.coordinator is not None else []

    @property
    def generation(self) -> int:
        return self.coordinator.generation if self.coordinator is not None else 0

    @property
    def rank_to_proc(self) -> dict[int, int]:
        return self.coordinator.rank_to_proc if self.coordinator is not None else {}

    def run(self, timeout: float) -> list[int]:
        """Supervises until every rank exits 0; returns the exit codes of all processes."""
        try:
            self.coordinator.run(_LocalProcessTable(self.job), timeout)
        except (JobFailed, JobTimeout):
            self.job.terminate()
            raise
        for p in self.coordinator.free_spares:
            try:
                self.job.procs[p].wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.job.kill(p)
        return [p.poll() for p in self.job.procs]


def exit_after_success() -> None:
    """Ends a worker process whose job completed (its results are written) without interpreter
    finalization: there, gloo objects still referenced from module state are destroyed with
    joinable threads and abort the process ("terminate called without an active exception",
    SIGABRT) after the work is done, seen about once in ten demo runs on this machine."""

    atexit._run_exitfuncs()  # logging, multiprocessing children, ...: everything but teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
