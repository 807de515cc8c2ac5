"""Gemini-like baseline: dense in-memory snapshots every k iterations, global rollback.

Every ``interval`` iterations, after the optimizer step, the full state of every operator (FP32
main parameters, optimizer moments and step, compute weights) is copied to host memory and
replicated to peers — MoEvement's engine with a one-slot window, taken only at checkpoint
iterations. Recovery rolls *every* rank back to the newest dense snapshot persisted everywhere and
retrains from there with ordinary training iterations (no frozen operators, no logged scalars,
no upstream logs): the work since the snapshot is recomputed by the whole pipeline. Because the
snapshot is a consistent dense state and training is deterministic, the recovered run is
bitwise equal to a fault-free one.
"""

from __future__ import annotations

from megatron_moevement.baselines.base import BaselineStrategy
from megatron_moevement.replay.frozen import SlotLoader, default_operator_groups, restore_scaler_state
from megatron_moevement.logging_utils import get_logger

__all__ = ["DenseSnapshotStrategy"]

logger = get_logger(__name__)


class DenseSnapshotStrategy(BaselineStrategy):
    """Dense in-memory checkpointing every ``baseline.interval`` iterations (Gemini-like).

    Constructed like :class:`~megatron_moevement.baselines.base.BaselineStrategy` (``baseline``
    holds the policy).
    """

    name = "gemini"

    def is_checkpoint_iteration(self, iteration: int) -> bool:
        """True when a dense snapshot follows ``iteration``'s optimizer step."""
        return iteration % self.baseline.interval == 0

    def _capture_slot(self, iteration: int) -> None:
        if not self.is_checkpoint_iteration(iteration):
            return
        super()._capture_slot(iteration)  # a one-slot window: every operator with full state

    def rollback_and_replay(self, target_iteration: int, train_iteration, ckpt=None) -> dict:
        """Restores the dense snapshot ``ckpt`` (default: the persisted one) and retrains every
        iteration after it up to ``target_iteration`` with ordinary training iterations.

        All ranks must call this together (the restore broadcasts between data-parallel
        replicas and retraining runs the whole pipeline).
        """
        ckpt = ckpt or self.persisted_checkpoint
        if ckpt is None:
            raise RuntimeError(
                "no persisted dense snapshot to roll back to (a failure before the "
                "first snapshot was replicated); restart from the durable tier"
            )
        self.flush()
        loader = SlotLoader(
            self.registry, self.shard_plan, self.sharding, default_operator_groups()
        )
        loader.apply(ckpt, 0)
        start = ckpt.start_iteration
        if start + 1 in self.scalar_log:
            # The fp16 loss scaler's state after the snapshot's step (a no-op for bf16/fp32).
            restore_scaler_state(self.optimizer, self.scalar_log.get(start + 1))
        retrained = list(range(start + 1, target_iteration + 1))
        self._replaying = True  # the original run already counted these tokens' popularity
        try:
            for iteration in retrained:
                train_iteration(iteration)
        finally:
            self._replaying = False
        report = dict(
            window=ckpt.generation,
            window_start=start,
            window_size=1,
            target_iteration=target_iteration,
            iterations_replayed=retrained,
            frozen_operators={it: 0 for it in retrained},
        )
        self.replay_reports.append(report)
        logger.info(
            "dense rollback to the snapshot of iteration %d, retrained %s", start, retrained
        )
        return report

    def stats(self) -> dict:
        """Policy facts for reports: interval, snapshots taken and their bytes."""
        return dict(
            super().stats(), strategy=self.name, interval=self.baseline.interval, window_size=1
        )
