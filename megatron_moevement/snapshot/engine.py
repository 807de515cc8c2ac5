"""Per-slot sparse snapshots: device -> host copies into buffers allocated once and reused.

At the end of iteration ``t`` (after the optimizer step) slot ``k`` of the current window captures

* the **full state** (FP32 main parameters and optimizer state) of the operators of slice ``k``,
* the **compute weights** of the operators of slices ``k .. W-1``: those of later slices are still
  to be captured with full state in this window (they are *frozen* when this slot is loaded for
  replay); those of slice ``k`` itself make its restore exact without re-deriving them from
  (possibly sharded) main parameters,

restricted to what this rank is responsible for (:mod:`megatron_moevement.snapshot.sharding`).

Each slot is packed into one contiguous host buffer (pinned on CUDA) described by a manifest of
``TensorRecord`` entries, which makes replication a single transfer per slot and checksums cheap.
Buffers belong to a pool keyed by (generation parity, slot): the in-flight and the persisted
checkpoint use different halves, so a window never overwrites the checkpoint it may need.

The copy is asynchronous. On CUDA it runs on a dedicated stream, ordered after the optimizer step
by an event, and the next optimizer step waits for it on the device (``wait_stream``), so the host
never blocks. On CPU it runs on a background thread (torch releases the GIL while copying) and the
next optimizer step waits for the thread only if it is not done. Either way a slot holds exactly
the state of its iteration although training continues.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from megatron_moevement.logging_utils import get_logger
from megatron_moevement.snapshot.serialization import (
    SnapshotChecksumError,
    checksum,
    dtype_from_name,
    dtype_name,
)

logger = get_logger(__name__)

_ALIGN = 64


class SnapshotError(RuntimeError):
    """A snapshot is missing, incomplete or does not match what is asked of it."""


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor lives inside a slot buffer."""

    key: str
    """``<operator>/<kind>/<param>[/<state key>]`` with kind in compute, main, optim."""
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    checksum: str = ""

    def to_dict(self) -> dict:
        return dict(
            key=self.key,
            dtype=self.dtype,
            shape=list(self.shape),
            offset=self.offset,
            nbytes=self.nbytes,
            checksum=self.checksum,
        )

    @classmethod
    def from_dict(cls, d: dict) -> "TensorRecord":
        return cls(
            d["key"], d["dtype"], tuple(d["shape"]), d["offset"], d["nbytes"], d.get("checksum", "")
        )


