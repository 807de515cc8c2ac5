"""The schedule of a sparse checkpointing window: slices, per-slot contents and bytes.

A *sparse checkpoint* spans a window of ``W`` consecutive iterations. The operators (each
expert of each layer, each router, each layer's non-expert part, the embedding and the output
layer) are put in snapshot order (:mod:`megatron_moevement.schedule.order`) and cut into ``W``
contiguous *slices* (Algorithm 1, :mod:`megatron_moevement.schedule.window`). In slot ``k`` of
the window the snapshot stores the **full state** of slice ``k`` and the **compute weights** of
the operators of the slices ``k+1 .. W-1``, i.e. of the operators not yet captured in this
window.

Sparse-to-dense conversion (paper §3.3) loads slot 0, runs operators of slice 0 as *active*
and the rest as *frozen* on the compute weights saved in slot 0, replays one iteration, loads
slot 1, and so on; slot ``W-1`` therefore holds only full state.

:func:`build_schedule` orders the operators, picks W and cuts the slices;
:class:`SparseSchedule` is the result, validated and serializable (it travels with every slot).
"""

from __future__ import annotations

from dataclasses import dataclass
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

from megatron_moevement.constants import FULL_STATE_BYTES_PER_PARAM
from megatron_moevement.logging_utils import get_logger
from megatron_moevement.schedule.order import _PopularityArg, order_operators
from megatron_moevement.schedule.popularity import (
    OrderingPolicy,
)
from megatron_moevement.schedule.window import (
    OperatorLike,
    ScheduleError,
    find_window_size,
    format_bytes,
    is_int,
    partition_operators,
    positive,
    validate_operators,
)

logger = get_logger(__name__)


_SCHEDULE_FORMAT_VERSION = 1


class HostMemoryBudgetError(ScheduleError):
    """Raised when the sparse checkpoints would not fit in the host memory budget."""


@dataclass(frozen=True)
class ScheduledOperator:
    """An operator as the scheduler sees it: sizes that are the same on every replica of a
    stage, so that all of them cut the same slices (not this rank's optimizer shard)."""

    name: str
    kind: str
    layer: Optional[int]
    expert: Optional[int]
    compute_bytes: int
    full_state_bytes: int

    @classmethod
    def of(cls, op) -> "ScheduledOperator":
        """The schedule's view of a registry operator: its compute bytes and
        :data:`~megatron_moevement.constants.FULL_STATE_BYTES_PER_PARAM` per parameter."""
        numel = op.numel
        return cls(
            op.name,
            op.kind,
            op.layer,
            op.expert,
            op.compute_bytes,
            numel * FULL_STATE_BYTES_PER_PARAM,
        )


@dataclass(frozen=True)
class SlotPlan:
    """What one slot of the window snapshots."""

    index: int
    """Slot index k in ``[0, W)``; slot k is taken in the k-th iteration of the window."""
    full_state: Tuple[str, ...]
    """Operators whose full state (FP32 main params + optimizer state + step) is saved."""
    compute_only: Tuple[str, ...]
    """Operators (not yet captured in this window) whose compute weights only are saved."""
    nbytes: int
    """Bytes snapshotted in this slot."""


