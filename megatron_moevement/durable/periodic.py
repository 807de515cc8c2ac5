"""Periodic, non-blocking durable saves driven by ``MoEvementStrategy``.

With ``MoEvementConfig.durable_dir`` and ``durable_interval`` set, after the optimizer step of
every iteration ``t`` with ``(t + 1) % durable_interval == 0`` each rank hands its newest complete
sparse checkpoint (plus the optimizer scalars up to ``t``) to a background thread, which writes it
to ``<durable_dir>/iter_<t:07d>`` (see :mod:`megatron_moevement.durable.files`) straight from the
snapshot host buffers. Training does not wait, with one exception: a window that would reuse the
host buffers of a window still being written waits for that write (logged).

The ranks never communicate for this (no collective may run off the training thread): each writes
its own file set and completion marker, and rank 0's completion thread waits for all markers on
the shared filesystem, then writes ``common.pt``, the index, ``metadata.json`` (the checkpoint is
now loadable with ``dist_checkpointing.load``), the tracker file, and removes older checkpoints
beyond ``keep_last``. A failed save is logged and never stops training.
"""

from __future__ import annotations

import io
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch

from megatron_moevement.durable.backend import (
    BACKEND,
    VERSION,
    clear_active_strategy,
    set_active_strategy,
)
from megatron_moevement.durable.errors import DurableCheckpointError
from megatron_moevement.durable.files import (
    METADATA_FILE,
    TRACKER_FILE,
    is_complete,
    iteration_dir,
    list_iteration_dirs,
    remove_quietly,
    write_bytes_atomic,
    write_json_atomic,
)
from megatron_moevement.durable.payload import RankPayload, payload_from_strategy
from megatron_moevement.durable.writer import wait_for_markers, write_index, write_rank_files
from megatron_moevement.logging_utils import get_logger

logger = get_logger(__name__)


class _Save:
    """One periodic save in flight on this rank."""

    def __init__(self, payload: RankPayload, directory: Path) -> None:
        self.payload = payload
        self.directory = directory
        self.written = threading.Event()
        """Set once this rank's files are on disk (its host buffers may then be reused)."""
        self.futures: list[Future] = []
        self.error: BaseException | None = None


