"""Sparse checkpointing schedule: window size, operator order and slots (paper Algorithm 1).

A *sparse checkpoint* spans a window of ``W`` consecutive iterations. The operators (each
expert of each layer, each router, each layer's non-expert part, the embedding and the output
layer) are put in one order and cut into ``W`` contiguous *slices*. In slot ``k`` of the window
(the ``k``-th iteration, 0-based here) the snapshot stores

* the **full state** (FP32 main params + optimizer moments + step; ``full_state_bytes``) of the
  operators of slice ``k``, and
* the **compute weights** (bf16/fp16/fp8 params; ``compute_bytes``) of every operator of the
  slices ``k+1 .. W-1``, i.e. of the operators not yet captured in this window.

Sparse-to-dense conversion (paper §3.3) loads slot 0, runs operators of slice 0 as *active*
and the rest as *frozen* on the compute weights saved in slot 0, replays one iteration, loads
slot 1 (slice 1 becomes active; the still-frozen operators take the compute weights saved in
slot 1), and so on. Slot ``W-1`` therefore holds only full state. So the bytes of slot ``k`` are::

    slot_bytes[k] = sum(full_state_bytes(op) for op in slice k)
                  + sum(compute_bytes(op) for op in slices k+1 .. W-1)

(plus ``compute_bytes`` of slice ``k`` when ``include_compute_in_full_slot`` is set, for
snapshot engines that also copy the compute weights of the active slice).

Window size (Algorithm 1, ``FindWindowSize``): starting with every operator active (``W = 1``,
a dense snapshot), operators are turned frozen in order until the slot fits in one iteration at
the device-to-host bandwidth; the same is repeated for the remaining operators. This greedy
"fill each slot as far as it fits" yields the smallest feasible ``W`` when every operator's full
state is at least as large as its compute weights (the cost of a slot then grows with its
slice). The final slices are then re-balanced (min-max of slot bytes) for that ``W``.

Operator order (``OrderOperators``): experts by ascending popularity (see
:mod:`megatron_moevement.schedule.popularity`), then the non-expert operators. Non-expert operators see
every token — they are the most "popular" operators — so by the paper's own criterion they are
captured last and stay frozen longest (frozen operators skip their weight-gradient GEMMs and
optimizer update during replay). Among themselves they go from the output toward the input
(output layer, then layers by descending index with router before dense, embedding last),
following Appendix E: capturing back layers first keeps front layers frozen longest.

:class:`ScheduleManager` holds the current :class:`SparseSchedule`, maps iterations to slots
and changes the schedule only at window boundaries: when the popularity reorder trigger fires
or, for ``window_size="auto"``, when new measurements change ``W``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    TypeVar,
    Union,
    runtime_checkable,
)

import torch

from megatron_moevement.config import MoEvementConfig
from megatron_moevement.logging_utils import get_logger
from megatron_moevement.schedule.popularity import (
    ExpertPopularity,
    LayerScores,
    OrderingPolicy,
    PopularitySnapshot,
    count_drifted_experts,
    get_ordering_policy,
    should_reorder,
)

__all__ = [
    "OPERATOR_KINDS",
    "HostMemoryBudgetError",
    "OperatorLike",
    "ScheduleError",
    "ScheduleManager",
    "SlotAssignment",
    "SlotPlan",
    "SparseSchedule",
    "WindowSizeError",
    "build_schedule",
    "compute_slot_bytes",
    "find_window_size",
    "order_operators",
    "partition_operators",
]

logger = get_logger(__name__)

OPERATOR_KINDS = ("expert", "router", "dense", "embedding", "output")
"""Operator kinds understood by the scheduler (``Operator.kind``)."""

_SCHEDULE_FORMAT_VERSION = 1

SHRINK_HEADROOM = 0.10
"""Fraction of the iteration a smaller auto window must leave free before W shrinks."""


class ScheduleError(ValueError):
    """Raised for invalid operators, schedules or scheduling arguments."""


class WindowSizeError(ScheduleError):
    """Raised when no window size lets the per-iteration snapshot fit in one iteration."""


class HostMemoryBudgetError(ScheduleError):
    """Raised when the sparse checkpoints would not fit in the host memory budget."""


@runtime_checkable
class OperatorLike(Protocol):
    """What the scheduler needs from an operator (``megatron_moevement.state.operators.Operator``)."""

    name: str
    """Unique operator name, e.g. ``"layer3.expert5"``."""
    kind: str
    """One of :data:`OPERATOR_KINDS`."""
    layer: Optional[int]
    """Global layer id (``None`` for embedding / output)."""
    expert: Optional[int]
    """Global expert id for experts, else ``None``."""
    compute_bytes: int
    """Bytes of the compute weights (bf16/fp16/fp8 params)."""
    full_state_bytes: int
    """Bytes of FP32 main params + optimizer moments + step."""


Op = TypeVar("Op", bound=OperatorLike)

# ---------------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _validate_operators(operators: Sequence[Op]) -> List[Op]:
    ops = list(operators)
    if not ops:
        raise ScheduleError(
            "No operators to schedule. Fix: pass the operators of this rank (the operator "
            "registry of the model chunk), at least one."
        )
    seen: Dict[str, int] = {}
    for i, op in enumerate(ops):
        for attr in ("name", "kind", "layer", "expert", "compute_bytes", "full_state_bytes"):
            if not hasattr(op, attr):
                raise ScheduleError(
                    f"Operator #{i} ({op!r}) has no attribute {attr!r}. Fix: pass objects with "
                    "name, kind, layer, expert, compute_bytes and full_state_bytes (OperatorLike)."
                )
        if not isinstance(op.name, str) or not op.name:
            raise ScheduleError(
                f"Operator #{i} has an invalid name {op.name!r}; use a non-empty str."
            )
        if op.name in seen:
            raise ScheduleError(
                f"Operator name {op.name!r} appears twice (#{seen[op.name]} and #{i}). Fix: give "
                "every operator a unique name, e.g. 'layer3.expert5'."
            )
        seen[op.name] = i
        if op.kind not in OPERATOR_KINDS:
            raise ScheduleError(
                f"Operator {op.name!r} has kind {op.kind!r}. Fix: use one of {OPERATOR_KINDS}."
            )
        if op.kind == "expert" and not (_is_int(op.layer) and _is_int(op.expert)):
            raise ScheduleError(
                f"Expert operator {op.name!r} needs int layer and expert ids, got "
                f"layer={op.layer!r}, expert={op.expert!r}. Fix: set the global layer and "
                "expert id."
            )
        for attr in ("compute_bytes", "full_state_bytes"):
            value = getattr(op, attr)
            if not _is_int(value) or value < 0:
                raise ScheduleError(
                    f"Operator {op.name!r} has {attr}={value!r}; expected an int >= 0 (bytes)."
                )
    return ops


def _positive(name: str, value: Any, fix: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ScheduleError(
            f"{name}={value!r} is invalid: must be a finite number > 0. Fix: {fix}."
        )
    return float(value)


# ---------------------------------------------------------------------------------------------
# OrderOperators
# ---------------------------------------------------------------------------------------------

_PopularityArg = Union[None, PopularitySnapshot, ExpertPopularity, Mapping[int, Any]]


def _resolve_scores(
    popularity: _PopularityArg, policy: Union[str, OrderingPolicy]
) -> Optional[LayerScores]:
    if popularity is None:
        return None
    if isinstance(popularity, ExpertPopularity):
        popularity = popularity.snapshot()
    if isinstance(popularity, PopularitySnapshot):
        if not popularity.counts:
            return None
        return get_ordering_policy(policy).scores(popularity)
    if isinstance(popularity, Mapping):
        return {
            int(k): torch.as_tensor(v, dtype=torch.float64).reshape(-1)
            for k, v in popularity.items()
        }
    raise ScheduleError(
        f"popularity must be None, an ExpertPopularity, a PopularitySnapshot or a mapping "
        f"layer -> scores; got {type(popularity).__name__}."
    )


def _non_expert_key(op: OperatorLike) -> Tuple[Any, ...]:
    if op.kind == "output":
        return (0, 0, 0, op.name)
    if op.kind == "embedding":
        return (3, 0, 0, op.name)
    kind_rank = 0 if op.kind == "router" else 1
    if op.layer is None:
        return (1, 0, kind_rank, op.name)
    return (2, -int(op.layer), kind_rank, op.name)


def order_operators(
    operators: Sequence[Op],
    popularity: _PopularityArg = None,
    policy: Union[str, OrderingPolicy] = "hard_count",
    *,
    non_expert_position: str = "last",
) -> List[Op]:
    """Returns the operators in snapshot order (paper ``OrderOperators``).

    Experts come by ascending popularity score, ties broken by (layer, expert id, name) so that
    every rank computes the same order. Non-expert operators follow in the fixed order output,
    layers by descending index (router, then dense), embedding (see the module docstring).

    Args:
        operators: Operators of this rank (any objects satisfying :class:`OperatorLike`).
        popularity: ``None`` (no statistics yet: experts by layer then expert id), an
            :class:`~megatron_moevement.schedule.popularity.ExpertPopularity` (snapshotted here), a
            :class:`~megatron_moevement.schedule.popularity.PopularitySnapshot` (scored by ``policy``),
            or precomputed scores ``{layer: per-expert scores}`` (``policy`` is then unused).
        policy: Ordering policy name or instance.
        non_expert_position: ``"last"`` (default) or ``"first"``.

    Raises:
        ScheduleError: on invalid operators, or an expert without a score.
    """
    ops = _validate_operators(operators)
    if non_expert_position not in ("last", "first"):
        raise ScheduleError(
            f"non_expert_position={non_expert_position!r} is invalid. Fix: use 'last' or 'first'."
        )
    scores = _resolve_scores(popularity, policy)
    experts = [op for op in ops if op.kind == "expert"]
    others = sorted((op for op in ops if op.kind != "expert"), key=_non_expert_key)

    def expert_key(op: OperatorLike) -> Tuple[float, int, int, str]:
        if scores is None:
            return (0.0, int(op.layer), int(op.expert), op.name)
        layer_scores = scores.get(int(op.layer))
        if layer_scores is None or int(op.expert) >= layer_scores.numel() or op.expert < 0:
            have = "no scores" if layer_scores is None else f"{layer_scores.numel()} experts"
            raise ScheduleError(
                f"No popularity score for expert operator {op.name!r} (layer {op.layer}, expert "
                f"{op.expert}; the statistics have {have} for that layer). Fix: call "
                f"ExpertPopularity.update(layer={op.layer}, ...) for every MoE layer with counts "
                "over all global experts, or pass popularity=None."
            )
        value = float(layer_scores[int(op.expert)])
        if math.isnan(value):
            raise ScheduleError(f"Popularity score of {op.name!r} is NaN; check the router stats.")
        return (value, int(op.layer), int(op.expert), op.name)

    experts.sort(key=expert_key)
    return experts + others if non_expert_position == "last" else others + experts


# ---------------------------------------------------------------------------------------------
# FindWindowSize and partitioning
# ---------------------------------------------------------------------------------------------


class _SlotCost:
    """Prefix sums giving the bytes of a slot whose slice is ``ops[p..q]`` (inclusive)."""

    def __init__(self, ops: Sequence[OperatorLike], include_compute_in_full_slot: bool) -> None:
        self.n = len(ops)
        self.full_prefix = [0]
        self.compute_prefix = [0]
        for op in ops:
            full = int(op.full_state_bytes) + (
                int(op.compute_bytes) if include_compute_in_full_slot else 0
            )
            self.full_prefix.append(self.full_prefix[-1] + full)
            self.compute_prefix.append(self.compute_prefix[-1] + int(op.compute_bytes))

    def cost(self, p: int, q: int) -> int:
        full = self.full_prefix[q + 1] - self.full_prefix[p]
        later_compute = self.compute_prefix[self.n] - self.compute_prefix[q + 1]
        return full + later_compute

    def greedy(self, budget: float) -> Optional[List[Tuple[int, int]]]:
        """Fills each slot as far as it fits; ``None`` if some slot cannot fit at all."""
        bounds: List[Tuple[int, int]] = []
        p = 0
        while p < self.n:
            if self.cost(p, p) > budget:
                return None
            q = p
            while q + 1 < self.n and self.cost(p, q + 1) <= budget:
                q += 1
            bounds.append((p, q))
            p = q + 1
        return bounds


def _infeasible_message(
    cost: _SlotCost, ops: Sequence[OperatorLike], iteration_time_s: float, bandwidth: float
) -> str:
    budget = iteration_time_s * bandwidth
    worst = max(range(cost.n), key=lambda p: (cost.cost(p, p), -p))
    need = cost.cost(worst, worst)
    compute_rest = cost.compute_prefix[cost.n] - cost.compute_prefix[1]
    return (
        f"No sparse checkpoint window fits in one iteration: even with one operator per slot "
        f"(W={cost.n}), the slot capturing {ops[worst].name!r} needs {_fmt_bytes(need)} "
        f"({need / bandwidth:.3g} s at {_fmt_bytes(bandwidth)}/s) but one iteration lasts "
        f"{iteration_time_s:.3g} s (budget {_fmt_bytes(budget)}). Every slot must also copy the "
        f"compute weights of the operators not yet captured (the first slot: "
        f"{_fmt_bytes(compute_rest)}). Fix: raise the device-to-host bandwidth (pinned buffers, "
        "a dedicated copy stream), lengthen the iteration (more micro-batches per global batch), "
        "spread the snapshot over more data-parallel ranks, or set MoEvementConfig.window_size "
        "to a fixed value and accept a snapshot stall."
    )


def find_window_size(
    operators: Sequence[OperatorLike],
    iteration_time_s: float,
    d2h_bandwidth_bytes_per_s: float,
    *,
    include_compute_in_full_slot: bool = False,
) -> int:
    """Smallest window W whose every slot fits in one iteration (paper ``FindWindowSize``).

    Args:
        operators: Operators in snapshot order (see :func:`order_operators`); slices are
            contiguous runs of this order.
        iteration_time_s: Duration of one training iteration (s).
        d2h_bandwidth_bytes_per_s: Device-to-host copy bandwidth (bytes/s).
        include_compute_in_full_slot: Also count the compute weights of the active slice.

    Returns:
        W, between 1 (a dense snapshot fits every iteration) and ``len(operators)``.

    Raises:
        WindowSizeError: when even one operator per slot does not fit; the message says what
            to change.
    """
    ops = _validate_operators(operators)
    t = _positive("iteration_time_s", iteration_time_s, "pass the measured iteration time")
    bw = _positive(
        "d2h_bandwidth_bytes_per_s", d2h_bandwidth_bytes_per_s, "pass the measured D2H bandwidth"
    )
    cost = _SlotCost(ops, include_compute_in_full_slot)
    bounds = cost.greedy(t * bw)
    if bounds is None:
        raise WindowSizeError(_infeasible_message(cost, ops, t, bw))
    return len(bounds)


def partition_operators(
    operators: Sequence[Op],
    window_size: int,
    *,
    include_compute_in_full_slot: bool = False,
) -> List[List[Op]]:
    """Cuts ordered operators into ``window_size`` contiguous, non-empty slices.

    The cut minimizes the largest slot (in bytes, as defined in the module docstring), so the
    snapshot work is spread as evenly as the order allows.

    Raises:
        ScheduleError: when ``window_size`` is not in ``[1, len(operators)]``.
    """
    ops = _validate_operators(operators)
    n = len(ops)
    if not _is_int(window_size) or not 1 <= window_size <= n:
        raise ScheduleError(
            f"window_size={window_size!r} is invalid for {n} operators: every slot needs at "
            f"least one operator with full state. Fix: use 1 <= window_size <= {n} or 'auto'."
        )
    cost = _SlotCost(ops, include_compute_in_full_slot)
    lo, hi = 0, cost.cost(0, n - 1)  # hi: one dense slot always fits within its own size
    while lo < hi:
        mid = (lo + hi) // 2
        bounds = cost.greedy(mid)
        if bounds is not None and len(bounds) <= window_size:
            hi = mid
        else:
            lo = mid + 1
    bounds = cost.greedy(hi)
    assert bounds is not None
    # The greedy cut may use fewer slots than requested; split the costliest multi-operator
    # slice (splitting never makes a slot more expensive) until there are window_size slices.
    while len(bounds) < window_size:
        candidates = [i for i, (p, q) in enumerate(bounds) if q > p]
        i = max(candidates, key=lambda j: (cost.cost(*bounds[j]), -j))
        p, q = bounds[i]
        m = min(range(p, q), key=lambda k: (max(cost.cost(p, k), cost.cost(k + 1, q)), k))
        bounds[i : i + 1] = [(p, m), (m + 1, q)]
    return [ops[p : q + 1] for p, q in bounds]


def compute_slot_bytes(
    slices: Sequence[Sequence[OperatorLike]], *, include_compute_in_full_slot: bool = False
) -> List[int]:
    """Bytes snapshotted in each slot of a window (see the module docstring for the formula)."""
    out = []
    for k, current in enumerate(slices):
        full = sum(int(op.full_state_bytes) for op in current)
        if include_compute_in_full_slot:
            full += sum(int(op.compute_bytes) for op in current)
        later = sum(int(op.compute_bytes) for later in slices[k + 1 :] for op in later)
        out.append(full + later)
    return out


# ---------------------------------------------------------------------------------------------
# SparseSchedule
# ---------------------------------------------------------------------------------------------


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

    generation: int = 0
    """Incremented by :class:`ScheduleManager` each time the schedule changes."""

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
        if not _is_int(slot) or not 0 <= slot < self.window_size:
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
            f"SparseSchedule(generation={self.generation}, W={self.window_size}, "
            f"operators={len(self.order)}, policy={self.policy!r})"
        ]
        if self.iteration_time_s is not None and self.d2h_bandwidth_bytes_per_s is not None:
            budget = self.iteration_time_s * self.d2h_bandwidth_bytes_per_s
            lines.append(
                f"  budget per iteration: {self.iteration_time_s:.4g} s x "
                f"{_fmt_bytes(self.d2h_bandwidth_bytes_per_s)}/s = {_fmt_bytes(budget)} "
                f"({'fits' if self.fits else 'DOES NOT FIT: snapshot stalls training'})"
            )
        lines.append(f"  one sparse checkpoint: {_fmt_bytes(self.total_bytes)} of host memory")
        for plan in self.slots:
            t = self.slot_time_s(plan.index)
            timing = f", {t:.4g} s" if t is not None else ""
            lines.append(
                f"  slot {plan.index}: {_fmt_bytes(plan.nbytes)}{timing}; full state "
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
            "generation": self.generation,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SparseSchedule":
        """Rebuilds (and validates) a schedule from :meth:`to_dict` output.

        Raises:
            ScheduleError: on an unknown format version, unknown or missing keys.
        """
        data = dict(data)
        version = data.pop("format_version", _SCHEDULE_FORMAT_VERSION)
        if version != _SCHEDULE_FORMAT_VERSION:
            raise ScheduleError(
                f"SparseSchedule format_version {version!r} is not supported (expected "
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


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


# ---------------------------------------------------------------------------------------------
# build_schedule
# ---------------------------------------------------------------------------------------------


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
    generation: int = 0,
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
        generation: Generation number stored in the schedule.
        ordered: The operators are already in snapshot order (skip :func:`order_operators`).

    Raises:
        ScheduleError, WindowSizeError, HostMemoryBudgetError: with the problem and the fix.
    """
    policy_name = (
        policy if isinstance(policy, str) else getattr(policy, "name", type(policy).__name__)
    )
    ops = (
        _validate_operators(operators)
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
    elif _is_int(window_size):
        w = int(window_size)
    else:
        raise ScheduleError(
            f"window_size={window_size!r} is invalid. Fix: use 'auto' or an int >= 1."
        )
    if agree_window_size is not None:
        agreed = agree_window_size(w)
        if not _is_int(agreed) or agreed < w:
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
        iteration_time_s = _positive(
            "iteration_time_s", iteration_time_s, "pass the measured iteration time"
        )
        d2h_bandwidth_bytes_per_s = _positive(
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
        generation=generation,
    )
    if schedule.fits is False:
        stall = (
            schedule.max_slot_bytes / schedule.d2h_bandwidth_bytes_per_s - schedule.iteration_time_s
        )
        logger.warning(
            "Sparse checkpoint window W=%d does not fit: the largest slot needs %s, about %.3f s "
            "more than one iteration; training will stall. Use window_size='auto' or a larger W.",
            schedule.window_size,
            _fmt_bytes(schedule.max_slot_bytes),
            stall,
        )
    if host_memory_budget_bytes is not None:
        need = schedule.host_bytes_required(replication_factor)
        if need > host_memory_budget_bytes:
            raise HostMemoryBudgetError(
                f"Sparse checkpoints need {_fmt_bytes(need)} of host memory (2 checkpoints x "
                f"(1 own + {replication_factor} peer replicas) x {_fmt_bytes(schedule.total_bytes)}"
                f" at W={schedule.window_size}) but host_memory_budget_bytes is "
                f"{_fmt_bytes(host_memory_budget_bytes)}. Fix: raise host_memory_budget_bytes, "
                "lower replication_factor, use a smaller window (each extra slot re-copies compute "
                "weights), or spread the operators over more ranks."
            )
    return schedule


# ---------------------------------------------------------------------------------------------
# ScheduleManager
# ---------------------------------------------------------------------------------------------


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
        self._operators = _validate_operators(operators)
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
        if not _is_int(start_iteration) or start_iteration < 0:
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
        """``(window_start, generation, reason)`` for every schedule change, oldest first."""
        return list(self._state.history)

    def update_measurements(
        self,
        iteration_time_s: Optional[float] = None,
        d2h_bandwidth_bytes_per_s: Optional[float] = None,
    ) -> None:
        """Records new measurements; they take effect at the next window boundary."""
        if iteration_time_s is not None:
            self._iteration_time_s = _positive(
                "iteration_time_s", iteration_time_s, "pass seconds > 0"
            )
            self._state.measurements_dirty = True
        if d2h_bandwidth_bytes_per_s is not None:
            self._bandwidth = _positive(
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
        if not _is_int(iteration):
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
            history=[(int(state["window_start"]), schedule.generation, "restored")],
        )
        self._iteration_time_s = state.get("iteration_time_s", self._iteration_time_s)
        self._bandwidth = state.get("d2h_bandwidth_bytes_per_s", self._bandwidth)

    # ------------------------------------------------------------------ internals

    def _build(
        self,
        ordered: List[OperatorLike],
        generation: int,
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
            generation=generation,
            ordered=True,
        )

    def _auto_window_size(self, order: List[OperatorLike], current: int) -> int:
        """W for the latest measurements, with hysteresis, agreed across ranks.

        Growing is immediate (the current window no longer fits). Shrinking requires the smaller
        window to fit with :data:`SHRINK_HEADROOM` to spare, so that noisy iteration-time
        measurements do not flip W at every boundary. When no window fits, the current one is
        kept (the stall is logged) instead of failing training on a transient measurement.
        """
        try:
            w = find_window_size(
                order,
                self._iteration_time_s,
                self._bandwidth,
                include_compute_in_full_slot=self._include_compute,
            )
        except WindowSizeError as exc:
            logger.warning("%s Keeping W=%d for now.", exc, current)
            w = current
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
            if not _is_int(agreed) or agreed < w:
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
        generation = self._schedule.generation + 1
        self._schedule = self._build(new_order, generation, target_w, agree=False)
        self._state.history.append((boundary, generation, "; ".join(reasons)))
        logger.info(
            "Sparse schedule changed at iteration %d (%s):\n%s",
            boundary,
            "; ".join(reasons),
            self._schedule.describe(),
        )
