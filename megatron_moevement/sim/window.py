"""Sparse checkpoint window and slot layout (paper Algorithm 1) and its replay cost shares.

``FindWindowSize`` (§3.5): order operators by ascending popularity (``OrderOperators``), then
try W = 1, 2, ...: split the ordered operators into W consecutive slots of roughly equal
full-state size; slot ``j`` is snapshotted in the ``j``-th iteration of the window with the
full state (master weights + optimizer) of its own operators and the compute weights of every
operator of the later slots (they are frozen at that point of a replay, Fig. 6). The first W
whose largest slot snapshot fits in the overlap window at the device-to-host bandwidth wins.

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
from megatron_moevement.sim.operators import StageOperators
from megatron_moevement.sim.specs import Precision

__all__ = ["SparseSchedule", "build_schedule", "find_window_size"]

logger = get_logger(__name__)


@dataclass(frozen=True)
class SparseSchedule:
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


def _slot_assignment(full_sorted: np.ndarray, window: int) -> np.ndarray:
    """Contiguous split into ``window`` slots of about equal full-state bytes."""
    total = full_sorted.sum()
    if total <= 0:
        return np.zeros(full_sorted.size, dtype=np.int64)
    midpoints = np.cumsum(full_sorted) - 0.5 * full_sorted
    return np.minimum(window - 1, np.floor(window * midpoints / total)).astype(np.int64)


def build_schedule(
    ops: StageOperators,
    window: int,
    precision: Precision,
    shard_divisor: float,
    snapshot_bandwidth: float,
    budget_s: float,
    by_popularity: bool = True,
    skip_frozen_weight_grad: bool = True,
) -> SparseSchedule:
    """Lays out the slots of a window of size ``window`` for one stage.

    Args:
        ops: The stage's operators.
        window: Window size W >= 1.
        precision: Bytes per parameter of each state part.
        shard_divisor: GPUs sharing the stage's snapshot work evenly (``tp * ep * dp``).
        snapshot_bandwidth: Device-to-host bandwidth per GPU (bytes/s).
        budget_s: Overlap window of one iteration (s).
        by_popularity: Order by ascending popularity (False: model order).
        skip_frozen_weight_grad: Frozen operators skip weight-gradient and optimizer work
            (False models a replay without that optimization: every share is 1).

    Returns:
        The schedule.
    """
    order = _order(ops, by_popularity)
    full = ops.params[order] * precision.full_state_bytes / shard_divisor
    compute = ops.params[order] * precision.compute_weight_bytes / shard_divisor
    slot_sorted = _slot_assignment(full, window)
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
    return SparseSchedule(
        window=window,
        slot_of_operator=slot_of_operator,
        slot_bytes=slot_bytes,
        weight_grad_share=weight_grad_share,
        param_share=param_share,
        snapshot_bandwidth=snapshot_bandwidth,
        budget_s=budget_s,
    )


def find_window_size(
    stages: Sequence[StageOperators],
    precision: Precision,
    shard_divisor: float,
    snapshot_bandwidth: float,
    budget_s: float,
    max_window: int = 256,
    by_popularity: bool = True,
    skip_frozen_weight_grad: bool = True,
    fixed_window: Optional[int] = None,
) -> List[SparseSchedule]:
    """Algorithm 1's ``FindWindowSize`` for a whole pipeline: one W shared by all stages.

    Each stage's smallest fitting W is found; the job uses the largest of them (a larger window
    only shrinks the other stages' slots). When no W up to ``max_window`` fits, the W with the
    smallest largest-slot snapshot is used and training stalls; that is logged.

    Args:
        stages: Operators of every stage.
        precision: Bytes per parameter of each state part.
        shard_divisor: GPUs sharing one stage's snapshot work (``tp * ep * dp``).
        snapshot_bandwidth: Device-to-host bandwidth per GPU (bytes/s).
        budget_s: Overlap window of one iteration (s).
        max_window: Largest W tried.
        by_popularity: Ascending-popularity operator order (the paper's default).
        skip_frozen_weight_grad: See :func:`build_schedule`.
        fixed_window: Use this W instead of searching.

    Returns:
        One schedule per stage, all with the same W.
    """

    def schedule(ops: StageOperators, w: int) -> SparseSchedule:
        return build_schedule(
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
        return [schedule(ops, fixed_window) for ops in stages]
    job_window = 1
    for ops in stages:
        limit = max(1, min(max_window, ops.num_operators))
        best_w, best_s = 1, float("inf")
        chosen = None
        for w in range(1, limit + 1):
            sched = schedule(ops, w)
            if sched.fits:
                chosen = w
                break
            if sched.max_slot_s < best_s - 1e-12:
                best_w, best_s = w, sched.max_slot_s
        if chosen is None:
            logger.warning(
                "stage %d: no sparse window up to W=%d fits in %.3fs; using W=%d, whose largest "
                "slot takes %.3fs (training stalls)",
                ops.stage,
                limit,
                budget_s,
                best_w,
                best_s,
            )
            chosen = best_w
        job_window = max(job_window, chosen)
    return [schedule(ops, job_window) for ops in stages]
