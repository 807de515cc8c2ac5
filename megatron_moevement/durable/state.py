"""A loaded durable sparse checkpoint, and handing it to the replay engine.

``dist_checkpointing.load`` returns a :class:`DurableSparseState` in place of the MoEvement
sharded object. :meth:`DurableSparseState.restore` turns it into a dense training state on a
freshly built job: it checks the layout, installs the optimizer-scalar log and the popularity
statistics, and runs ``MoEvementStrategy.rollback_and_replay`` (sparse-to-dense conversion, then
all-active replay up to the saved iteration).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from megatron_moevement.durable.layout import RankLayout, check_layout, current_layout
from megatron_moevement.logging_utils import get_logger
from megatron_moevement.snapshot.slots import SparseCheckpoint

logger = get_logger(__name__)


@dataclass
class DurableSparseState:
    """One rank's durable sparse checkpoint, loaded and checksum-verified."""

    path: str
    """The checkpoint directory it was read from."""
    checkpoint: SparseCheckpoint
    """The window's W slots (host buffers read from disk), ready for replay."""
    iteration: int
    """Last iteration the state can be replayed to (the optimizer scalars up to it are stored)."""
    scalars: dict
    """``ScalarLog.to_dict()`` entries of the window's iterations up to :attr:`iteration`."""
    layout: RankLayout
    """The layout of the rank that wrote it."""
    popularity: dict | None = None
    config: dict = field(default_factory=dict)
    """The writing job's ``MoEvementConfig`` fields."""
    metadata: dict = field(default_factory=dict)
    """Job metadata saved with it (e.g. the harness description the converter uses)."""

    @property
    def window_start(self) -> int:
        return self.checkpoint.start_iteration

    @property
    def window_end(self) -> int:
        """The iteration whose dense state the sparse-to-dense conversion alone reconstructs."""
        return self.checkpoint.start_iteration + self.checkpoint.window_size - 1

    def check_layout(self, strategy) -> None:
        """Raises :class:`~megatron_moevement.durable.errors.LayoutMismatchError` unless
        ``strategy``'s rank has the layout and model that wrote this state."""
        check_layout(self.layout, current_layout(strategy), self.path)

    def install(self, strategy) -> SparseCheckpoint:
        """Checks the layout and gives ``strategy`` what replay needs besides the slots (the
        optimizer-scalar log, popularity statistics and optimizer state to restore into).

        Returns:
            The sparse checkpoint to pass to ``strategy.rollback_and_replay(..., ckpt=...)``.
        """
        from megatron_moevement.state.optim_view import ensure_optimizer_state

        self.check_layout(strategy)
        ensure_optimizer_state(strategy.optimizer)
        strategy.registry.refresh()
        strategy.scalar_log.load_dict(self.scalars)
        if self.popularity:
            try:
                strategy.popularity.load_state_dict(self.popularity)
            except Exception as exc:  # statistics only steer future schedules
                logger.warning("durable: popularity statistics not restored: %s", exc)
        return self.checkpoint

    def restore(
        self,
        strategy,
        train_iteration: Callable[[int], object],
        target: int | None = None,
        resume: bool = True,
    ) -> dict:
        """Rebuilds the dense state of iteration ``target`` on ``strategy``'s model and optimizer.

        All ranks of the job call this together (replay runs the job's collectives).

        Args:
            strategy: A ``MoEvementStrategy`` built on the same layout and model configuration.
            train_iteration: ``f(iteration)`` running one training iteration with addressable
                data (e.g. ``HarnessTrainer.train_iteration``).
            target: Iteration to replay to, between :attr:`window_end` and :attr:`iteration`
                (default: :attr:`iteration`).
            resume: Make the loaded window the strategy's persisted checkpoint and start a new
                window at ``target + 1``, so training can continue with ``target + 1``.

        Returns:
            The replay report of ``rollback_and_replay``.
        """
        target = self.iteration if target is None else int(target)
        if not self.window_end <= target <= self.iteration:
            raise ValueError(
                f"target iteration {target} is outside what {self.path} can reconstruct: "
                f"{self.window_end} (end of window {self.checkpoint.window}) to "
                f"{self.iteration} (last iteration whose optimizer scalars were saved)"
            )
        ckpt = self.install(strategy)
        report = strategy.rollback_and_replay(target, train_iteration, ckpt=ckpt)
        if resume:
            strategy.resume_after_recovery(target, ckpt.window + 1, ckpt)
        logger.info(
            "durable: restored iteration %d from %s (window %d, %d iterations replayed)",
            target,
            self.path,
            ckpt.window,
            len(report.iterations_replayed),
        )
        return report