def allocate_host_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 host buffer, pinned when CUDA is available (for asynchronous device->host copies)."""
    pin = torch.cuda.is_available()
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pin)


@dataclass
class SlotSnapshot:
    """One slot of a sparse checkpoint on one rank: a host buffer and its manifest."""

    generation: int
    """Window number (0, 1, 2, ...) of the sparse checkpoint this slot belongs to."""
    slot: int
    """0-based slot index within the window."""
    iteration: int
    """Training iteration whose post-optimizer-step state the slot holds."""
    full_state_ops: tuple[str, ...]
    """Operators captured with full state in this slot (by this rank)."""
    compute_ops: tuple[str, ...]
    """Operators captured with compute weights only (by this rank)."""
    records: dict[str, TensorRecord] = field(default_factory=dict)
    buffer: torch.Tensor | None = field(default=None, repr=False)
    algorithm: str = "crc32"
    owner_rank: int = -1
    """Global rank that captured the slot (differs from the holder for a peer replica)."""
    window_start: int = -1
    """First iteration of the slot's window."""
    schedule: dict | None = field(default=None, repr=False)
    """The window's schedule (kept with every slot so a peer replica is self-describing)."""
    ready: threading.Event = field(default_factory=threading.Event, repr=False)
    error: BaseException | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.records.values())

    @property
    def used_bytes(self) -> int:
        """Length of the buffer prefix the records occupy (what a transfer or file must hold)."""
        return max((r.offset + r.nbytes for r in self.records.values()), default=0)

    def wait(self, timeout: float | None = None) -> None:
        """Blocks until the copy and checksums are done; re-raises a copy failure."""
        if not self.ready.wait(timeout):
            raise SnapshotError(f"slot {self.slot} of window {self.generation} not ready in time")
        if self.error is not None:
            raise SnapshotError(f"capturing slot {self.slot} failed: {self.error}") from self.error

    def tensor(self, key: str) -> torch.Tensor:
        """A view of the stored tensor ``key`` (no copy)."""
        try:
            rec = self.records[key]
        except KeyError:
            raise SnapshotError(
                f"slot {self.slot} (iteration {self.iteration}, rank {self.owner_rank}) has no "
                f"tensor {key!r}"
            ) from None
        raw = self.buffer[rec.offset : rec.offset + rec.nbytes]
        return raw.view(dtype_from_name(rec.dtype)).view(rec.shape)

    def keys(self) -> Iterable[str]:
        return self.records.keys()

    def verify(self, keys: Iterable[str] | None = None) -> None:
        """Recomputes checksums; raises :class:`SnapshotChecksumError` naming the bad tensor."""
        self.wait()
        for key in keys if keys is not None else self.records:
            rec = self.records[key]
            got = checksum(self.buffer[rec.offset : rec.offset + rec.nbytes], self.algorithm)
            if got != rec.checksum:
                raise SnapshotChecksumError(
                    key,
                    rec.checksum,
                    got,
                    self.algorithm,
                    shard=f"rank{self.owner_rank}/window{self.generation}/slot{self.slot}",
                )

    def manifest(self) -> dict:
        return dict(
            generation=self.generation,
            slot=self.slot,
            iteration=self.iteration,
            full_state_ops=list(self.full_state_ops),
            compute_ops=list(self.compute_ops),
            algorithm=self.algorithm,
            owner_rank=self.owner_rank,
            window_start=self.window_start,
            schedule=self.schedule,
            records=[r.to_dict() for r in self.records.values()],
        )

    @classmethod
    def from_manifest(cls, manifest: dict, buffer: torch.Tensor) -> "SlotSnapshot":
        slot = cls(
            generation=manifest["generation"],
            slot=manifest["slot"],
            iteration=manifest["iteration"],
            full_state_ops=tuple(manifest["full_state_ops"]),
            compute_ops=tuple(manifest["compute_ops"]),
            algorithm=manifest["algorithm"],
            owner_rank=manifest["owner_rank"],
            buffer=buffer,
            window_start=manifest.get("window_start", -1),
            schedule=manifest.get("schedule"),
            records={d["key"]: TensorRecord.from_dict(d) for d in manifest["records"]},
        )
        slot.ready.set()
        return slot


@dataclass
class SparseCheckpoint:
    """The W slots of one window on one rank."""

    generation: int
    start_iteration: int
    """Iteration captured by slot 0."""
    window_size: int
    schedule: dict
    """``SparseSchedule.to_dict()`` of the window (slices of operator names)."""
    owner_rank: int
    slots: list[SlotSnapshot | None] = field(default_factory=list)
    replicated: set[int] = field(default_factory=set)
    """Slot indices whose replication to every peer has completed."""

    def __post_init__(self) -> None:
        if not self.slots:
            self.slots = [None] * self.window_size

    @property
    def captured(self) -> bool:
        """True once every slot has been captured (copies may still be finishing)."""
        return all(s is not None for s in self.slots)

    @property
    def persisted(self) -> bool:
        """True once every slot is captured and replicated to all peers."""
        return self.captured and len(self.replicated) == self.window_size

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.slots if s is not None)

    @classmethod
    def from_slots(cls, slots: list[SlotSnapshot]) -> "SparseCheckpoint":
        """Rebuilds a checkpoint from self-describing slots (e.g. a peer's replicas)."""
        if not slots or any(s is None for s in slots):
            raise SnapshotError("cannot rebuild a sparse checkpoint from an incomplete window")
        first = slots[0]
        ckpt = cls(
            generation=first.generation,
            start_iteration=first.window_start,
            window_size=len(slots),
            schedule=first.schedule,
            owner_rank=first.owner_rank,
            slots=list(slots),
        )
        ckpt.replicated = set(range(len(slots)))
        return ckpt

    def slot_for_iteration(self, iteration: int) -> SlotSnapshot:
        index = iteration - self.start_iteration
        if not 0 <= index < self.window_size or self.slots[index] is None:
            raise SnapshotError(
                f"window {self.generation} (iterations {self.start_iteration}.."
                f"{self.start_iteration + self.window_size - 1}) has no slot for iteration "
                f"{iteration}"
            )
        return self.slots[index]


