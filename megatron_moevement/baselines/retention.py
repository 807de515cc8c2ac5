"""Longer retention of checkpoints for policies that restore from several of them.

MoEvement keeps one persisted and one in-flight window: the engine's host buffers are keyed by
``generation % 2`` and a peer drops replicas older than the previous window. MoC-System restores
each expert group from the newest checkpoint that captured it, i.e. from the last ``n``
checkpoints, so its strategy's buffer pool and replica stores are built with ``keep`` generations
instead of two (same allocate-once-and-reuse behaviour).
"""

from __future__ import annotations

from megatron_moevement.snapshot.replication import ReplicaStore
from megatron_moevement.snapshot.engine import _HostBufferPool

__all__ = ["retaining_replica_store", "retain_generations"]


def retaining_replica_store(source: int, keep: int) -> ReplicaStore:
    """Replicas of one source rank for its ``keep`` newest generations."""
    return ReplicaStore(source, pool=_HostBufferPool(keep), keep=keep)


def retain_generations(strategy, keep: int) -> None:
    """Makes ``strategy``'s snapshot engine and replica stores keep ``keep`` generations."""
    strategy.engine.pool = _HostBufferPool(keep)
    replicator = strategy.replicator
    replicator.replicas = {s: retaining_replica_store(s, keep) for s in replicator.sources}
