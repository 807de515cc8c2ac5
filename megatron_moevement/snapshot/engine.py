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
Buffers belong to a pool keyed by (window parity, slot): the in-flight and the persisted
checkpoint use different halves, so a window never overwrites the checkpoint it may need.

The copy is asynchronous. On CUDA it runs on a dedicated stream, ordered after the optimizer step
by an event, and the next optimizer step waits for it on the device (``wait_stream``), so the host
never blocks. On CPU it runs on a background thread as one multi-tensor copy (torch releases the
GIL for all of it) and the next optimizer step waits for the thread only if it is not done. Either
way a slot holds exactly the state of its iteration although training continues."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from megatron_moevement.constants import DEFAULT_CHECKSUM
from megatron_moevement.logging_utils import get_logger
from megatron_moevement.runtime.cpu_compat import outside_device_mode
from megatron_moevement.snapshot.buffers import HostBufferPool, allocate_host_buffer
from megatron_moevement.snapshot.checksum import checksum, checksum_spans, dtype_name
from megatron_moevement.snapshot.slots import (
    _ALIGN,
    SlotSnapshot,
    SnapshotError,
    SparseCheckpoint,
    TensorRecord,
)
from megatron_moevement.snapshot.stage_times import StageTimes
from megatron_moevement.state.operators import operator_tensors

logger = get_logger(__name__)


class _Copier:
    """Runs device->host copies asynchronously and computes checksums off the critical path.

    Args:
        asynchronous: False runs every copy and checksum on the calling thread before
            :meth:`submit` returns (``MoEvementConfig.snapshot_async=False``: simpler to debug,
            and the training thread pays for the copy).
        times: Where the stages' seconds are added up.
    """

    def __init__(self, asynchronous: bool = True, times: StageTimes | None = None) -> None:
        self.asynchronous = asynchronous
        self.times = times if times is not None else StageTimes()
        self.use_cuda = torch.cuda.is_available()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moevement-copy")
        self._stream = torch.cuda.Stream() if self.use_cuda else None
        self._pending: Future | None = None
        self._event = None

    def submit(
        self,
        slot: SlotSnapshot,
        pairs: list[tuple[TensorRecord, torch.Tensor]],
        first_touch: bool = False,
        destinations: list[torch.Tensor] | None = None,
    ) -> None:
        """Starts copying ``pairs`` into ``slot``'s buffer (``first_touch``: a buffer allocated
        for this slot, whose pages are faulted in first, timed apart as a one-time cost).

        ``destinations`` are views of the buffer at each record with the source's dtype and
        shape (:meth:`HostBufferPool.typed_views`); built here when not given.
        """
        self.wait_host()
        if destinations is None:
            destinations = [
                slot.buffer[rec.offset : rec.offset + rec.nbytes].view(src.dtype).view(src.shape)
                for rec, src in pairs
            ]
        if len(destinations) != len(pairs):
            raise SnapshotError(
                f"{len(destinations)} destination views for {len(pairs)} tensors of slot "
                f"{slot.slot} of window {slot.window}; pass one view per record"
            )
        sources = [src for _, src in pairs]
        if not self.asynchronous:
            if self.use_cuda:
                torch._foreach_copy_(destinations, sources)
                torch.cuda.current_stream().synchronize()
                self._finish_sync(slot)
            else:
                self._copy_host(slot, sources, destinations, first_touch)
            slot.wait()  # re-raises a copy failure on the training thread
            return
        if self.use_cuda:
            # Order the copy after the optimizer step on the compute stream, then let the
            # compute stream continue; the next step waits on this stream (wait_for_copies).
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                # One call queues every device->pinned-host copy (no per-tensor Python on the
                # training thread beyond marking each source as used by the copy stream).
                torch._foreach_copy_(destinations, sources, non_blocking=True)
                for src in sources:
                    src.record_stream(self._stream)
                self._event = torch.cuda.Event()
                self._event.record(self._stream)
            event = self._event
            self._pending = self._executor.submit(self._finish_cuda, slot, event)
        else:
            self._pending = self._executor.submit(
                self._copy_host, slot, sources, destinations, first_touch
            )

    def _copy_host(
        self,
        slot: SlotSnapshot,
        sources: list[torch.Tensor],
        destinations: list[torch.Tensor],
        first_touch: bool = False,
    ) -> None:
        try:
            if first_touch:
                # Every page of a new buffer faulted in at once, so that no later copy (also one
                # into the part a smaller slot left untouched) pays for it as a recurring cost.
                with self.times.measure("first_touch"):
                    slot.buffer.zero_()
            with self.times.measure("copy"):
                # One multi-tensor copy between same-dtype tensors (a byte copy per tensor): a
                # single call that releases the GIL for all of them, where a Python loop over a
                # few hundred small tensors held the GIL the training thread needs between each.
                torch._foreach_copy_(destinations, sources)
            self._seal(slot)
        except BaseException as exc:  # surfaced by SlotSnapshot.wait()
            slot.error = exc
        finally:
            slot.ready.set()

    def _finish_sync(self, slot: SlotSnapshot) -> None:
        try:
            self._seal(slot)
        except BaseException as exc:
            slot.error = exc
        finally:
            slot.ready.set()

    def _finish_cuda(self, slot: SlotSnapshot, event) -> None:
        try:
            with self.times.measure("copy"):  # the copy stream's work, seen from the host
                event.synchronize()
            self._seal(slot)
        except BaseException as exc:
            slot.error = exc
        finally:
            slot.ready.set()

    def _seal(self, slot: SlotSnapshot) -> None:
        with self.times.measure("checksum"):
            self._seal_records(slot)

    @staticmethod
    def _seal_records(slot: SlotSnapshot) -> None:
        records = list(slot.records.items())
        digests = checksum_spans(
            slot.buffer, [(rec.offset, rec.nbytes) for _, rec in records], slot.algorithm
        )
        for (key, rec), digest in zip(records, digests):
            slot.records[key] = TensorRecord(
                rec.key, rec.dtype, rec.shape, rec.offset, rec.nbytes, digest
            )

    def wait_for_copies(self) -> None:
        """Called before the optimizer step mutates the state being copied."""
        with self.times.measure("wait_for_copies"):
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

    def abandon(self) -> None:
        """Stops the copy thread without waiting (after a failure); finished slots stay."""
        self._executor.shutdown(wait=False, cancel_futures=True)


