"""Host buffers for snapshots: pinned on CUDA, allocated once per (window parity, slot), reused."""

from __future__ import annotations

import torch


def allocate_host_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 host buffer, pinned when CUDA is available (for asynchronous device->host copies)."""
    pin = torch.cuda.is_available()
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)


GROWTH_HEADROOM = 0.25
"""Extra room a buffer gets when it must grow: popularity reordering moves operators between
slices, so a slot's size drifts from window to window, and every new buffer is paid for again
in page faults on its first copy."""


class HostBufferPool:
    """Host buffers keyed by (window number modulo ``keep``, slot), allocated once and grown only if
    a schedule change needs more room (then with :data:`GROWTH_HEADROOM`)."""

    def __init__(self, keep: int = 2) -> None:
        if keep < 2:
            raise ValueError(f"keep={keep} must be >= 2 (one persisted, one in flight)")
        self.keep = keep
        """Windows whose buffers coexist (keyed by ``window % keep``)."""
        self._buffers: dict[tuple[int, int], torch.Tensor] = {}
        self.allocations = 0

    def get(self, window: int, slot: int, nbytes: int) -> torch.Tensor:
        key = (window % self.keep, slot)
        buf = self._buffers.get(key)
        # A buffer far larger than the slot (W grew, e.g. from the dense W=1 of the first
        # window) is given back, or host memory would hold the largest slot ever seen per key.
        oversized = buf is not None and buf.numel() > 2 * nbytes * (1 + GROWTH_HEADROOM)
        if buf is None or buf.numel() < nbytes or oversized:
            grow = buf is not None and not oversized
            buf = allocate_host_buffer(int(nbytes * (1 + GROWTH_HEADROOM)) if grow else nbytes)
            self._buffers[key] = buf
            self.allocations += 1
        return buf

    def release_slots_from(self, window_size: int) -> None:
        """Frees buffers of slot indices that a smaller window no longer uses."""
        for key in [k for k in self._buffers if k[1] >= window_size]:
            del self._buffers[key]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values())
