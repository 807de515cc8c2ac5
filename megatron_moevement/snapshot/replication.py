"""Replication of each rank's snapshot slots to ``r`` peers' host memory.

Every rank sends each captured slot (one contiguous host buffer plus its manifest) to its peers
and receives the slots of the ranks that chose it as a peer. Peers are chosen on other nodes
first (``rank + k * ranks_per_node``), so that losing a node never loses both a shard and its
replica; on a single node the choice falls back to neighbouring ranks, with a warning.

The exchange runs on a background thread over a dedicated gloo process group (host buffers, so
it never competes with NCCL training traffic), in the order the slots are captured. All ranks
capture slot ``k`` of window ``g`` at the same iteration, so the exchange pairs up without any
extra coordination: for each slot a rank posts the sends of its header and payload to its peers
and the receives from its sources, and waits for all of them.

A rank's sparse checkpoint is *persisted* once all of its W slots have reached every peer.
Replicas are kept for the two newest windows of each source (one persisted, one in flight) in
host buffers that are allocated once and reused.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from megatron_moevement.logging_utils import get_logger
from megatron_moevement.snapshot.buffers import HostBufferPool
from megatron_moevement.snapshot.slots import SlotSnapshot, SparseCheckpoint
from megatron_moevement.snapshot.stage_times import StageTimes

logger = get_logger(__name__)


class ReplicationError(RuntimeError):
    """A replica is missing or a transfer failed."""


def choose_peers(
    rank: int, world_size: int, replication_factor: int, ranks_per_node: int
) -> list[int]:
    """The ``replication_factor`` ranks that hold replicas of ``rank``'s slots.

    Off-node ranks come first (same local index on the following nodes), then the other ranks in
    ring order. Deterministic, so every rank can compute every other rank's peers.
    """
    if replication_factor <= 0 or world_size <= 1:
        return []
    candidates: list[int] = []
    nodes = max(world_size // max(ranks_per_node, 1), 1)
    for k in range(1, nodes):
        candidates.append((rank + k * ranks_per_node) % world_size)
    for k in range(1, world_size):
        candidates.append((rank + k) % world_size)
    peers: list[int] = []
    for c in candidates:
        if c != rank and c not in peers:
            peers.append(c)
        if len(peers) == replication_factor:
            break
    if len(peers) < replication_factor:
        raise ReplicationError(
            f"replication_factor={replication_factor} needs more ranks than the job's "
            f"{world_size}; lower MoEvementConfig.replication_factor to at most {world_size - 1}"
        )
    return peers


def sources_of(
    rank: int, world_size: int, replication_factor: int, ranks_per_node: int
) -> list[int]:
    """The ranks whose replicas ``rank`` holds."""
    return [
        s
        for s in range(world_size)
        if rank in choose_peers(s, world_size, replication_factor, ranks_per_node)
    ]


@dataclass
class ReplicaStore:
    """Replicas this rank holds for one source rank: window number -> slots, in host buffers
    from a pool keyed like the owner's (window parity, slot), allocated once and reused."""

    source: int
    windows: dict[int, list[SlotSnapshot | None]] = field(default_factory=dict)
    pool: HostBufferPool = field(default_factory=HostBufferPool)
    keep: int = 2
    """Newest windows kept (one persisted and one in flight by default)."""

    @classmethod
    def keeping(cls, source: int, keep: int) -> "ReplicaStore":
        """Replicas of ``source`` for its ``keep`` newest windows (buffers allocated once)."""
        return cls(source, pool=HostBufferPool(keep), keep=keep)

    def buffer(self, window: int, slot: int, nbytes: int) -> torch.Tensor:
        return self.pool.get(window, slot, nbytes)

    def put(self, slot: SlotSnapshot, window_size: int) -> None:
        slots = self.windows.setdefault(slot.window, [None] * window_size)
        slots[slot.slot] = slot
        for old in [g for g in self.windows if g <= slot.window - self.keep]:
            del self.windows[old]

    @property
    def nbytes(self) -> int:
        return self.pool.nbytes


