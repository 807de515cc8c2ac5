"""Where snapshot time goes: seconds per stage, on the training thread and in the background.

Every stage of the snapshot path is timed here and marked as a ``torch.profiler`` range of the
same name, so a trace and the overhead benchmark tell the same story:

* foreground (the training thread waits): ``after_step`` (all of
  ``MoEvementStrategy.after_optimizer_step``: bookkeeping, the slot cut, queueing the copy and
  its replication), ``capture`` (inside it: building the slot and waiting for the previous copy
  if it has not finished) and ``wait_for_copies`` (inside the wrapped ``optimizer.step``, before
  the step mutates state a copy still reads);
* background: ``copy`` (device/host to host buffer), ``checksum`` and ``replication`` (the
  exchange of a finished slot with the peers, after it is sealed);
* one-time: ``first_touch``, faulting in the pages of a host buffer allocated for a slot (a
  zero-fill on the copy thread before its first copy). Fresh host memory is faulted in page by
  page on its first write, which on the 2-core harness made a copy into it ~12x slower than the
  same copy into a reused buffer (page faults contend with training's own allocations); every
  buffer pays it once, so it is reported apart and not charged as a recurring cost.

The training thread's *stall* is ``after_step + wait_for_copies`` (``capture`` is part of
``after_step``). Background time costs training only where no core or copy engine is free for
it; :func:`host_has_idle_core` says whether this host has one.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Dict, Iterator

from torch.profiler import record_function

FOREGROUND_STAGES = ("after_step", "capture", "wait_for_copies")
"""Stages on the training thread (``capture`` is nested in ``after_step``)."""

BACKGROUND_STAGES = ("copy", "checksum", "replication")
"""Recurring stages on the copy and replication threads."""

ONE_TIME_STAGES = ("first_touch",)
"""Background stages paid once per host buffer (not part of ``background``)."""

STALL_STAGES = ("after_step", "wait_for_copies")
"""The foreground stages whose sum is the training thread's stall (no double counting)."""

PROFILER_RANGES = {
    "after_step": "moevement.after_optimizer_step",
    "capture": "moevement.snapshot.capture",
    "wait_for_copies": "moevement.snapshot.wait_for_copies",
    "copy": "moevement.snapshot.copy",
    "first_touch": "moevement.snapshot.first_touch",
    "checksum": "moevement.snapshot.checksum",
    "replication": "moevement.replication.exchange",
}
"""``torch.profiler`` range name of each stage."""


class StageTimes:
    """Thread-safe running totals of wall seconds per snapshot stage (one per strategy)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: Dict[str, float] = dict.fromkeys(PROFILER_RANGES, 0.0)
        self._calls: Dict[str, int] = dict.fromkeys(PROFILER_RANGES, 0)

    @contextmanager
    def measure(self, stage: str) -> Iterator[None]:
        """Times the block as ``stage`` and marks it as a profiler range."""
        if stage not in self._seconds:
            raise ValueError(f"unknown snapshot stage {stage!r}; stages: {sorted(self._seconds)}")
        with record_function(PROFILER_RANGES[stage]):
            start = time.perf_counter()
            try:
                yield
            finally:
                elapsed = time.perf_counter() - start
                with self._lock:
                    self._seconds[stage] += elapsed
                    self._calls[stage] += 1

    def calls(self, stage: str) -> int:
        """How many times ``stage`` was measured (``after_step``: the steps snapshotted)."""
        with self._lock:
            return self._calls[stage]

    def totals(self) -> Dict[str, float]:
        """Seconds spent in each stage so far, plus ``stall`` (what the training thread waited)
        and ``background`` (the recurring background stages)."""
        with self._lock:
            out = dict(self._seconds)
        out["stall"] = sum(out[s] for s in STALL_STAGES)
        out["background"] = sum(out[s] for s in BACKGROUND_STAGES)
        return out


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not every OS has affinity masks
        return os.cpu_count() or 1


def host_has_idle_core(local_ranks: int, threads_per_rank: int) -> bool:
    """Whether the training ranks of this host leave a core free for the snapshot threads.

    Where they do not, every second of background copy, checksum and replication work is a
    second taken from training (no copy engine does it beside the compute).
    """
    return local_ranks * max(1, threads_per_rank) < usable_cores()