class SnapshotEngine:
    """Captures the slots of sparse checkpoints for one rank.

    Args:
        registry: This rank's :class:`~megatron_moevement.state.operators.OperatorRegistry`.
        plan: This rank's :class:`~megatron_moevement.snapshot.sharding.ShardPlan`.
        rank: Global rank (recorded in manifests).
        algorithm: Checksum algorithm of the slots.
        pool: The host buffers to capture into (default: two windows' worth).
        asynchronous: Overlap copies with training (see :class:`_Copier`).
        times: Where the stages' seconds are added up (default: a fresh :class:`StageTimes`).
    """

    def __init__(
        self,
        registry,
        plan,
        rank: int,
        algorithm: str = DEFAULT_CHECKSUM,
        pool: HostBufferPool | None = None,
        asynchronous: bool = True,
        times: StageTimes | None = None,
    ) -> None:
        self.registry = registry
        self.times = times if times is not None else StageTimes()
        self.plan = plan
        self.rank = rank
        self.algorithm = algorithm
        self.pool = pool if pool is not None else HostBufferPool()
        self._copier = _Copier(asynchronous, self.times)
        self.bytes_captured_last = 0
        # Bytes of the last slot by what they hold: full state (main + optimizer) of expert and
        # of non-expert operators, compute weights, per-rank records. Benchmarks report the
        # expert share against the experts' full state (~1/W with sparse snapshots).
        self.bytes_captured_last_by_part: dict[str, int] = {}

    def begin_window(self, schedule, start_iteration: int, window: int) -> SparseCheckpoint:
        """A new, empty sparse checkpoint: window number ``window``, from ``start_iteration``."""
        self.pool.release_slots_from(schedule.window_size)
        return SparseCheckpoint(
            window=window,
            start_iteration=start_iteration,
            window_size=schedule.window_size,
            schedule=schedule.to_dict(),
            owner_rank=self.rank,
        )

    def capture(
        self,
        ckpt: SparseCheckpoint,
        slot_index: int,
        iteration: int,
        rank_state: dict[str, torch.Tensor] | None = None,
    ) -> SlotSnapshot:
        """Starts capturing slot ``slot_index`` of ``ckpt`` with the state of ``iteration``.

        Call right after the optimizer step of ``iteration``; returns at once.

        Args:
            ckpt: The window's checkpoint.
            slot_index: Its slot to capture.
            iteration: The iteration whose post-step state the slot holds.
            rank_state: Per-rank tensors every slot carries besides the operators' (the RNG
                states, ``{record key: tensor}``); they must not change while being copied.
        """
        # The slot's walk reads a few hundred tensors' metadata and makes views of them: nothing
        # the CPU device-redirect mode has to see, and it would multiply the walk's cost.
        with self.times.measure("capture"), outside_device_mode():
            return self._capture(ckpt, slot_index, iteration, rank_state)

    def _capture(self, ckpt, slot_index, iteration, rank_state) -> SlotSnapshot:
        if ckpt.slots[slot_index] is not None:
            raise SnapshotError(f"slot {slot_index} of window {ckpt.window} already captured")
        self.registry.refresh()
        slices: list[list[str]] = ckpt.schedule["slices"]
        full_ops = [n for n in slices[slot_index] if self.plan.captures_full(n)]
        # Compute weights of the slice itself too: restoring them from the snapshot is exact
        # even where the main parameters are data-parallel shards (distributed optimizer).
        current_and_later = [n for s in slices[slot_index:] for n in s]
        compute_ops = [n for n in current_and_later if self.plan.captures_compute(n)]

        # (part, key, tensor): the part says what the bytes hold, for the per-part byte counts.
        live: list[tuple[str, str, torch.Tensor]] = []
        for name in full_ops:
            op = self.registry[name]
            part = "expert_full" if op.kind == "expert" else "non_expert_full"
            live.extend((part, k, t) for k, t in operator_tensors(op, ("main", "optim")))
        for name in compute_ops:
            live.extend(
                ("compute", k, t) for k, t in operator_tensors(self.registry[name], ("compute",))
            )
        live.extend(("rank", k, t) for k, t in sorted((rank_state or {}).items()))

        parts = dict.fromkeys(("expert_full", "non_expert_full", "compute", "rank"), 0)
        records: list[TensorRecord] = []
        layout: list[tuple[int, int, torch.dtype, tuple[int, ...]]] = []
        offset = 0
        for part, key, tensor in live:
            dtype, shape = tensor.dtype, tuple(tensor.shape)
            nbytes = tensor.nbytes
            parts[part] += nbytes
            records.append(TensorRecord(key, dtype_name(dtype), shape, offset, nbytes))
            layout.append((offset, nbytes, dtype, shape))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        allocations = self.pool.allocations
        buffer = self.pool.get(ckpt.window, slot_index, offset)
        destinations = self.pool.typed_views(ckpt.window, slot_index, layout)
        slot = SlotSnapshot(
            window=ckpt.window,
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
        self.bytes_captured_last_by_part = parts
        self._copier.submit(
            slot,
            [(r, t) for r, (_, _, t) in zip(records, live)],
            first_touch=self.pool.allocations != allocations,
            destinations=destinations,
        )
        return slot

    def wait_for_copies(self) -> None:
        """Makes the next optimizer step wait for in-flight copies (device-side on CUDA)."""
        self._copier.wait_for_copies()

    def drain(self) -> None:
        """Blocks until every copy and checksum has finished on the host."""
        self._copier.wait_host()

    def shutdown(self) -> None:
        self._copier.shutdown()

    def abandon(self) -> None:
        """Stops copying without waiting (after a failure); drops the registry reference."""
        self._copier.abandon()
        self.registry = None


_MEASURED_BANDWIDTH: dict[tuple[bool, str | None], float] = {}
"""Bandwidth measured by :func:`snapshot_bandwidth`, per (CUDA, checksum algorithm)."""


def snapshot_bandwidth(checksum_algorithm: str | None = None) -> float:
    """:func:`measure_d2h_bandwidth`, measured once per process: the hardware does not change
    between recovery generations, and a rebuild after a failure should not spend its time (on
    every rank of the new generation) re-probing it."""
    key = (torch.cuda.is_available(), checksum_algorithm)
    if key not in _MEASURED_BANDWIDTH:
        _MEASURED_BANDWIDTH[key] = measure_d2h_bandwidth(checksum_algorithm=checksum_algorithm)
    return _MEASURED_BANDWIDTH[key]


def measure_d2h_bandwidth(
    nbytes: int = 32 << 20, repeats: int = 3, checksum_algorithm: str | None = None
) -> float:
    """Effective snapshot throughput in bytes/s, as Algorithm 1 needs it.

    On CUDA: device-to-host copies into a pinned buffer (checksums run on the host, off the
    device's critical path). On CPU the "device" is the host, and a slot is done only once it is
    copied *and* checksummed on the same cores that train, so both are timed together.
    """
    dst = allocate_host_buffer(nbytes)
    if torch.cuda.is_available():
        src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
    else:
        src = torch.empty(nbytes, dtype=torch.uint8)
        dst.copy_(src)
        start = time.perf_counter()
        for _ in range(repeats):
            dst.copy_(src)
            if checksum_algorithm:
                checksum(dst, checksum_algorithm)
    return nbytes * repeats / max(time.perf_counter() - start, 1e-9)
