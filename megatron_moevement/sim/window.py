"""The simulator's view of Algorithm 1: a stage's window, slot bytes and replay cost shares.

The window size and the slot cut are Algorithm 1 as the strategy runs it
(:mod:`megatron_moevement.schedule.window`: the smallest W whose every slot fits the overlap
budget, slices cut so that the largest slot is smallest). What the simulator adds is its cost
model: operator sizes from the model spec and precision (per GPU of the stage), the popularity
order of :class:`~megatron_moevement.sim.operators.StageOperators`, and the share of the stage's
weight-gradient and optimizer work that is active in each replayed iteration.

For the sparse-to-dense conversion (§3.3) the ``j``-th replayed iteration has slots ``1..j``
active; active operators do weight-gradient and optimizer work, frozen ones do not. Ordering by
popularity puts rarely used experts first, so the heavily used operators (popular experts,
attention, gates — every token passes through those) stay frozen longest and the early replays
are cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from megatron_moevement.logging_utils import get_logger
from megatron_moevement.schedule.window import (
    SlotCost,
    balanced_slices,
    least_stall_window,
    smallest_window,
)
from megatron_moevement.sim.operators import StageOperators
from megatron_moevement.sim.specs import Precision

__all__ = ["StageWindow", "job_windows", "stage_window"]

logger = get_logger(__name__)


@dataclass(frozen=True)
class StageWindow:
    """Slot layout of one stage for a given window W (per GPU of the stage)."""

    window: int
    """Window size W (iterations per sparse checkpoint)."""

    slot_of_operator: np.ndarray
    """0-based slot of each operator, in the stage's operator order."""

    slot_bytes: np.ndarray
    """Bytes one GPU snapshots in each iteration (slot) of the window, shape (W,)."""

    weight_grad_share: np.ndarray
    """Share of the stage's weight-gradient work that is active in replay step j, shape (W,)."""

    param_share: np.ndarray
    """Share of the stage's parameters active in replay step j, shape (W,)."""

    snapshot_bandwidth: float
    """Bandwidth used to size the window (bytes/s)."""

    budget_s: float
    """Time a slot snapshot may take without stalling (s)."""

    @property
    def max_slot_s(self) -> float:
        """Snapshot time of the largest slot (s)."""
        return float(self.slot_bytes.max()) / self.snapshot_bandwidth

    @property
    def fits(self) -> bool:
        """True when every slot's snapshot overlaps fully with training."""
        return self.max_slot_s <= self.budget_s * (1 + 1e-12)

    @property
    def mean_slot_bytes(self) -> float:
        """Average bytes snapshotted per iteration."""
        return float(self.slot_bytes.mean())

    @property
    def window_bytes(self) -> float:
        """Bytes of one complete sparse checkpoint (all W slots) per GPU."""
        return float(self.slot_bytes.sum())


def _order(ops: StageOperators, by_popularity: bool) -> np.ndarray:
    if by_popularity:
        return np.argsort(ops.activation, kind="stable")
    return np.arange(ops.num_operators)