class PeerReplicator:
    """Replicates captured slots to peers in the background.

    Args:
        rank: This rank (in ``group``, which spans the whole job).
        world_size: Ranks in ``group``.
        replication_factor: Peers per rank (``r``); 0 disables replication.
        ranks_per_node: Ranks per node, for off-node peer choice.
        group: Dedicated gloo process group (created collectively by the caller).
        store_factory: ``f(source) -> ReplicaStore`` for the replicas of one source rank
            (default: two windows kept).
        times: Where the exchange's seconds are added up (stage ``replication``).
    """

    def __init__(
        self,
        rank: int,
        world_size: int,
        replication_factor: int,
        ranks_per_node: int,
        group=None,
        store_factory: Callable[[int], ReplicaStore] | None = None,
        times: StageTimes | None = None,
    ) -> None:
        self.rank = rank
        self.times = times if times is not None else StageTimes()
        self.world_size = world_size
        self.replication_factor = replication_factor
        self.peers = choose_peers(rank, world_size, replication_factor, ranks_per_node)
        self.sources = sources_of(rank, world_size, replication_factor, ranks_per_node)
        if self.peers and ranks_per_node >= world_size:
            logger.warning(
                "all %d ranks are on one node: replicas of rank %d live on the same node "
                "(peers %s) and do not survive a node failure",
                world_size,
                rank,
                self.peers,
            )
        self.group = group
        factory = store_factory or ReplicaStore
        self.replicas = {s: factory(s) for s in self.sources}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moevement-repl")
        self._pending: list[Future] = []
        self._lock = threading.Lock()
        self.error: BaseException | None = None
        self.bytes_sent = 0

    def replicate(self, ckpt: SparseCheckpoint, slot: SlotSnapshot) -> Future | None:
        """Queues the exchange of ``slot`` (this rank's) with peers and sources."""
        if not self.peers and not self.sources:
            ckpt.replicated.add(slot.slot)
            return None
        fut = self._executor.submit(self._exchange, ckpt, slot)
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()] + [fut]
        return fut

    def _exchange(self, ckpt: SparseCheckpoint, slot: SlotSnapshot) -> None:
        try:
            slot.wait()  # waiting for the copy thread is not replication work: not timed
            with self.times.measure("replication"):
                self._send_and_receive(ckpt, slot)
        except BaseException as exc:
            self.error = exc
            logger.error("replication of window %d slot %d failed: %s", slot.window, slot.slot, exc)
            raise

    def _send_and_receive(self, ckpt: SparseCheckpoint, slot: SlotSnapshot) -> None:
        import torch.distributed as dist

        manifest = json.dumps(slot.manifest()).encode()
        used = slot.used_bytes
        header = torch.tensor([slot.window, slot.slot, used, len(manifest)], dtype=torch.int64)
        manifest_t = torch.frombuffer(bytearray(manifest), dtype=torch.uint8)
        headers = {s: torch.zeros(4, dtype=torch.int64) for s in self.sources}
        ops = [dist.P2POp(dist.isend, header, p, self.group) for p in self.peers]
        ops += [dist.P2POp(dist.irecv, headers[s], s, self.group) for s in self.sources]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
        payload_ops = []
        incoming = {}
        for p in self.peers:
            payload_ops.append(dist.P2POp(dist.isend, slot.buffer[: max(used, 1)], p, self.group))
            payload_ops.append(dist.P2POp(dist.isend, manifest_t, p, self.group))
        for s in self.sources:
            gen, index, nbytes, mbytes = (int(v) for v in headers[s])
            buf = self.replicas[s].buffer(gen, index, nbytes)
            mbuf = torch.empty(mbytes, dtype=torch.uint8)
            incoming[s] = (buf, mbuf, nbytes)
            payload_ops.append(dist.P2POp(dist.irecv, buf[: max(nbytes, 1)], s, self.group))
            payload_ops.append(dist.P2POp(dist.irecv, mbuf, s, self.group))
        for req in dist.batch_isend_irecv(payload_ops):
            req.wait()
        for s, (buf, mbuf, _) in incoming.items():
            replica = SlotSnapshot.from_manifest(json.loads(bytes(mbuf.numpy())), buf)
            self.replicas[s].put(replica, ckpt.window_size)
        self.bytes_sent += used * len(self.peers)
        ckpt.replicated.add(slot.slot)

    def replica(self, source: int, window: int, slot: int) -> SlotSnapshot:
        """The replica of ``source``'s slot, or a :class:`ReplicationError` saying what exists."""
        store = self.replicas.get(source)
        if store is None:
            raise ReplicationError(
                f"rank {self.rank} holds no replicas of rank {source} (it holds {self.sources}); "
                f"ask one of rank {source}'s peers instead"
            )
        slots = store.windows.get(window)
        if slots is None or slots[slot] is None:
            raise ReplicationError(
                f"rank {self.rank} has no replica of rank {source} window {window} slot "
                f"{slot}; it has windows {sorted(store.windows)}. Fall back to global rollback "
                "or the durable tier."
            )
        return slots[slot]

    def drain(self) -> None:
        """Waits for every queued exchange; re-raises the first failure."""
        with self._lock:
            pending = list(self._pending)
        for fut in pending:
            fut.result()

    @property
    def host_bytes(self) -> int:
        return sum(store.nbytes for store in self.replicas.values())

    def shutdown(self) -> None:
        try:
            self.drain()
        finally:
            self._executor.shutdown(wait=True)

    def abandon(self) -> None:
        """Stops replicating without waiting (after a failure); the replicas held stay."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.group = None
