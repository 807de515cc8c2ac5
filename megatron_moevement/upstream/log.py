"""Upstream logs: host copies of what a pipeline stage sent, tagged (iteration, microbatch).

:class:`UpstreamLog` holds, per ``(direction, iteration, microbatch)``, a host copy of a tensor
the stage sent: activations downstream (:data:`ACTIVATION`) and input-gradients upstream
(:data:`GRADIENT`). The logging communicator (:mod:`.communicator`) fills it. Copies are
asynchronous on CUDA (pinned buffers, a dedicated stream and an event per entry, like the
snapshot engine) and synchronous on CPU (a clone). Each entry carries a checksum (CRC32C) of its bytes,
computed as soon as they are on the host (at once on CPU; on CUDA once its copy event has
completed); :meth:`UpstreamLog.get` and :meth:`UpstreamLog.verify` check it, so a corrupted
entry is named instead of replayed. The log is bounded: entries older than the
persisted sparse checkpoint are freed (:meth:`UpstreamLog.discard_before`), and exceeding
``max_bytes`` raises a clear error rather than silently dropping what a recovery would need.

This is the data source of scoped recovery: a failed stage replays from its neighbours' logs.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from megatron_moevement.constants import DEFAULT_CHECKSUM
from megatron_moevement.logging_utils import get_logger
from megatron_moevement.snapshot.checksum import checksum

logger = get_logger(__name__)


ACTIVATION = "activation"
"""Tensors a stage sends to the next stage (forward)."""


GRADIENT = "gradient"
"""Input gradients a stage sends to the previous stage (backward)."""


class UpstreamLogError(RuntimeError):
    """An upstream log entry is missing or corrupted, or the log would exceed its memory bound."""


@dataclass
class LogEntry:
    tensor: torch.Tensor
    event: object | None = None
    crc: str | None = None
    """Checksum of the host bytes (``None`` until the copy has completed)."""

    def wait(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        if self.crc is None:
            self.crc = checksum(self.tensor, DEFAULT_CHECKSUM)
        return self.tensor

    def seal_if_ready(self) -> bool:
        """Seals the entry if its copy has completed; returns whether it is sealed."""
        if self.crc is None and (self.event is None or self.event.query()):
            self.wait()
        return self.crc is not None

    def check(self, key: tuple[str, int, int]) -> torch.Tensor:
        if self.crc is None:
            return self.wait()  # sealed just now, from the bytes it is about to return
        tensor = self.tensor
        got = checksum(tensor, DEFAULT_CHECKSUM)
        if got != self.crc:
            direction, iteration, microbatch = key
            raise UpstreamLogError(
                f"upstream log entry {direction} iteration {iteration} microbatch {microbatch} "
                f"is corrupted (checksum expected {self.crc}, got {got}); it cannot feed a scoped "
                "replay — fall back to global rollback"
            )
        return tensor


class UpstreamLog:
    """Host copies of sent tensors, keyed by ``(direction, iteration, microbatch)``.

    Args:
        max_bytes: Upper bound of host memory; ``None`` for no bound.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self._entries: dict[tuple[str, int, int], LogEntry] = {}
        self._unsealed: list[LogEntry] = []
        """Device copies still without a checksum (CUDA only; host copies are sealed at once)."""
        self._lock = threading.Lock()
        self.nbytes = 0
        self._stream = torch.cuda.Stream() if torch.cuda.is_available() else None

    def put(self, direction: str, iteration: int, microbatch: int, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.max_bytes is not None and self.nbytes + nbytes > self.max_bytes:
            raise UpstreamLogError(
                f"upstream log would exceed its bound of {self.max_bytes} bytes at iteration "
                f"{iteration}: free entries older than the persisted sparse checkpoint more "
                "often (shorter window) or raise the bound (MoEvementConfig."
                "host_memory_budget_bytes)"
            )
        if tensor.is_cuda:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                host.copy_(tensor, non_blocking=True)
                tensor.record_stream(self._stream)
                event = torch.cuda.Event()
                event.record(self._stream)
            entry = LogEntry(host, event)
        else:
            entry = LogEntry(tensor.detach().clone())
            entry.wait()  # the checksum of the host copy, now
        with self._lock:
            self._unsealed = [e for e in self._unsealed if not e.seal_if_ready()]
            if entry.crc is None:
                self._unsealed.append(entry)
            old = self._entries.pop((direction, iteration, microbatch), None)
            if old is not None:
                self.nbytes -= old.tensor.numel() * old.tensor.element_size()
            self._entries[(direction, iteration, microbatch)] = entry
            self.nbytes += nbytes

    def get(self, direction: str, iteration: int, microbatch: int) -> torch.Tensor:
        with self._lock:
            entry = self._entries.get((direction, iteration, microbatch))
        if entry is None:
            raise UpstreamLogError(
                f"no logged {direction} for iteration {iteration} microbatch {microbatch} (log "
                f"spans iterations {self.span()}); scoped recovery cannot replay it — fall back "
                "to global rollback"
            )
        return entry.check((direction, iteration, microbatch))

    def verify(self, since: int | None = None) -> None:
        """Checks every entry (of iterations >= ``since``) against its checksum.

        Raises:
            UpstreamLogError: naming the first corrupted entry.
        """
        with self._lock:
            items = sorted(self._entries.items())
        for key, entry in items:
            if since is None or key[1] >= since:
                entry.check(key)

    def span(self) -> str:
        with self._lock:
            its = sorted({k[1] for k in self._entries})
        return f"{its[0]}..{its[-1]}" if its else "none"

    def keys(self) -> list[tuple[str, int, int]]:
        with self._lock:
            return sorted(self._entries)

    def discard_before(self, iteration: int) -> None:
        """Frees entries of iterations before ``iteration``."""
        with self._lock:
            for key in [k for k in self._entries if k[1] < iteration]:
                entry = self._entries.pop(key)
                self.nbytes -= entry.tensor.numel() * entry.tensor.element_size()
