"""A warm spare: a spare process runs one throwaway training iteration before it waits.

A freshly started process pays once for what a running rank has long since paid: growing the
allocator's heap to a training step's working set, first calls through the dispatcher and
Megatron-Core's lazily taken code paths, kernel selection for the step's shapes (and, on a GPU,
context and library handles). A spare that takes a failed rank's place pays it on the recovery's
critical path: measured on the CPU harness (PP4, one rank in scope), a cold spare's first replayed
iteration took 2.8x its last one, and its rebuild about twice a warm one's.

:func:`warm_up_spare` runs a caller's throwaway iteration in a private single-process group
while the spare has nothing else to do, then removes every trace of it from the process-global
state that a later build reads (the default process group, Megatron's parallel state and its MoE
logging tracker), so that the spare's real build is exactly what it would have been cold. It runs
in a thread of its own at the lowest CPU priority: a spare started beside training (the refill
after a recovery) must not slow the ranks that train or replay.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from datetime import timedelta
from typing import Callable

from megatron_moevement.logging_utils import get_logger
from megatron_moevement.runtime.cpu_compat import device_mode_for_thread

logger = get_logger(__name__)

SPARE_ENV = "MOEVEMENT_SPARE"
"""Environment variable the launchers set to ``"1"`` in a spare process."""


def is_spare_process() -> bool:
    """True in a process the launcher started as a spare (``MOEVEMENT_SPARE=1``)."""
    return os.environ.get(SPARE_ENV) == "1"


def warm_up_spare(iteration: Callable[[], None]) -> float | None:
    """Runs ``iteration`` (a throwaway build and training step of the job's per-rank shapes) in a
    private single-process gloo group, then tears everything it set up down again.

    A failure of the warm-up costs only its benefit: it is logged and the spare goes on cold.

    Args:
        iteration: Builds a model on the current (single-process) group and trains one
            iteration of it; must not keep references to what it built.

    Returns:
        The seconds the warm-up took, or ``None`` when it failed or a process group was
        already initialized (then it is skipped: it must not replace the job's group).
    """
    import torch.distributed as dist

    if dist.is_initialized():
        logger.warning("warm spare: a process group is already initialized; not warming up")
        return None
    seconds: list[float | None] = []

    def run() -> None:
        seconds.append(_warm_up_at_low_priority(iteration))

    # Its own thread at the lowest CPU priority: a spare started beside training (the refill
    # after a recovery, on the failed rank's node) must not take cores from the ranks that
    # train or replay. While the job waits for this spare nothing else competes, so it runs at
    # full speed then. The main thread only waits.
    worker = threading.Thread(target=run, name="moevement-spare-warm-up", daemon=True)
    worker.start()
    worker.join()
    return seconds[0] if seconds else None


def _warm_up_at_low_priority(iteration: Callable[[], None]) -> float | None:
    import torch.distributed as dist

    _lower_this_threads_priority()
    started = time.perf_counter()
    try:
        dist.init_process_group(
            backend="gloo",
            store=dist.HashStore(),
            rank=0,
            world_size=1,
            timeout=timedelta(seconds=60),
        )
        with device_mode_for_thread():
            iteration()
    # The warm-up is an optimization: a cold spare still works. SystemExit too (Megatron's
    # argument parser exits on a bad value), which would otherwise end the thread unlogged.
    except (Exception, SystemExit) as exc:
        logger.warning(
            "warm spare: warm-up failed (%s: %s); the spare starts cold", type(exc).__name__, exc
        )
        return None
    finally:
        _forget_warm_up()
    seconds = time.perf_counter() - started
    logger.info("warm spare: warmed up in %.3f s", seconds)
    return seconds


def _lower_this_threads_priority() -> None:
    """Nice 19 for the calling thread only (Linux: a thread id is a ``PRIO_PROCESS`` target;
    threads and processes it starts inherit it). Elsewhere the warm-up runs at normal priority."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError as exc:  # pragma: no cover - a sandbox may refuse it
        logger.debug("warm spare: could not lower the warm-up's priority (%s)", exc)


def _forget_warm_up() -> None:
    """Removes the warm-up's process-global state: its process group, Megatron's parallel state
    (groups and global buffers) and the MoE layer-wise logging tracker, which Megatron-Core keeps
    across builds and sizes by the first model's layer count."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    get_moe_layer_wise_logging_tracker().clear()
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()
