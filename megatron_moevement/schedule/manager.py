"""The schedule in effect, changed only at window boundaries (:class:`ScheduleManager`).

:class:`ScheduleManager` holds the current :class:`~.sparse_schedule.SparseSchedule`, maps
iterations to slots and changes the schedule only at window boundaries: when the popularity
reorder trigger fires or, for ``window_size="auto"``, when new measurements change ``W``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import torch

from megatron_moevement.config import MoEvementConfig
from megatron_moevement.logging_utils import get_logger
from megatron_moevement.schedule.order import order_operators
from megatron_moevement.schedule.popularity import (
    ExpertPopularity,
    LayerScores,
    count_drifted_experts,
    get_ordering_policy,
    should_reorder,
)
from megatron_moevement.schedule.sparse_schedule import SparseSchedule, build_schedule
from megatron_moevement.schedule.window import (
    OperatorLike,
    ScheduleError,
    WindowSizeError,
    find_window_size,
    is_int,
    least_stall_window_size,
    positive,
    validate_operators,
)

logger = get_logger(__name__)


SHRINK_HEADROOM = 0.10
"""Fraction of the iteration a smaller auto window must leave free before W shrinks."""

GROW_TOLERANCE = 0.10
"""Fraction by which the current auto window's largest slot may overrun the slot budget before W
grows. Every change of W costs new host buffers (faulted in on first use) and new replica
buffers on the peers; without it, measurement noise near a boundary moved W back and forth."""


@dataclass(frozen=True)
class SlotAssignment:
    """The schedule slot that one training iteration snapshots."""

    iteration: int
    """Training iteration."""
    window_start: int
    """First iteration of the window containing ``iteration``."""
    slot: int
    """Slot index ``iteration - window_start`` in ``[0, W)``."""
    schedule: SparseSchedule
    """Schedule in effect for the whole window."""

    @property
    def full_state(self) -> List[str]:
        """Operators whose full state is snapshotted in this iteration."""
        return self.schedule.full_state_operators(self.slot)

    @property
    def compute_only(self) -> List[str]:
        """Operators whose compute weights only are snapshotted in this iteration."""
        return self.schedule.compute_only_operators(self.slot)

    @property
    def is_window_start(self) -> bool:
        """True for the first slot of a window."""
        return self.slot == 0

    @property
    def is_window_end(self) -> bool:
        """True for the last slot: after it the sparse checkpoint is complete."""
        return self.slot == self.schedule.window_size - 1


@dataclass
class _ManagerState:
    window_start: int
    reference_scores: Optional[LayerScores] = None
    measurements_dirty: bool = False
    last_iteration: Optional[int] = None
    history: List[Tuple[int, int, str]] = field(default_factory=list)


class ScheduleManager:
    """Holds the current schedule and changes it only at window boundaries.

    Call :meth:`slot_for_iteration` once per iteration (after the optimizer step, before the
    snapshot). When an iteration starts a new window, the manager first takes a popularity
    snapshot (the only host sync, once per window), applies the reorder trigger
    (:func:`~megatron_moevement.schedule.popularity.should_reorder` with the config's threshold and
    fraction) and, for ``window_size="auto"``, recomputes W from the latest measurements (with
    hysteresis, see :data:`SHRINK_HEADROOM`). The schedule is rebuilt only if the order or W
    changed.

    Every rank that must share window boundaries has to call :meth:`update_measurements` and
    :meth:`slot_for_iteration` in lockstep (same iterations): the popularity all-reduce and
    ``agree_window_size`` are collectives.

    Args:
        operators: Operators of this rank.
        config: The MoEvement configuration (window policy, ordering, reorder trigger, budget).
        popularity: Router statistics tracker; ``None`` keeps the initial order forever.
        iteration_time_s: Overrides ``config.iteration_time_s``.
        d2h_bandwidth_bytes_per_s: Overrides ``config.d2h_bandwidth_bytes_per_s``.
        start_iteration: First iteration of the first window.
        include_compute_in_full_slot: See the :mod:`scheduler` module docstring.
        agree_window_size: See :func:`build_schedule`.
        popularity_group: Process group over which popularity statistics are summed before
            ordering (see :meth:`ExpertPopularity.snapshot`).
    """

    def __init__(
        self,
        operators: Sequence[OperatorLike],
        config: MoEvementConfig,
        popularity: Optional[ExpertPopularity] = None,
        *,
        iteration_time_s: Optional[float] = None,
        d2h_bandwidth_bytes_per_s: Optional[float] = None,
        start_iteration: int = 0,
        include_compute_in_full_slot: bool = False,
        agree_window_size: Optional[Callable[[int], int]] = None,
        popularity_group: Any = None,
    ) -> None:
        if not isinstance(config, MoEvementConfig):
            raise ScheduleError(f"config must be a MoEvementConfig, got {type(config).__name__}.")
        self._operators = validate_operators(operators)
        self._config = config
        self._popularity = popularity
        self._policy = get_ordering_policy(config.ordering)
        self._iteration_time_s = (
            iteration_time_s if iteration_time_s is not None else config.iteration_time_s
        )
        self._bandwidth = (
            d2h_bandwidth_bytes_per_s
            if d2h_bandwidth_bytes_per_s is not None
            else config.d2h_bandwidth_bytes_per_s
        )
        self._include_compute = include_compute_in_full_slot
        self._agree = agree_window_size
        self._group = popularity_group
        if not is_int(start_iteration) or start_iteration < 0:
            raise ScheduleError(f"start_iteration={start_iteration!r} must be an int >= 0.")
        self._state = _ManagerState(window_start=int(start_iteration))
        self._order: List[OperatorLike] = order_operators(self._operators, None, self._policy)
        self._schedule = self._build(self._order, 0, config.window_size, agree=True)
        self._state.history.append((self._state.window_start, 0, "initial"))
        logger.info("Initial sparse schedule:\n%s", self._schedule.describe())

    # ------------------------------------------------------------------ public API

    @property
    def schedule(self) -> SparseSchedule:
        """The schedule of the current window."""
        return self._schedule

    @property
    def window_start(self) -> int:
        """First iteration of the current window."""
        return self._state.window_start

    @property
    def history(self) -> List[Tuple[int, int, str]]:
        """``(window_start, schedule version, reason)`` for every schedule change, oldest first."""
        return list(self._state.history)

    def update_measurements(
        self,
        iteration_time_s: Optional[float] = None,
        d2h_bandwidth_bytes_per_s: Optional[float] = None,
    ) -> None:
        """Records new measurements; they take effect at the next window boundary."""
        if iteration_time_s is not None:
            self._iteration_time_s = positive(
                "iteration_time_s", iteration_time_s, "pass seconds > 0"
            )
            self._state.measurements_dirty = True
        if d2h_bandwidth_bytes_per_s is not None:
            self._bandwidth = positive(
                "d2h_bandwidth_bytes_per_s", d2h_bandwidth_bytes_per_s, "pass bytes/s > 0"
            )
            self._state.measurements_dirty = True

    def is_window_boundary(self, iteration: int) -> bool:
        """True when ``iteration`` would start a new window (given the current schedule)."""
        return iteration >= self._state.window_start + self._schedule.window_size

    def slot_for_iteration(self, iteration: int) -> SlotAssignment:
        """Returns the slot ``iteration`` snapshots, advancing windows (and maybe the schedule).

        Iterations must not go backwards; repeated calls for the same iteration return the same
        assignment. Skipped iterations advance whole windows.

        Raises:
            ScheduleError: when ``iteration`` precedes the current window (after a rollback,
                restore the manager with :meth:`load_state_dict` first).
        """
        if not is_int(iteration):
            raise ScheduleError(f"iteration={iteration!r} must be an int.")
        iteration = int(iteration)
        if iteration < self._state.window_start:
            raise ScheduleError(
                f"Iteration {iteration} precedes the current window (starting at "
                f"{self._state.window_start}). Fix: after a rollback, restore the manager state "
                "saved with the sparse checkpoint (load_state_dict) before replaying."
            )
        if self.is_window_boundary(iteration):
            w = self._schedule.window_size
            elapsed = (iteration - self._state.window_start) // w
            self._on_window_boundary(self._state.window_start + elapsed * w)
        self._state.last_iteration = iteration
        return SlotAssignment(
            iteration=iteration,
            window_start=self._state.window_start,
            slot=iteration - self._state.window_start,
            schedule=self._schedule,
        )

    def state_dict(self) -> Dict[str, Any]:
        """JSON-serializable state (schedule, window start, reorder reference)."""
        ref = self._state.reference_scores
        return {
            "schedule": self._schedule.to_dict(),
            "window_start": self._state.window_start,
            "reference_scores": (
                None if ref is None else {int(k): v.tolist() for k, v in ref.items()}
            ),
            "iteration_time_s": self._iteration_time_s,
            "d2h_bandwidth_bytes_per_s": self._bandwidth,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores :meth:`state_dict` output (e.g. after a rollback to a sparse checkpoint).

        Raises:
            ScheduleError: when the saved schedule does not cover this rank's operators.
        """
        schedule = SparseSchedule.from_dict(state["schedule"])
        schedule.validate(self._operators)
        by_name = {op.name: op for op in self._operators}
        self._schedule = schedule
        self._order = [by_name[n] for n in schedule.order]
        ref = state.get("reference_scores")
        self._state = _ManagerState(
            window_start=int(state["window_start"]),
            reference_scores=(
                None
                if ref is None
                else {int(k): torch.tensor(v, dtype=torch.float64) for k, v in ref.items()}
            ),
            history=[(int(state["window_start"]), schedule.version, "restored")],
        )
        self._iteration_time_s = state.get("iteration_time_s", self._iteration_time_s)
        self._bandwidth = state.get("d2h_bandwidth_bytes_per_s", self._bandwidth)

    # ------------------------------------------------------------------ internals

    def _build(
        self,
        ordered: List[OperatorLike],
        version: int,
        window_size: Union[int, str],
        agree: bool,
    ) -> SparseSchedule:
        return build_schedule(
            ordered,
            policy=self._policy,
            window_size=window_size,
            iteration_time_s=self._iteration_time_s,
            d2h_bandwidth_bytes_per_s=self._bandwidth,
            include_compute_in_full_slot=self._include_compute,
            host_memory_budget_bytes=self._config.host_memory_budget_bytes,
            replication_factor=self._config.replication_factor,
            agree_window_size=self._agree if agree else None,
            version=version,
            ordered=True,
        )

    def _auto_window_size(self, order: List[OperatorLike], current: int) -> int:
        """W for the latest measurements, with hysteresis, agreed across ranks.

        Growing needs the current window to overrun the budget by more than
        :data:`GROW_TOLERANCE`; shrinking requires the smaller window to fit with
        :data:`SHRINK_HEADROOM` to spare, so that noisy measurements do not flip W at boundaries. When no window fits, training is not
        failed on what may be a transient measurement: the window with the least stall per
        iteration is run (or the current one, when it is already wider), and the stall is logged.
        """
        try:
            w = find_window_size(
                order,
                self._iteration_time_s,
                self._bandwidth,
                include_compute_in_full_slot=self._include_compute,
            )
        except WindowSizeError as exc:
            # Keeping a narrower current window (W=1 chosen before any iteration was measured,
            # say) would copy more per iteration than the least-stall cut.
            w = max(
                current,
                least_stall_window_size(order, include_compute_in_full_slot=self._include_compute),
            )
            logger.warning("%s Running W=%d (the least stall per iteration) for now.", exc, w)
        if w > current:
            try:
                w_tolerated = find_window_size(
                    order,
                    self._iteration_time_s * (1.0 + GROW_TOLERANCE),
                    self._bandwidth,
                    include_compute_in_full_slot=self._include_compute,
                )
            except WindowSizeError:
                w_tolerated = w
            w = max(current, w_tolerated)
        if w < current:
            try:
                w_margin = find_window_size(
                    order,
                    self._iteration_time_s * (1.0 - SHRINK_HEADROOM),
                    self._bandwidth,
                    include_compute_in_full_slot=self._include_compute,
                )
            except WindowSizeError:
                w_margin = current
            w = min(current, max(w, w_margin))
        if self._agree is not None:  # every rank calls it at the same boundaries
            agreed = self._agree(w)
            if not is_int(agreed) or agreed < w:
                raise ScheduleError(
                    f"agree_window_size returned {agreed!r} for a local W of {w}; it must return "
                    "an int >= the local W (e.g. the maximum over the ranks)."
                )
            w = int(agreed)
        return min(w, len(order))

    def _on_window_boundary(self, boundary: int) -> None:
        reasons = []
        new_order = self._order
        if self._popularity is not None:
            snapshot = self._popularity.snapshot(self._group)
            if snapshot.counts:
                new_scores = self._policy.scores(snapshot)
                cfg = self._config
                ref = self._state.reference_scores
                if should_reorder(ref, new_scores, cfg.reorder_threshold, cfg.reorder_fraction):
                    drifted, total = count_drifted_experts(ref, new_scores, cfg.reorder_threshold)
                    self._state.reference_scores = new_scores
                    candidate = order_operators(self._operators, new_scores)
                    if [op.name for op in candidate] != [op.name for op in self._order]:
                        new_order = candidate
                        reasons.append(f"popularity drift ({drifted}/{total} experts)")
                    else:
                        logger.debug("Reorder trigger fired at %d; order unchanged", boundary)
        current_w = self._schedule.window_size
        target_w = current_w
        if self._config.auto_window and self._state.measurements_dirty:
            self._state.measurements_dirty = False
            target_w = self._auto_window_size(new_order, current_w)
            if target_w != current_w:
                reasons.append(f"window size {current_w} -> {target_w}")
        self._state.window_start = boundary
        if not reasons:
            return
        self._order = new_order
        version = self._schedule.version + 1
        self._schedule = self._build(new_order, version, target_w, agree=False)
        self._state.history.append((boundary, version, "; ".join(reasons)))
        logger.info(
            "Sparse schedule changed at iteration %d (%s):\n%s",
            boundary,
            "; ".join(reasons),
            self._schedule.describe(),
        )
