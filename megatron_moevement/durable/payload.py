"""What one rank writes: its newest complete sparse checkpoint and what replay needs besides.

A :class:`RankPayload` is taken from a live
:class:`~megatron_moevement.strategy.MoEvementStrategy` on the training thread (cheap: references
to the slot buffers and small dicts). :meth:`RankPayload.prepare` then waits for the slots'
asynchronous copies and checksums and builds the manifest; it may run on a background thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from megatron_moevement.durable.errors import DurableCheckpointError
from megatron_moevement.durable.files import FORMAT_NAME, FORMAT_VERSION, slot_file_name
from megatron_moevement.durable.layout import current_layout
from megatron_moevement.snapshot.slots import SparseCheckpoint

SLOT_WAIT_S = 600.0
"""How long a writer waits for a slot's copy and checksums before giving up."""


def newest_complete_checkpoint(strategy) -> SparseCheckpoint | None:
    """The newest sparse checkpoint of ``strategy`` whose W slots have all been captured.

    Every rank of a job captures the same slots at the same iterations, so all ranks pick the
    same window without communicating. After ``strategy.flush()`` it is the persisted checkpoint.
    """
    for ckpt in reversed(strategy.checkpoints):
        if ckpt.captured:
            return ckpt
    return None


def last_logged_iteration(strategy) -> int | None:
    """The newest iteration in ``strategy``'s optimizer-scalar log (the last completed step)."""
    keys = [int(k) for k in strategy.scalar_log.to_dict()]
    return max(keys) if keys else None


def _versions() -> dict:
    versions = {"torch": torch.__version__}
    try:
        from megatron.core import package_info

        versions["megatron_core"] = package_info.__version__
    except Exception:  # pragma: no cover - informational only
        pass
    try:
        from importlib.metadata import version

        versions["megatron_moevement"] = version("megatron-moevement")
    except Exception:  # pragma: no cover - not installed as a distribution
        pass
    return versions


@dataclass
class RankPayload:
    """One rank's durable file set before it is written."""

    rank: int
    world_size: int
    iteration: int
    """Last training iteration the file set can be replayed to (its scalars are included)."""
    checkpoint: SparseCheckpoint
    scalars: dict
    """``ScalarLog.to_dict()`` entries from the window's first iteration to ``iteration``."""
    layout: dict
    popularity: dict | None
    config: dict
    """The writing job's ``MoEvementConfig`` (as a dict), for tools such as the converter."""
    metadata: dict = field(default_factory=dict)
    """Job metadata (e.g. ``{"job": {"builder": ..., "spec": ...}}`` for the converter)."""
    buffers: list[torch.Tensor] | None = None
    """Per slot, the used bytes of its buffer (set by :meth:`prepare`)."""
    manifest: dict | None = None
    """The rank manifest (set by :meth:`prepare`)."""

    @property
    def window_end(self) -> int:
        return self.checkpoint.start_iteration + self.checkpoint.window_size - 1

    def prepare(self, timeout: float = SLOT_WAIT_S) -> "RankPayload":
        """Waits for the slots' copies and checksums, then builds buffers and manifest."""
        if self.manifest is not None:
            return self
        slots_meta = []
        buffers = []
        for k, slot in enumerate(self.checkpoint.slots):
            slot.wait(timeout)
            used = slot.used_bytes
            buffers.append(slot.buffer[:used])
            manifest = slot.manifest()
            manifest.pop("schedule", None)  # stored once, for the window
            slots_meta.append(dict(file=slot_file_name(k), nbytes=used, manifest=manifest))
        ckpt = self.checkpoint
        self.buffers = buffers
        self.manifest = dict(
            format=FORMAT_NAME,
            version=FORMAT_VERSION,
            rank=self.rank,
            world_size=self.world_size,
            iteration=self.iteration,
            window=dict(
                index=ckpt.window,
                start_iteration=ckpt.start_iteration,
                window_size=ckpt.window_size,
                schedule=ckpt.schedule,
                owner_rank=ckpt.owner_rank,
            ),
            slots=slots_meta,
            scalars=self.scalars,
            layout=self.layout,
            popularity=self.popularity,
            config=self.config,
            metadata=self.metadata,
            versions=_versions(),
            written_at=time.time(),
        )
        return self

    def detach(self) -> "RankPayload":
        """A prepared copy whose buffers are private clones (safe to write at any later time,
        even after the strategy reused its host buffers)."""
        self.prepare()
        clone = RankPayload(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        clone.buffers = [b.clone() for b in self.buffers]
        return clone

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self.buffers or [])


def payload_from_strategy(
    strategy, metadata: dict | None = None, iteration: int | None = None
) -> RankPayload:
    """Takes this rank's :class:`RankPayload` from ``strategy`` (call on the training thread).

    Args:
        strategy: The live ``MoEvementStrategy``.
        metadata: Job metadata stored with the files (merged over the strategy's
            ``durable.metadata``).
        iteration: The last completed iteration (default: the newest in the scalar log).

    Raises:
        DurableCheckpointError: No window has been completely captured yet.
    """
    ckpt = newest_complete_checkpoint(strategy)
    if ckpt is None:
        raise DurableCheckpointError(
            f"rank {strategy.rank}: no sparse-checkpoint window is complete yet (the first "
            "window needs W iterations after the strategy starts), so there is nothing to save. "
            "Fix: save after the first window, e.g. from the periodic saver "
            "(MoEvementConfig.durable_dir / durable_interval), which waits for one."
        )
    last = last_logged_iteration(strategy) if iteration is None else iteration
    end = ckpt.start_iteration + ckpt.window_size - 1
    if last is None or last < end:
        last = end
    scalars = {
        k: v
        for k, v in strategy.scalar_log.to_dict().items()
        if ckpt.start_iteration <= int(k) <= last
    }
    missing = [i for i in range(ckpt.start_iteration + 1, last + 1) if str(i) not in scalars]
    if missing:
        raise DurableCheckpointError(
            f"rank {strategy.rank}: the optimizer-scalar log lacks iterations {missing} needed to "
            f"replay window {ckpt.window} to iteration {last}; save right after "
            "after_optimizer_step()"
        )
    attached = getattr(strategy, "durable", None)
    merged = dict(getattr(attached, "metadata", None) or {})
    merged.update(metadata or {})
    popularity = None
    try:
        popularity = strategy.popularity.state_dict()
    except Exception:  # pragma: no cover - statistics are optional for replay
        popularity = None
    return RankPayload(
        rank=strategy.rank,
        world_size=strategy.world_size,
        iteration=last,
        checkpoint=ckpt,
        scalars=scalars,
        layout=current_layout(strategy).to_dict(),
        popularity=popularity,
        config=strategy.config.to_dict() if hasattr(strategy.config, "to_dict") else {},
        metadata=merged,
    )