def _sizes(
    ops: StageOperators, precision: Precision, shard_divisor: float, by_popularity: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Snapshot order, and full-state and compute-weight bytes per GPU in that order."""
    order = _order(ops, by_popularity)
    full = ops.params[order] * precision.full_state_bytes / shard_divisor
    compute = ops.params[order] * precision.compute_weight_bytes / shard_divisor
    return order, full, compute


def _slot_cost(full: np.ndarray, compute: np.ndarray) -> SlotCost:
    # Algorithm 1 works on whole bytes; per-GPU sizes are rounded (an error of < 1 byte each).
    return SlotCost(
        np.rint(full).astype(np.int64).tolist(), np.rint(compute).astype(np.int64).tolist()
    )


def stage_window(
    ops: StageOperators,
    window: int,
    precision: Precision,
    shard_divisor: float,
    snapshot_bandwidth: float,
    budget_s: float,
    by_popularity: bool = True,
    skip_frozen_weight_grad: bool = True,
) -> StageWindow:
    """Lays out the slots of a window of size ``window`` for one stage (Algorithm 1's cut).

    Args:
        ops: The stage's operators.
        window: Window size W >= 1 (slots beyond the stage's operator count stay empty).
        precision: Bytes per parameter of each state part.
        shard_divisor: GPUs sharing the stage's snapshot work evenly (``tp * ep * dp``).
        snapshot_bandwidth: Device-to-host bandwidth per GPU (bytes/s).
        budget_s: Overlap window of one iteration (s).
        by_popularity: Order by ascending popularity (False: model order).
        skip_frozen_weight_grad: Frozen operators skip weight-gradient and optimizer work
            (False models a replay without that optimization: every share is 1).

    Returns:
        The stage's window.
    """
    order, full, compute = _sizes(ops, precision, shard_divisor, by_popularity)
    window = max(1, int(window))
    # A stage with fewer operators than the job's W leaves its last slots empty.
    n = ops.num_operators
    bounds = balanced_slices(_slot_cost(full, compute), min(window, n)) if n else []
    slot_sorted = np.empty(ops.num_operators, dtype=np.int64)
    for k, (p, q) in enumerate(bounds):
        slot_sorted[p : q + 1] = k
    slot_full = np.bincount(slot_sorted, weights=full, minlength=window)
    slot_cw = np.bincount(slot_sorted, weights=compute, minlength=window)
    later_cw = compute.sum() - np.cumsum(slot_cw)  # compute weights of the frozen later slots
    slot_bytes = slot_full + later_cw

    slot_of_operator = np.empty(ops.num_operators, dtype=np.int64)
    slot_of_operator[order] = slot_sorted
    if skip_frozen_weight_grad:
        wg = np.bincount(slot_sorted, weights=ops.wgrad_work[order], minlength=window)
        pr = np.bincount(slot_sorted, weights=ops.params[order], minlength=window)
        wg_total = wg.sum() or 1.0
        pr_total = pr.sum() or 1.0
        weight_grad_share = np.cumsum(wg) / wg_total
        param_share = np.cumsum(pr) / pr_total
    else:
        weight_grad_share = np.ones(window)
        param_share = np.ones(window)
    return StageWindow(
        window=window,
        slot_of_operator=slot_of_operator,
        slot_bytes=slot_bytes,
        weight_grad_share=weight_grad_share,
        param_share=param_share,
        snapshot_bandwidth=snapshot_bandwidth,
        budget_s=budget_s,
    )


def job_windows(
    stages: Sequence[StageOperators],
    precision: Precision,
    shard_divisor: float,
    snapshot_bandwidth: float,
    budget_s: float,
    max_window: int = 256,
    by_popularity: bool = True,
    skip_frozen_weight_grad: bool = True,
    fixed_window: Optional[int] = None,
) -> List[StageWindow]:
    """Algorithm 1's ``FindWindowSize`` for a whole pipeline: one W shared by all stages.

    Each stage's smallest fitting W is found; the job uses the largest of them (a larger window
    only shrinks the other stages' slots). When no W up to ``max_window`` fits a stage, that
    stage asks for the smallest W whose largest slot is as small as any cut allows
    (:func:`~megatron_moevement.schedule.window.least_stall_window`) and training stalls; that is
    logged.

    Args:
        stages: Operators of every stage.
        precision: Bytes per parameter of each state part.
        shard_divisor: GPUs sharing one stage's snapshot work (``tp * ep * dp``).
        snapshot_bandwidth: Device-to-host bandwidth per GPU (bytes/s).
        budget_s: Overlap window of one iteration (s).
        max_window: Largest W tried.
        by_popularity: Ascending-popularity operator order (the paper's default).
        skip_frozen_weight_grad: See :func:`stage_window`.
        fixed_window: Use this W instead of searching.

    Returns:
        One window per stage, all with the same W.
    """

    def window_of(ops: StageOperators, w: int) -> StageWindow:
        return stage_window(
            ops,
            w,
            precision,
            shard_divisor,
            snapshot_bandwidth,
            budget_s,
            by_popularity,
            skip_frozen_weight_grad,
        )

    if fixed_window is not None:
        return [window_of(ops, fixed_window) for ops in stages]
    job_window = 1
    for ops in stages:
        if ops.num_operators == 0:
            continue  # nothing to snapshot on this stage
        limit = max(1, min(max_window, ops.num_operators))
        _, full, compute = _sizes(ops, precision, shard_divisor, by_popularity)
        cost = _slot_cost(full, compute)
        chosen = smallest_window(cost, budget_s * snapshot_bandwidth)
        # Rounding to whole bytes may let a cut pass that the exact sizes miss by a byte.
        while chosen is not None and chosen <= limit and not window_of(ops, chosen).fits:
            chosen = chosen + 1 if chosen < limit else None
        if chosen is None or chosen > limit:
            chosen = min(limit, least_stall_window(cost))
            worst = window_of(ops, chosen)
            logger.warning(
                "stage %d: no sparse window up to W=%d fits in %.3fs; using W=%d, whose largest "
                "slot takes %.3fs (training stalls)",
                ops.stage,
                limit,
                budget_s,
                chosen,
                worst.max_slot_s,
            )
        job_window = max(job_window, chosen)
    return [window_of(ops, job_window) for ops in stages]