class DurableSaver:
    """Writes a durable checkpoint every ``interval`` iterations in the background.

    Args:
        strategy: The ``MoEvementStrategy`` whose checkpoints to write.
        directory: The durable directory (``MoEvementConfig.durable_dir``).
        interval: Iterations between saves (``MoEvementConfig.durable_interval``).
        run_id: Identifier shared by all ranks of this run (tells this run's markers from stale
            ones).
        keep_last: Complete checkpoints to keep (older ones are removed); ``None`` keeps all.
        completion_timeout_s: How long rank 0 waits for the other ranks' files.
    """

    def __init__(
        self,
        strategy,
        directory: str,
        interval: int,
        run_id: str,
        keep_last: int | None = 2,
        completion_timeout_s: float = 600.0,
    ) -> None:
        self.strategy = strategy
        self.directory = Path(directory)
        self.interval = int(interval)
        self.run_id = run_id
        self.keep_last = keep_last
        self.completion_timeout_s = completion_timeout_s
        self.rank = strategy.rank
        self.world_size = strategy.world_size
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moevement-durable")
        self._finisher = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="moevement-durable-finish")
            if self.rank == 0
            else None
        )
        self._saves: list[_Save] = []
        self._stop = threading.Event()
        self.completed: list[Path] = []
        """Checkpoints this rank saw complete (rank 0: made complete), oldest first."""
        self.errors: list[BaseException] = []
        self.directory.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ training-thread hooks
    def due(self, iteration: int) -> bool:
        return (iteration + 1) % self.interval == 0

    def after_step(self, iteration: int, metadata: dict | None = None) -> _Save | None:
        """Starts a save if ``iteration`` is due; returns at once."""
        self._saves = [s for s in self._saves if not all(f.done() for f in s.futures)]
        if self._stop.is_set() or not self.due(iteration):
            return None
        try:
            payload = payload_from_strategy(
                self.strategy, dict(metadata or {}, run_id=self.run_id), iteration=iteration
            )
        except DurableCheckpointError as exc:
            logger.warning(
                "durable: no save at iteration %d (%s); next at iteration %d",
                iteration,
                exc,
                iteration + self.interval,
            )
            return None
        save = _Save(payload, iteration_dir(self.directory, iteration))
        save.futures.append(self._writer.submit(self._write, save))
        if self._finisher is not None:
            save.futures.append(self._finisher.submit(self._finish, save))
        self._saves.append(save)
        logger.debug(
            "durable: save of iteration %d (window %d) queued",
            iteration,
            payload.checkpoint.window,
        )
        return save

    def before_buffer_reuse(self, window: int) -> None:
        """Blocks until no write still reads host buffers that window ``window`` reuses."""
        for save in self._saves:
            if save.payload.checkpoint.window % 2 != window % 2 or save.written.is_set():
                continue
            t0 = time.perf_counter()
            save.written.wait()
            logger.warning(
                "durable: window %d waited %.2fs for the durable write of iteration %d "
                "(it reuses the host buffers being written); consider a longer "
                "durable_interval or faster storage",
                window,
                time.perf_counter() - t0,
                save.payload.iteration,
            )

    # ------------------------------------------------------------------ background work
    def _write(self, save: _Save) -> None:
        try:
            write_rank_files(save.directory, save.payload)
        except BaseException as exc:
            save.error = exc
            self.errors.append(exc)
            logger.error("durable: rank %d failed to write %s: %s", self.rank, save.directory, exc)
        finally:
            save.written.set()

    def _finish(self, save: _Save) -> None:
        """Rank 0: waits for every rank's files, then completes the checkpoint."""
        from megatron.core.dist_checkpointing.core import CheckpointingConfig
        from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

        payload = save.payload
        try:
            save.written.wait()
            if save.error is not None:
                return
            markers = wait_for_markers(
                save.directory,
                self.world_size,
                dict(
                    iteration=payload.iteration,
                    window=payload.checkpoint.window,
                    run_id=self.run_id,
                ),
                self.completion_timeout_s,
                stop=self._stop,
            )
            common = {
                "iteration": payload.iteration,
                "moevement_durable": dict(
                    window=payload.checkpoint.window,
                    window_start=payload.checkpoint.start_iteration,
                    window_size=payload.checkpoint.window_size,
                ),
            }
            # What Megatron's "torch" common strategy writes, without its rank lookup (this
            # thread must not depend on the process group, which a recovery may tear down).
            buf = io.BytesIO()
            torch.save(common, buf)
            write_bytes_atomic(save.directory / COMMON_STATE_FNAME, buf.getvalue())
            write_index(save.directory, payload, self.world_size, markers)
            # dist_checkpointing's completion marker, last (and atomically).
            write_json_atomic(
                save.directory / METADATA_FILE, asdict(CheckpointingConfig(BACKEND, VERSION))
            )
            write_bytes_atomic(self.directory / TRACKER_FILE, f"{payload.iteration}\n".encode())
            self.completed.append(save.directory)
            logger.info(
                "durable: checkpoint %s complete (%d ranks, window %d, iteration %d)",
                save.directory,
                self.world_size,
                payload.checkpoint.window,
                payload.iteration,
            )
            self._collect_garbage(payload.iteration)
        except BaseException as exc:
            save.error = exc
            self.errors.append(exc)
            logger.error("durable: checkpoint %s not completed: %s", save.directory, exc)

    def _collect_garbage(self, newest: int) -> None:
        if self.keep_last is None:
            return
        older = [(it, p) for it, p in list_iteration_dirs(self.directory) if it < newest]
        complete = [p for _, p in older if is_complete(p)]
        keep = set(complete[-(self.keep_last - 1) :]) if self.keep_last > 1 else set()
        for _, path in older:
            if path not in keep:
                remove_quietly(path)
                logger.debug("durable: removed old checkpoint %s", path)

    # ------------------------------------------------------------------ lifecycle
    def wait(self, timeout: float | None = None) -> None:
        """Blocks until every queued save is written (and, on rank 0, completed)."""
        for save in list(self._saves):
            for fut in save.futures:
                fut.result(timeout)

    def close(self) -> None:
        """Waits for pending saves, then stops the threads."""
        try:
            self.wait()
        finally:
            self._writer.shutdown(wait=True)
            if self._finisher is not None:
                self._finisher.shutdown(wait=True)

    def abandon(self) -> None:
        """Stops starting saves after a failure; writes in progress finish on their own."""
        self._stop.set()
        self._writer.shutdown(wait=False)
        if self._finisher is not None:
            self._finisher.shutdown(wait=False)


class DurableAttachment:
    """A ``MoEvementStrategy``'s link to the durable tier (``strategy.durable``).

    Registers the strategy as the process's active one (what the default ``("moevement", 1)``
    backend saves) and, when ``config.durable_dir`` is set, runs a :class:`DurableSaver`.

    Attributes:
        metadata: Job metadata stored with every durable save (JSON-serializable), e.g.
            ``{"job": {"builder": "module:function", "spec": {...}}}``, which ``moevement-convert``
            needs to rebuild the job.
        saver: The periodic saver, or ``None``.
    """

    def __init__(self, strategy) -> None:
        self.metadata: dict = {}
        self.saver: DurableSaver | None = None
        self._strategy_id = id(strategy)
        set_active_strategy(strategy)
        config = strategy.config
        if config.durable_dir is not None:
            self.saver = DurableSaver(
                strategy, config.durable_dir, config.durable_interval, run_id=_agree_run_id()
            )
            logger.info(
                "durable: saving to %s every %d iterations",
                config.durable_dir,
                config.durable_interval,
            )

    def after_step(self, iteration: int) -> None:
        if self.saver is not None:
            self.saver.after_step(iteration, self.metadata)

    def before_buffer_reuse(self, window: int) -> None:
        if self.saver is not None:
            self.saver.before_buffer_reuse(window)

    def close(self, strategy=None) -> None:
        clear_active_strategy(strategy)
        if self.saver is not None:
            self.saver.close()

    def abandon(self, strategy=None) -> None:
        clear_active_strategy(strategy)
        if self.saver is not None:
            self.saver.abandon()


def _agree_run_id() -> str:
    """A run identifier chosen by rank 0 and shared with all ranks (collective)."""
    import torch.distributed as dist

    box = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def attach_durable(strategy) -> DurableAttachment:
    """Builds ``strategy.durable`` (called by ``MoEvementStrategy.__init__`` on every rank)."""
    return DurableAttachment(strategy)
