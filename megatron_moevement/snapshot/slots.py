"""What a sparse checkpoint is on one rank: slots of packed host buffers and their manifests.

A :class:`SlotSnapshot` is one slot of one window: a contiguous host buffer holding the tensors the
slot captured, described by :class:`TensorRecord` entries (key, dtype, shape, offset, size,
checksum). A :class:`SparseCheckpoint` is the W slots of one window. Both are self-describing (the
window's schedule travels with every slot), so a peer's replica or a durable file can be turned
back into a checkpoint without the job that wrote it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Iterable

import torch

from megatron_moevement.constants import DEFAULT_CHECKSUM
from megatron_moevement.snapshot.checksum import (
    SnapshotChecksumError,
    checksum_spans,
    dtype_from_name,
)

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


@dataclass
class SlotSnapshot:
    """One slot of a sparse checkpoint on one rank: a host buffer and its manifest."""

    window: int
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
    algorithm: str = DEFAULT_CHECKSUM
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
            raise SnapshotError(f"slot {self.slot} of window {self.window} not ready in time")
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
        keys = list(keys if keys is not None else self.records)
        records = [self.records[key] for key in keys]
        digests = checksum_spans(
            self.buffer, [(rec.offset, rec.nbytes) for rec in records], self.algorithm
        )
        for key, rec, got in zip(keys, records, digests):
            if got != rec.checksum:
                raise SnapshotChecksumError(
                    key,
                    rec.checksum,
                    got,
                    self.algorithm,
                    shard=f"rank{self.owner_rank}/window{self.window}/slot{self.slot}",
                )

    def manifest(self) -> dict:
        return dict(
            window=self.window,
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
            # "generation" is the key manifests written before 0.2 used for the window number.
            window=manifest["window"] if "window" in manifest else manifest["generation"],
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

    window: int
    """Window number (0, 1, 2, ...): how many windows this rank began before this one."""
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
            window=first.window,
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
                f"window {self.window} (iterations {self.start_iteration}.."
                f"{self.start_iteration + self.window_size - 1}) has no slot for iteration "
                f"{iteration}"
            )
        return self.slots[index]
