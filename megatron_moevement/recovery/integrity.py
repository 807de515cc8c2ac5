"""What of a rank's in-memory recovery state is intact, checked before a recovery is planned.

Host memory can be corrupted between a snapshot and its use. Before the ranks agree on a plan,
each one recomputes the checksums of what it holds — its own sparse checkpoints, the replicas it
keeps for its peers, its upstream log — and reports only what verified. The planner then takes
the next tier for whatever is corrupted: another replica holder or the durable tier / initial
state for a checkpoint, global rollback for a corrupted upstream log. Every corruption found is
logged with where it was (tier, rank, window, slot or log entry).
"""

from __future__ import annotations

from megatron_moevement.logging_utils import get_logger
from megatron_moevement.snapshot.checksum import SnapshotChecksumError
from megatron_moevement.upstream.log import UpstreamLogError

logger = get_logger(__name__)


def _slots_intact(slots, what: str) -> bool:
    for slot in slots:
        if slot is None:
            return False
        try:
            slot.verify()
        except SnapshotChecksumError as exc:
            logger.error("corrupted %s: %s", what, exc)
            return False
    return True


def intact_windows(checkpoints, rank: int) -> list[int]:
    """Windows of this rank's own sparse checkpoints whose captured slots all verify."""
    windows = []
    for ckpt in checkpoints:
        captured = [s for s in ckpt.slots if s is not None]
        if _slots_intact(
            captured, f"local sparse checkpoint of rank {rank} (window {ckpt.window})"
        ):
            windows.append(ckpt.window)
        else:
            logger.error(
                "rank %d: its own checkpoint of window %d is corrupted; a peer replica (or the "
                "next tier) will be used instead",
                rank,
                ckpt.window,
            )
    return windows


def corrupted_replicas(replicator, rank: int) -> list[tuple[int, int]]:
    """``(source rank, window)`` of the complete replicas this rank holds that fail to verify."""
    bad = []
    for source, store in sorted(replicator.replicas.items()):
        for window, slots in sorted(store.windows.items()):
            if any(s is None for s in slots):
                continue  # incomplete (in flight): never used for a recovery
            what = f"peer replica of rank {source} (window {window}) held by rank {rank}"
            if not _slots_intact(slots, what):
                bad.append((source, window))
    return bad


def upstream_log_intact(upstream_log, rank: int) -> bool:
    """True when every entry of this rank's upstream log verifies (or it keeps none)."""
    if upstream_log is None:
        return True
    try:
        upstream_log.verify()
    except UpstreamLogError as exc:
        logger.error("rank %d: corrupted upstream log: %s", rank, exc)
        return False
    return True
