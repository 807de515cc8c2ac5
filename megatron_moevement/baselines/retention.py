"""Longer retention of checkpoints for policies that restore from several of them.

MoEvement keeps one persisted and one in-flight window, so its host buffers are keyed by the
window's parity and a peer drops replicas older than the previous window. MoC-System restores
each expert group from the newest checkpoint that captured it, i.e. from the last ``n``
checkpoints: these subclasses of the engine's buffer pool and of the replica store keep
``keep`` generations instead of two, with the same allocate-once-and-reuse behaviour.
"""

from __future__ import annotations

import torch

from megatron_moevement.replication import ReplicaStore
from megatron_moevement.snapshot import SlotSnapshot, _HostBufferPool, allocate_host_buffer

__all__ = ["RetainingReplicaStore", "RotatingBufferPool", "retain_generations"]


class RotatingBufferPool(_HostBufferPool):
    """Host buffers keyed by ``(generation % keep, slot)``: ``keep`` generations coexist."""

    def __init__(self, keep: int) -> None:
        super().__init__()
        if keep < 2:
            raise ValueError(f"keep={keep} must be >= 2 (one persisted, one in flight)")
        self.keep = keep

    def get(self, generation: int, slot: int, nbytes: int) -> torch.Tensor:
        key = (generation % self.keep, slot)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = allocate_host_buffer(nbytes)
            self._buffers[key] = buf
            self.allocations += 1
        return buf


class RetainingReplicaStore(ReplicaStore):
    """Replicas of one source rank for its ``keep`` newest generations."""

    def __init__(self, source: int, keep: int) -> None:
        super().__init__(source, pool=RotatingBufferPool(keep))
        self.keep = keep

    def put(self, slot: SlotSnapshot, window_size: int) -> None:
        slots = self.windows.setdefault(slot.generation, [None] * window_size)
        slots[slot.slot] = slot
        for old in [g for g in self.windows if g <= slot.generation - self.keep]:
            del self.windows[old]


def retain_generations(strategy, keep: int) -> None:
    """Makes ``strategy``'s snapshot engine and replica stores keep ``keep`` generations."""
    strategy.engine.pool = RotatingBufferPool(keep)
    replicator = strategy.replicator
    replicator.replicas = {s: RetainingReplicaStore(s, keep) for s in replicator.sources}