class _HostBufferPool:
    """Host buffers keyed by (generation modulo ``keep``, slot), allocated once and grown only if
    a schedule change needs more room."""

    def __init__(self, keep: int = 2) -> None:
        if keep < 2:
            raise ValueError(f"keep={keep} must be >= 2 (one persisted, one in flight)")
        self.keep = keep
        """Generations whose buffers coexist (keyed by ``generation % keep``)."""
        self._buffers: dict[tuple[int, int], torch.Tensor] = {}
        self.allocations = 0

    def get(self, generation: int, slot: int, nbytes: int) -> torch.Tensor:
        key = (generation % self.keep, slot)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < nbytes:
            buf = allocate_host_buffer(nbytes)
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


def _operator_tensors(op, kinds: Sequence[str]) -> list[tuple[str, torch.Tensor]]:
    """(key, live tensor) pairs of operator ``op`` for the given kinds (compute/main/optim).

    When the optimizer steps the model parameter itself (plain FP32 training), the compute weight
    *is* the main parameter: it is listed once, as ``compute``.
    """
    out: list[tuple[str, torch.Tensor]] = []
    for p in op.params:
        if "compute" in kinds:
            out.append((f"{op.name}/compute/{p.name}", p.param.detach()))
        state = p.state
        if state is None or state.main_param is None:
            continue
        if "main" in kinds and not state.main_is_model:
            out.append((f"{op.name}/main/{p.name}", state.main_param.detach()))
        if "optim" in kinds:
            for skey in sorted(state.optimizer_state):
                value = state.optimizer_state[skey]
                if torch.is_tensor(value):
                    out.append((f"{op.name}/optim/{p.name}/{skey}", value.detach()))
    return out


