"""The durable tier as the last fallback of in-job recovery.

:class:`DurableTierLoader` implements ``recovery.DurableCheckpointLoader``: when a failed rank's
sparse checkpoint has no surviving peer replica, ``RecoveryDriver`` calls it on every rank and
rolls back to the window it returns::

    driver = RecoveryDriver(ctx, build, config=config,
                            durable_loader=DurableTierLoader(config.durable_dir,
                                                             strategy_of=lambda: driver.strategy))

It reads this rank's file set of the newest complete checkpoint under the durable directory
(checksums verified), checks the parallel layout, and merges the checkpoint's optimizer-scalar log
into the current strategy's, since replay from an older window needs scalars that the survivors'
in-memory logs may already have dropped.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from megatron_moevement.durable.errors import LayoutMismatchError
from megatron_moevement.durable.files import latest_checkpoint
from megatron_moevement.durable.reader import read_rank
from megatron_moevement.durable.state import DurableSparseState
from megatron_moevement.logging_utils import get_logger
from megatron_moevement.snapshot.slots import SparseCheckpoint

logger = get_logger(__name__)

_SIZES = ("tp", "pp", "dp", "ep")


class DurableTierLoader:
    """``loader(rank, layout) -> SparseCheckpoint | None`` over a durable directory.

    Args:
        durable_dir: The durable directory (``MoEvementConfig.durable_dir``) or one checkpoint.
        strategy_of: Returns the current ``MoEvementStrategy`` (looked up at call time, since
            recovery rebuilds it); its scalar log receives the checkpoint's entries.
    """

    def __init__(
        self, durable_dir: str | os.PathLike, strategy_of: Callable[[], Any] | None = None
    ) -> None:
        self.durable_dir = durable_dir
        self.strategy_of = strategy_of
        self.last_state: DurableSparseState | None = None
        """The state read by the last call (for reports and tests)."""

    def __call__(self, rank: int, layout: Any = None) -> SparseCheckpoint | None:
        path = latest_checkpoint(self.durable_dir)
        if path is None:
            logger.warning("durable tier: no complete checkpoint under %s", self.durable_dir)
            return None
        state = read_rank(path, rank)
        if layout is not None:
            saved = state.layout
            diffs = [
                f"{k} {getattr(saved, k)} != {getattr(layout, k)}"
                for k in _SIZES
                if hasattr(layout, k) and getattr(saved, k) != getattr(layout, k)
            ]
            if diffs:
                raise LayoutMismatchError(
                    f"durable checkpoint {path} was written by a job with {saved.describe()}, "
                    f"this job runs {layout}: {'; '.join(diffs)}. Fix: restart on the layout "
                    "that wrote it."
                )
        strategy = self.strategy_of() if self.strategy_of is not None else None
        if strategy is not None:
            strategy.scalar_log.load_dict(state.scalars)
        self.last_state = state
        logger.info(
            "durable tier: rank %d loaded window %d (iterations %d..%d) from %s",
            rank,
            state.checkpoint.window,
            state.window_start,
            state.iteration,
            path,
        )
        return state.checkpoint
