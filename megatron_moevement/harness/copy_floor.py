"""The floor of background snapshot work on a host: the bare copy and checksum, nothing else.

The overhead benchmark's ``copy_floor`` mode runs training beside a :class:`BareCopyLoad`: after
every optimizer step it copies a fixed number of bytes of the optimizer's own FP32 state (main
parameters and Adam moments, the tensors a sparse snapshot copies most) into one preallocated
host buffer and checksums them, on one background thread, as the snapshot engine does. There is
no window, no schedule, no manifest and no replication. What that costs the training step is
what the memory traffic of the copy alone costs on this host (shared caches and memory
bandwidth, the hypervisor's scheduling of a "free" core): MoEvement moving the same bytes cannot
do better, so it is the limit its ratio is measured against where the arithmetic of an idle core
says 1.000.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

import torch

from megatron_moevement.constants import DEFAULT_CHECKSUM
from megatron_moevement.snapshot.checksum import checksum_spans
from megatron_moevement.state.optim_view import iter_stepped_params


def _state_tensors(optimizer) -> list[torch.Tensor]:
    """The optimizer's FP32 main parameters and tensor state, as flat uint8 views."""
    out = []
    for leaf, p in iter_stepped_params(optimizer):
        state = leaf.optimizer.state.get(p, {})
        for t in [p] + [v for v in state.values() if torch.is_tensor(v) and v.dim()]:
            out.append(t.detach().reshape(-1).view(torch.uint8))
    return out


class BareCopyLoad:
    """Copies ``bytes_per_iteration`` bytes of optimizer state into a host buffer and checksums
    them on a background thread after every optimizer step.

    Successive iterations walk through the state (wrapping around), so, like a sparse window,
    each copies different tensors. The previous iteration's copy is waited for before the next
    one starts; that wait is the training thread's only stall.

    Args:
        optimizer: The Megatron optimizer whose state is read (never written).
        bytes_per_iteration: Bytes to copy per iteration (rounded to whole tensors).
        algorithm: Checksum algorithm, as the snapshot engine's.
    """

    def __init__(
        self, optimizer, bytes_per_iteration: int, algorithm: str = DEFAULT_CHECKSUM
    ) -> None:
        if bytes_per_iteration < 0:
            raise ValueError(f"bytes_per_iteration must be >= 0, got {bytes_per_iteration}")
        self._sources = [t for t in _state_tensors(optimizer) if t.numel()]
        if not self._sources and bytes_per_iteration:
            raise ValueError(
                "BareCopyLoad: the optimizer holds no state yet. Fix: build it after the first "
                "optimizer step."
            )
        largest = max((t.numel() for t in self._sources), default=0)
        self.bytes_per_iteration = int(bytes_per_iteration)
        # One tensor past the target at most, so the buffer never grows on the hot path.
        self._buffer = torch.empty(self.bytes_per_iteration + largest, dtype=torch.uint8)
        self._buffer.zero_()  # first touch now, not in a timed iteration
        self._algorithm = algorithm
        self._cursor = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="copy-floor")
        self._pending: Optional[Future] = None
        self.stall_s = 0.0
        self.background_s = 0.0
        self.bytes_copied = 0

    def after_optimizer_step(self) -> int:
        """Waits for the previous copy, then starts this iteration's; returns its bytes."""
        start = time.perf_counter()
        self._wait()
        self.stall_s += time.perf_counter() - start
        if not self.bytes_per_iteration:
            return 0
        picked, total = [], 0
        while total < self.bytes_per_iteration:
            t = self._sources[self._cursor]
            self._cursor = (self._cursor + 1) % len(self._sources)
            picked.append(t)
            total += t.numel()
        self._pending = self._executor.submit(self._copy, picked)
        self.bytes_copied += total
        return total

    def _copy(self, picked: list[torch.Tensor]) -> None:
        start = time.perf_counter()
        spans, offset = [], 0
        for t in picked:
            self._buffer[offset : offset + t.numel()].copy_(t)
            spans.append((offset, t.numel()))
            offset += t.numel()
        checksum_spans(self._buffer, spans, self._algorithm)
        self.background_s += time.perf_counter() - start

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def shutdown(self) -> None:
        """Waits for the last copy and stops the thread."""
        self._wait()
        self._executor.shutdown(wait=True)
