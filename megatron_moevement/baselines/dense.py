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
from megatron_moevement.baselines.config import BaselineConfig
from megatron_moevement.logging_utils import get_logger
from megatron_moevement.policy import SparseWindowPolicy
from megatron_moevement.replay.engine import ReplayReport
from megatron_moevement.replay.scalar_log import restore_scaler_state

__all__ = ["DenseSnapshotPolicy", "DenseSnapshotStrategy"]

logger = get_logger(__name__)


class DenseSnapshotPolicy(SparseWindowPolicy):
    """A dense snapshot (a one-slot window: every operator with full state) every
    ``baseline.interval`` iterations; recovery restores it and retrains.

    Args:
        baseline: The policy's settings (``interval``).
    """

    name = "gemini"

    def __init__(self, baseline: BaselineConfig) -> None:
        super().__init__()
        self.baseline = baseline

    def is_checkpoint_iteration(self, iteration: int) -> bool:
        """True when a dense snapshot follows ``iteration``'s optimizer step."""
        return iteration % self.baseline.interval == 0

    def after_step(self, iteration: int) -> None:
        if self.is_checkpoint_iteration(iteration):
            self.capture(iteration)  # a one-slot window: every operator with full state

    def restore(self, target_iteration, train_iteration, ckpt=None) -> ReplayReport:
        """Restores the dense snapshot ``ckpt`` (default: the persisted one) and retrains every
        iteration after it up to ``target_iteration`` with ordinary training iterations.

        All ranks must call this together (the restore broadcasts between data-parallel
        replicas and retraining runs the whole pipeline).
        """
        s = self.strategy
        ckpt = ckpt or s.persisted_checkpoint
        if ckpt is None:
            raise RuntimeError(
                "no persisted dense snapshot to roll back to (a failure before the "
                "first snapshot was replicated); restart from the durable tier"
            )
        s.flush()
        s.replay.loader().apply(ckpt, 0)
        start = ckpt.start_iteration
        if start + 1 in s.scalar_log:
            # The fp16 loss scaler's state after the snapshot's step (a no-op for bf16/fp32).
            restore_scaler_state(s.optimizer, s.scalar_log.get(start + 1))
        report = s.replay.retrain(ckpt.window, start, target_iteration, train_iteration)
        logger.info(
            "dense rollback to the snapshot of iteration %d, retrained %s",
            start,
            report.iterations_replayed,
        )
        return report

    def stats(self) -> dict:
        return dict(super().stats(), interval=self.baseline.interval, window_size=1)


class DenseSnapshotStrategy(BaselineStrategy):
    """Dense in-memory checkpointing every ``baseline.interval`` iterations (Gemini-like).

    Constructed like :class:`~megatron_moevement.baselines.base.BaselineStrategy` (``baseline``
    holds the policy's settings).
    """

    name = "gemini"

    def make_policy(self, baseline: BaselineConfig) -> DenseSnapshotPolicy:
        return DenseSnapshotPolicy(baseline)
