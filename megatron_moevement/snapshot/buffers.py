"""Host buffers for snapshots: pinned on CUDA, allocated once per (window parity, slot), reused."""

from __future__ import annotations

from typing import Sequence

import torch

SlotLayout = Sequence[tuple[int, int, torch.dtype, tuple[int, ...]]]
"""Where a slot's tensors lie in its buffer: ``(offset, nbytes, dtype, shape)`` per tensor."""


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
        # Per key, the typed views of its buffer for the last layout copied into it: a slot's
        # layout recurs every ``keep`` windows until the schedule changes, and building ~100
        # views per slot per iteration on the training thread is what a cache saves.
        self._views: dict[tuple[int, int], tuple[tuple, list[torch.Tensor]]] = {}
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
            self._views.pop(key, None)
            self.allocations += 1
        return buf

    def typed_views(self, window: int, slot: int, layout: SlotLayout) -> list[torch.Tensor]:
        """Views of the buffer of (``window``, ``slot``) with each tensor's dtype and shape, in
        ``layout`` order: the destinations of one multi-tensor copy (see
        :meth:`SnapshotEngine.capture`). Call after :meth:`get` for the same slot.

        Raises:
            KeyError: No buffer was handed out for that slot.
        """
        key = (window % self.keep, slot)
        buf = self._buffers[key]
        layout = tuple(layout)
        cached = self._views.get(key)
        if cached is not None and cached[0] == layout:
            return cached[1]
        views = [
            buf[offset : offset + nbytes].view(dtype).view(shape)
            for offset, nbytes, dtype, shape in layout
        ]
        self._views[key] = (layout, views)
        return views

    def release_slots_from(self, window_size: int) -> None:
        """Frees buffers of slot indices that a smaller window no longer uses."""
        for key in [k for k in self._buffers if k[1] >= window_size]:
            del self._buffers[key]
            self._views.pop(key, None)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values())