class _Copier:
    """Runs device->host copies asynchronously and computes checksums off the critical path."""

    def __init__(self) -> None:
        self.use_cuda = torch.cuda.is_available()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moevement-copy")
        self._stream = torch.cuda.Stream() if self.use_cuda else None
        self._pending: Future | None = None
        self._event = None

    def submit(self, slot: SlotSnapshot, pairs: list[tuple[TensorRecord, torch.Tensor]]) -> None:
        self.wait_host()
        if self.use_cuda:
            # Order the copy after the optimizer step on the compute stream, then let the
            # compute stream continue; the next step waits on this stream (wait_for_copies).
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                for rec, src in pairs:
                    dst = slot.buffer[rec.offset : rec.offset + rec.nbytes]
                    dst.copy_(src.reshape(-1).view(torch.uint8), non_blocking=True)
                    src.record_stream(self._stream)
                self._event = torch.cuda.Event()
                self._event.record(self._stream)
            event = self._event
            self._pending = self._executor.submit(self._finish_cuda, slot, event)
        else:
            self._pending = self._executor.submit(self._copy_host, slot, pairs)

    @staticmethod
    def _copy_host(slot: SlotSnapshot, pairs) -> None:
        try:
            for rec, src in pairs:
                slot.buffer[rec.offset : rec.offset + rec.nbytes].copy_(
                    src.reshape(-1).view(torch.uint8)
                )
            _Copier._seal(slot)
        except BaseException as exc:  # surfaced by SlotSnapshot.wait()
            slot.error = exc
        finally:
            slot.ready.set()

    @staticmethod
    def _finish_cuda(slot: SlotSnapshot, event) -> None:
        try:
            event.synchronize()
            _Copier._seal(slot)
        except BaseException as exc:
            slot.error = exc
        finally:
            slot.ready.set()

    @staticmethod
    def _seal(slot: SlotSnapshot) -> None:
        for key, rec in list(slot.records.items()):
            digest = checksum(slot.buffer[rec.offset : rec.offset + rec.nbytes], slot.algorithm)
            slot.records[key] = TensorRecord(
                rec.key, rec.dtype, rec.shape, rec.offset, rec.nbytes, digest
            )

    def wait_for_copies(self) -> None:
        """Called before the optimizer step mutates the state being copied."""
        if self.use_cuda:
            if self._event is not None:
                torch.cuda.current_stream().wait_stream(self._stream)
        else:
            self.wait_host()

    def wait_host(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def shutdown(self) -> None:
        self.wait_host()
        self._executor.shutdown(wait=True)


class SnapshotEngine:
    """Captures the slots of sparse checkpoints for one rank.

    Args:
        registry: This rank's :class:`~megatron_moevement.state.operators.OperatorRegistry`.
        plan: This rank's :class:`~megatron_moevement.snapshot.sharding.ShardPlan`.
        rank: Global rank (recorded in manifests).
        algorithm: Checksum algorithm of the slots.
    """

    def __init__(self, registry, plan, rank: int, algorithm: str = "crc32") -> None:
        self.registry = registry
        self.plan = plan
        self.rank = rank
        self.algorithm = algorithm
        self.pool = _HostBufferPool()
        self._copier = _Copier()
        self.bytes_captured_last = 0

    def begin_window(self, schedule, start_iteration: int, generation: int) -> SparseCheckpoint:
        """A new, empty sparse checkpoint for the window starting at ``start_iteration``."""
        self.pool.release_slots_from(schedule.window_size)
        return SparseCheckpoint(
            generation=generation,
            start_iteration=start_iteration,
            window_size=schedule.window_size,
            schedule=schedule.to_dict(),
            owner_rank=self.rank,
        )

    def capture(self, ckpt: SparseCheckpoint, slot_index: int, iteration: int) -> SlotSnapshot:
        """Starts capturing slot ``slot_index`` of ``ckpt`` with the state of ``iteration``.

        Call right after the optimizer step of ``iteration``; returns at once.
        """
        if ckpt.slots[slot_index] is not None:
            raise SnapshotError(f"slot {slot_index} of window {ckpt.generation} already captured")
        self.registry.refresh()
        slices: list[list[str]] = ckpt.schedule["slices"]
        full_ops = [n for n in slices[slot_index] if self.plan.captures_full(n)]
        # Compute weights of the slice itself too: restoring them from the snapshot is exact
        # even where the main parameters are data-parallel shards (distributed optimizer).
        current_and_later = [n for s in slices[slot_index:] for n in s]
        compute_ops = [n for n in current_and_later if self.plan.captures_compute(n)]

        live: list[tuple[str, torch.Tensor]] = []
        for name in full_ops:
            live.extend(_operator_tensors(self.registry[name], ("main", "optim")))
        for name in compute_ops:
            live.extend(_operator_tensors(self.registry[name], ("compute",)))

        records: list[TensorRecord] = []
        offset = 0
        for key, tensor in live:
            nbytes = tensor.numel() * tensor.element_size()
            records.append(
                TensorRecord(key, dtype_name(tensor.dtype), tuple(tensor.shape), offset, nbytes)
            )
            offset += -(-nbytes // _ALIGN) * _ALIGN
        buffer = self.pool.get(ckpt.generation, slot_index, offset)
        slot = SlotSnapshot(
            generation=ckpt.generation,
            slot=slot_index,
            iteration=iteration,
            full_state_ops=tuple(full_ops),
            compute_ops=tuple(compute_ops),
            records={r.key: r for r in records},
            buffer=buffer,
            algorithm=self.algorithm,
            owner_rank=self.rank,
            window_start=ckpt.start_iteration,
            schedule=ckpt.schedule,
        )
        ckpt.slots[slot_index] = slot
        self.bytes_captured_last = sum(r.nbytes for r in records)
        self._copier.submit(slot, [(r, t) for r, (_, t) in zip(records, live)])
        return slot

    def wait_for_copies(self) -> None:
        """Makes the next optimizer step wait for in-flight copies (device-side on CUDA)."""
        self._copier.wait_for_copies()

    def drain(self) -> None:
        """Blocks until every copy and checksum has finished on the host."""
        self._copier.wait_host()

    def shutdown(self) -> None:
        self._copier.shutdown()