@dataclass
class SparseSchedule:
    """One sparse checkpointing window: slices, per-slot contents and per-slot bytes.

    Validated on construction: slices are non-empty, every operator appears in exactly one
    slice (so it has exactly one full-state slot per window), and byte tables cover exactly the
    scheduled operators.
    """

    slices: List[List[str]]
    """``slices[k]``: names of the operators whose full state is saved in slot k."""

    compute_bytes: Dict[str, int]
    """Compute-weight bytes per operator name."""

    full_state_bytes: Dict[str, int]
    """Full-state bytes per operator name."""

    include_compute_in_full_slot: bool = False
    """Whether a full-state slot also copies the compute weights of its slice."""

    policy: str = "hard_count"
    """Ordering policy the order came from (informational)."""

    iteration_time_s: Optional[float] = None
    """Iteration time the window was sized for (``None`` for a fixed window without it)."""

    d2h_bandwidth_bytes_per_s: Optional[float] = None
    """Device-to-host bandwidth the window was sized for."""

    version: int = 0
    """Schedule version: incremented by :class:`~.manager.ScheduleManager` each time the
    schedule changes (a new order or window size)."""

    def __post_init__(self) -> None:
        self.slices = [list(s) for s in self.slices]
        self.compute_bytes = {str(k): int(v) for k, v in self.compute_bytes.items()}
        self.full_state_bytes = {str(k): int(v) for k, v in self.full_state_bytes.items()}
        self.validate()

    # ------------------------------------------------------------------ validation

    def validate(self, operators: Optional[Sequence[OperatorLike]] = None) -> None:
        """Checks the schedule invariants, and optionally that it covers exactly ``operators``.

        Raises:
            ScheduleError: naming the operator or slot that breaks an invariant.
        """
        if not self.slices:
            raise ScheduleError("A SparseSchedule needs at least one slot (window_size >= 1).")
        slot_of: Dict[str, int] = {}
        for k, names in enumerate(self.slices):
            if not names:
                raise ScheduleError(
                    f"Slot {k} of the schedule has no full-state operator. Fix: every slot must "
                    "capture at least one operator; use a smaller window_size."
                )
            for name in names:
                if name in slot_of:
                    raise ScheduleError(
                        f"Operator {name!r} has full state in slots {slot_of[name]} and {k}; each "
                        "operator must have exactly one full-state slot per window."
                    )
                slot_of[name] = k
        for table_name in ("compute_bytes", "full_state_bytes"):
            table = getattr(self, table_name)
            missing = sorted(set(slot_of) - set(table))
            extra = sorted(set(table) - set(slot_of))
            if missing or extra:
                raise ScheduleError(
                    f"SparseSchedule.{table_name} does not match the scheduled operators "
                    f"(missing {missing[:5]}, not scheduled {extra[:5]})."
                )
            bad = [n for n, v in table.items() if v < 0]
            if bad:
                raise ScheduleError(
                    f"SparseSchedule.{table_name} has negative bytes for {bad[:5]}."
                )
        if operators is not None:
            names = [op.name for op in operators]
            missing = [n for n in names if n not in slot_of]
            extra = sorted(set(slot_of) - set(names))
            if missing or extra:
                raise ScheduleError(
                    f"The schedule does not cover the operators exactly: without a full-state "
                    f"slot {missing[:5]}, unknown {extra[:5]}. Fix: rebuild the schedule from the "
                    "current operator registry."
                )

    # ------------------------------------------------------------------ queries

    @property
    def window_size(self) -> int:
        """Number of slots W."""
        return len(self.slices)

    @property
    def order(self) -> List[str]:
        """All operator names in snapshot order (slices concatenated)."""
        return [name for names in self.slices for name in names]

    @property
    def slot_bytes(self) -> List[int]:
        """Bytes snapshotted in each slot."""
        out = []
        later = sum(self.compute_bytes[n] for n in self.order)
        for names in self.slices:
            later -= sum(self.compute_bytes[n] for n in names)
            full = sum(self.full_state_bytes[n] for n in names)
            if self.include_compute_in_full_slot:
                full += sum(self.compute_bytes[n] for n in names)
            out.append(full + later)
        return out

    @property
    def total_bytes(self) -> int:
        """Host bytes of one complete sparse checkpoint (all W slots)."""
        return sum(self.slot_bytes)

    @property
    def max_slot_bytes(self) -> int:
        """Bytes of the largest slot."""
        return max(self.slot_bytes)

    @property
    def fits(self) -> Optional[bool]:
        """Whether the largest slot fits in one iteration (``None`` without measurements)."""
        if self.iteration_time_s is None or self.d2h_bandwidth_bytes_per_s is None:
            return None
        return self.max_slot_bytes <= self.iteration_time_s * self.d2h_bandwidth_bytes_per_s

    def slot_time_s(self, slot: int) -> Optional[float]:
        """Estimated copy time of ``slot`` at the recorded bandwidth (``None`` without it)."""
        if self.d2h_bandwidth_bytes_per_s is None:
            return None
        return self.slot_bytes[self._check_slot(slot)] / self.d2h_bandwidth_bytes_per_s

    def full_state_operators(self, slot: int) -> List[str]:
        """Names whose full state is saved in ``slot``."""
        return list(self.slices[self._check_slot(slot)])

    def compute_only_operators(self, slot: int) -> List[str]:
        """Names whose compute weights only are saved in ``slot`` (slices after it)."""
        k = self._check_slot(slot)
        return [name for names in self.slices[k + 1 :] for name in names]

    def slot_of(self, name: str) -> int:
        """The slot in which operator ``name`` has its full state."""
        for k, names in enumerate(self.slices):
            if name in names:
                return k
        raise ScheduleError(f"Operator {name!r} is not in the schedule.")

    def slot(self, slot: int) -> SlotPlan:
        """The :class:`SlotPlan` of ``slot``."""
        k = self._check_slot(slot)
        return SlotPlan(
            index=k,
            full_state=tuple(self.slices[k]),
            compute_only=tuple(self.compute_only_operators(k)),
            nbytes=self.slot_bytes[k],
        )

    @property
    def slots(self) -> List[SlotPlan]:
        """All slot plans, in window order."""
        return [self.slot(k) for k in range(self.window_size)]

    def host_bytes_required(self, replication_factor: int = 1, checkpoints_kept: int = 2) -> int:
        """Host bytes for own and replicated sparse checkpoints of this schedule.

        Args:
            replication_factor: Peers replicating each rank's snapshots (each rank holds, on
                average, ``replication_factor`` peers' checkpoints in addition to its own).
            checkpoints_kept: Checkpoints kept per rank (one persisted + one in flight).
        """
        return self.total_bytes * checkpoints_kept * (1 + replication_factor)

    def _check_slot(self, slot: int) -> int:
        if not is_int(slot) or not 0 <= slot < self.window_size:
            raise ScheduleError(
                f"Slot {slot!r} is out of range for a window of {self.window_size} slots "
                f"(valid: 0..{self.window_size - 1})."
            )
        return int(slot)

    # ------------------------------------------------------------------ presentation

    def describe(self, max_names: int = 8) -> str:
        """Human-readable summary: W, budget, and per slot the operators and bytes.

        Args:
            max_names: Names listed per slot and category before eliding (``0`` = all).
        """

        def names(items: Sequence[str]) -> str:
            if not items:
                return "-"
            if max_names and len(items) > max_names:
                return ", ".join(items[:max_names]) + f", ... (+{len(items) - max_names} more)"
            return ", ".join(items)

        lines = [
            f"SparseSchedule(version={self.version}, W={self.window_size}, "
            f"operators={len(self.order)}, policy={self.policy!r})"
        ]
        if self.iteration_time_s is not None and self.d2h_bandwidth_bytes_per_s is not None:
            budget = self.iteration_time_s * self.d2h_bandwidth_bytes_per_s
            lines.append(
                f"  budget per iteration: {self.iteration_time_s:.4g} s x "
                f"{format_bytes(self.d2h_bandwidth_bytes_per_s)}/s = {format_bytes(budget)} "
                f"({'fits' if self.fits else 'DOES NOT FIT: snapshot stalls training'})"
            )
        lines.append(f"  one sparse checkpoint: {format_bytes(self.total_bytes)} of host memory")
        for plan in self.slots:
            t = self.slot_time_s(plan.index)
            timing = f", {t:.4g} s" if t is not None else ""
            lines.append(
                f"  slot {plan.index}: {format_bytes(plan.nbytes)}{timing}; full state "
                f"[{len(plan.full_state)}]: {names(plan.full_state)}; compute only "
                f"[{len(plan.compute_only)}]: {names(plan.compute_only)}"
            )
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-serializable form (inverse of :meth:`from_dict`)."""
        return {
            "format_version": _SCHEDULE_FORMAT_VERSION,
            "slices": [list(s) for s in self.slices],
            "compute_bytes": dict(self.compute_bytes),
            "full_state_bytes": dict(self.full_state_bytes),
            "include_compute_in_full_slot": self.include_compute_in_full_slot,
            "policy": self.policy,
            "iteration_time_s": self.iteration_time_s,
            "d2h_bandwidth_bytes_per_s": self.d2h_bandwidth_bytes_per_s,
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SparseSchedule":
        """Rebuilds (and validates) a schedule from :meth:`to_dict` output.

        Raises:
            ScheduleError: on an unknown format version, unknown or missing keys.
        """
        data = dict(data)
        if "generation" in data and "version" not in data:  # written before 0.2
            data["version"] = data.pop("generation")
        fmt = data.pop("format_version", _SCHEDULE_FORMAT_VERSION)
        if fmt != _SCHEDULE_FORMAT_VERSION:
            raise ScheduleError(
                f"SparseSchedule format_version {fmt!r} is not supported (expected "
                f"{_SCHEDULE_FORMAT_VERSION}). Fix: rebuild the schedule with this version."
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ScheduleError(
                f"SparseSchedule.from_dict: unknown keys {unknown}; valid: {sorted(known)}."
            )
        missing = sorted({"slices", "compute_bytes", "full_state_bytes"} - set(data))
        if missing:
            raise ScheduleError(f"SparseSchedule.from_dict: missing keys {missing}.")
        return cls(**data)


def build_schedule(
    operators: Sequence[OperatorLike],
    *,
    popularity: _PopularityArg = None,
    policy: Union[str, OrderingPolicy] = "hard_count",
    window_size: Union[int, str] = "auto",
    iteration_time_s: Optional[float] = None,
    d2h_bandwidth_bytes_per_s: Optional[float] = None,
    include_compute_in_full_slot: bool = False,
    non_expert_position: str = "last",
    host_memory_budget_bytes: Optional[int] = None,
    replication_factor: int = 1,
    agree_window_size: Optional[Callable[[int], int]] = None,
    version: int = 0,
    ordered: bool = False,
) -> SparseSchedule:
    """Orders the operators, picks W and builds the :class:`SparseSchedule` (Algorithm 1).

    Args:
        operators: Operators of this rank.
        popularity: See :func:`order_operators`.
        policy: Ordering policy name or instance.
        window_size: ``"auto"`` (smallest W that fits; needs both measurements) or a fixed int.
        iteration_time_s: Iteration time (s).
        d2h_bandwidth_bytes_per_s: Device-to-host bandwidth (bytes/s).
        include_compute_in_full_slot: See the module docstring.
        non_expert_position: See :func:`order_operators`.
        host_memory_budget_bytes: If given, fail when the checkpoints kept in host memory
            (:meth:`SparseSchedule.host_bytes_required`) exceed it.
        replication_factor: Peer replicas per snapshot (for the memory check).
        agree_window_size: Optional hook mapping the local W to the W agreed by all ranks that
            must share window boundaries (e.g. an all-reduce MAX over the stage's EP/DP ranks).
        version: Schedule version stored in the schedule.
        ordered: The operators are already in snapshot order (skip :func:`order_operators`).

    Raises:
        ScheduleError, WindowSizeError, HostMemoryBudgetError: with the problem and the fix.
    """
    policy_name = (
        policy if isinstance(policy, str) else getattr(policy, "name", type(policy).__name__)
    )
    ops = (
        validate_operators(operators)
        if ordered
        else order_operators(operators, popularity, policy, non_expert_position=non_expert_position)
    )
    have_measurements = iteration_time_s is not None and d2h_bandwidth_bytes_per_s is not None
    if window_size == "auto":
        if not have_measurements:
            raise ScheduleError(
                "window_size='auto' needs iteration_time_s and d2h_bandwidth_bytes_per_s (got "
                f"{iteration_time_s!r} and {d2h_bandwidth_bytes_per_s!r}). Fix: measure them over "
                "the first iterations, set MoEvementConfig.iteration_time_s / "
                "d2h_bandwidth_bytes_per_s, or use a fixed window_size."
            )
        w = find_window_size(
            ops,
            iteration_time_s,
            d2h_bandwidth_bytes_per_s,
            include_compute_in_full_slot=include_compute_in_full_slot,
        )
    elif is_int(window_size):
        w = int(window_size)
    else:
        raise ScheduleError(
            f"window_size={window_size!r} is invalid. Fix: use 'auto' or an int >= 1."
        )
    if agree_window_size is not None:
        agreed = agree_window_size(w)
        if not is_int(agreed) or agreed < w:
            raise ScheduleError(
                f"agree_window_size returned {agreed!r} for a local W of {w}; it must return "
                "an int >= the local W (e.g. the maximum over the ranks)."
            )
        w = int(agreed)
    w_capped = min(w, len(ops))
    if w_capped != w and window_size == "auto":
        logger.info(
            "Agreed window size %d exceeds the %d local operators; using %d", w, len(ops), w_capped
        )
        w = w_capped
    slices = partition_operators(ops, w, include_compute_in_full_slot=include_compute_in_full_slot)
    if have_measurements:
        iteration_time_s = positive(
            "iteration_time_s", iteration_time_s, "pass the measured iteration time"
        )
        d2h_bandwidth_bytes_per_s = positive(
            "d2h_bandwidth_bytes_per_s",
            d2h_bandwidth_bytes_per_s,
            "pass the measured D2H bandwidth",
        )
    schedule = SparseSchedule(
        slices=[[op.name for op in s] for s in slices],
        compute_bytes={op.name: int(op.compute_bytes) for op in ops},
        full_state_bytes={op.name: int(op.full_state_bytes) for op in ops},
        include_compute_in_full_slot=include_compute_in_full_slot,
        policy=str(policy_name),
        iteration_time_s=iteration_time_s if have_measurements else None,
        d2h_bandwidth_bytes_per_s=d2h_bandwidth_bytes_per_s if have_measurements else None,
        version=version,
    )
    if schedule.fits is False:
        stall = (
            schedule.max_slot_bytes / schedule.d2h_bandwidth_bytes_per_s - schedule.iteration_time_s
        )
        logger.warning(
            "Sparse checkpoint window W=%d does not fit: the largest slot needs %s, about %.3f s "
            "more than one iteration; training will stall. Use window_size='auto' or a larger W.",
            schedule.window_size,
            format_bytes(schedule.max_slot_bytes),
            stall,
        )
    if host_memory_budget_bytes is not None:
        need = schedule.host_bytes_required(replication_factor)
        if need > host_memory_budget_bytes:
            raise HostMemoryBudgetError(
                f"Sparse checkpoints need {format_bytes(need)} of host memory (2 checkpoints x "
                f"(1 own + {replication_factor} peer replicas) x {format_bytes(schedule.total_bytes)}"
                f" at W={schedule.window_size}) but host_memory_budget_bytes is "
                f"{format_bytes(host_memory_budget_bytes)}. Fix: raise host_memory_budget_bytes, "
                "lower replication_factor, use a smaller window (each extra slot re-copies compute "
                "weights), or spread the operators over more ranks."
            )
    return schedule
