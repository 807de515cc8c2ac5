"""Algorithm 1 of the paper (``FindWindowSize`` and the slot cut), torch-free.

The one implementation of the window and slot rule, used by the strategy's scheduler
(:mod:`megatron_moevement.schedule.sparse_schedule`) and by the ETTR simulator
(:mod:`megatron_moevement.sim.window`), which differ only in where the operator sizes and the
budget come from.

Operators are in snapshot order and cut into ``W`` contiguous *slices*. Slot ``k`` of a window
stores the full state (FP32 main params + optimizer state) of slice ``k`` and the compute
weights of the operators of every later slice (they are still frozen when slot ``k`` is loaded
for replay)::

    slot_bytes[k] = sum(full[op] for op in slice k)
                  + sum(compute[op] for op in slices k+1 .. W-1)

(plus the compute weights of slice ``k`` itself when ``include_compute_in_full_slot`` is set,
for snapshot engines that copy them too).

* **Window size**: starting with every operator active (``W = 1``, a dense snapshot), operators
  are turned frozen in order until the slot fits the budget; the same is repeated for the rest.
  This greedy fill gives the smallest feasible ``W`` whenever an operator's full state is at
  least as large as its compute weights (a slot's cost then grows with its slice).
* **Slices**: for a given ``W`` the cut minimizes the largest slot (binary search on the budget
  over the greedy fill), so the snapshot work is spread as evenly as the order allows.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple, TypeVar, runtime_checkable

from megatron_moevement.constants import OPERATOR_KINDS

__all__ = [
    "OperatorLike",
    "ScheduleError",
    "SlotCost",
    "WindowSizeError",
    "balanced_slices",
    "compute_slot_bytes",
    "find_window_size",
    "format_bytes",
    "greedy_slices",
    "least_stall_window",
    "least_stall_window_size",
    "partition_operators",
    "smallest_window",
]


class ScheduleError(ValueError):
    """Raised for invalid operators, schedules or scheduling arguments."""


class WindowSizeError(ScheduleError):
    """Raised when no window size lets the per-iteration snapshot fit in one iteration."""


@runtime_checkable
class OperatorLike(Protocol):
    """What the scheduler needs from an operator (``state.operators.Operator`` has it)."""

    name: str
    """Unique operator name, e.g. ``"layer3.expert5"``."""
    kind: str
    """One of :data:`~megatron_moevement.constants.OPERATOR_KINDS`."""
    layer: Optional[int]
    """Global layer id (``None`` for embedding / output)."""
    expert: Optional[int]
    """Global expert id for experts, else ``None``."""
    compute_bytes: int
    """Bytes of the compute weights (bf16/fp16/fp8 params)."""
    full_state_bytes: int
    """Bytes of FP32 main params + optimizer moments + step."""


Op = TypeVar("Op", bound=OperatorLike)

Bounds = List[Tuple[int, int]]
"""Slices as inclusive ``(first, last)`` operator indices, in order."""


# ---------------------------------------------------------------------------------------------
# The algorithm on plain sizes
# ---------------------------------------------------------------------------------------------


class SlotCost:
    """Bytes of a slot whose slice is ``ops[p..q]`` (inclusive), from prefix sums.

    Args:
        full: Full-state bytes of each operator, in snapshot order.
        compute: Compute-weight bytes of each operator, in the same order.
        include_compute_in_full_slot: Also count the compute weights of the active slice.
    """

    def __init__(
        self,
        full: Sequence[int],
        compute: Sequence[int],
        include_compute_in_full_slot: bool = False,
    ) -> None:
        if len(full) != len(compute):
            raise ScheduleError(
                f"{len(full)} full-state sizes but {len(compute)} compute sizes: give one of "
                "each per operator"
            )
        self.n = len(full)
        self.full_prefix = [0]
        self.compute_prefix = [0]
        for f, c in zip(full, compute):
            f, c = int(f), int(c)
            self.full_prefix.append(
                self.full_prefix[-1] + f + (c if include_compute_in_full_slot else 0)
            )
            self.compute_prefix.append(self.compute_prefix[-1] + c)

    def cost(self, p: int, q: int) -> int:
        """Bytes of the slot that captures ``ops[p..q]`` with full state."""
        full = self.full_prefix[q + 1] - self.full_prefix[p]
        later_compute = self.compute_prefix[self.n] - self.compute_prefix[q + 1]
        return full + later_compute

    def slot_bytes(self, bounds: Bounds) -> List[int]:
        """Bytes of every slot of a cut."""
        return [self.cost(p, q) for p, q in bounds]


def greedy_slices(cost: SlotCost, budget: float) -> Optional[Bounds]:
    """Fills each slot as far as it fits ``budget`` bytes; ``None`` if some operator cannot fit
    in a slot of its own."""
    bounds: Bounds = []
    p = 0
    while p < cost.n:
        if cost.cost(p, p) > budget:
            return None
        q = p
        while q + 1 < cost.n and cost.cost(p, q + 1) <= budget:
            q += 1
        bounds.append((p, q))
        p = q + 1
    return bounds


def balanced_slices(cost: SlotCost, window_size: int) -> Bounds:
    """The cut into exactly ``window_size`` non-empty slices whose largest slot is smallest.

    Raises:
        ScheduleError: when ``window_size`` is not in ``[1, n]``.
    """
    n = cost.n
    if not is_int(window_size) or not 1 <= window_size <= n:
        raise ScheduleError(
            f"window_size={window_size!r} is invalid for {n} operators: every slot needs at "
            f"least one operator with full state. Fix: use 1 <= window_size <= {n} or 'auto'."
        )
    lo, hi = 0, cost.cost(0, n - 1)  # hi: one dense slot always fits within its own size
    while lo < hi:
        mid = (lo + hi) // 2
        bounds = greedy_slices(cost, mid)
        if bounds is not None and len(bounds) <= window_size:
            hi = mid
        else:
            lo = mid + 1
    bounds = greedy_slices(cost, hi)
    assert bounds is not None
    # The greedy cut may use fewer slots than requested; split the costliest multi-operator
    # slice (splitting never makes a slot more expensive) until there are window_size slices.
    while len(bounds) < window_size:
        candidates = [i for i, (p, q) in enumerate(bounds) if q > p]
        i = max(candidates, key=lambda j: (cost.cost(*bounds[j]), -j))
        p, q = bounds[i]
        m = min(range(p, q), key=lambda k: (max(cost.cost(p, k), cost.cost(k + 1, q)), k))
        bounds[i : i + 1] = [(p, m), (m + 1, q)]
    return bounds


def smallest_window(cost: SlotCost, budget: float) -> Optional[int]:
    """Algorithm 1's ``FindWindowSize``: the smallest W whose every slot fits ``budget`` bytes,
    or ``None`` when even one operator per slot does not fit."""
    bounds = greedy_slices(cost, budget)
    return None if bounds is None else len(bounds)


def least_stall_window(cost: SlotCost) -> int:
    """When no window fits: the smallest W whose largest slot is as small as any cut allows.

    A slot that starts at or before operator ``p`` and captures it costs at least
    ``cost(p, p)`` when full state outweighs compute weights, so no cut beats the largest
    single-operator slot; the greedy fill at that budget reaches it with the fewest slots.
    """
    return len(greedy_slices(cost, max(cost.cost(p, p) for p in range(cost.n))))


# ---------------------------------------------------------------------------------------------
# The algorithm on operators (validated)
# ---------------------------------------------------------------------------------------------


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def validate_operators(operators: Sequence[Op]) -> List[Op]:
    """The operators as a list, after checking what the scheduler relies on.

    Raises:
        ScheduleError: naming the operator and the attribute that is wrong.
    """
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
        if op.kind == "expert" and not (is_int(op.layer) and is_int(op.expert)):
            raise ScheduleError(
                f"Expert operator {op.name!r} needs int layer and expert ids, got "
                f"layer={op.layer!r}, expert={op.expert!r}. Fix: set the global layer and "
                "expert id."
            )
        for attr in ("compute_bytes", "full_state_bytes"):
            value = getattr(op, attr)
            if not is_int(value) or value < 0:
                raise ScheduleError(
                    f"Operator {op.name!r} has {attr}={value!r}; expected an int >= 0 (bytes)."
                )
    return ops


def positive(name: str, value: Any, fix: str) -> float:
    """``value`` as a float, or a :class:`ScheduleError` unless it is a finite number > 0."""
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


def _cost_of(ops: Sequence[OperatorLike], include_compute_in_full_slot: bool) -> SlotCost:
    return SlotCost(
        [op.full_state_bytes for op in ops],
        [op.compute_bytes for op in ops],
        include_compute_in_full_slot,
    )


def format_bytes(n: float) -> str:
    """``n`` bytes with a binary unit (``"1.50 MiB"``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def _infeasible_message(
    cost: SlotCost, ops: Sequence[OperatorLike], iteration_time_s: float, bandwidth: float
) -> str:
    budget = iteration_time_s * bandwidth
    worst = max(range(cost.n), key=lambda p: (cost.cost(p, p), -p))
    need = cost.cost(worst, worst)
    compute_rest = cost.compute_prefix[cost.n] - cost.compute_prefix[1]
    return (
        f"No sparse checkpoint window fits in one iteration: even with one operator per slot "
        f"(W={cost.n}), the slot capturing {ops[worst].name!r} needs {format_bytes(need)} "
        f"({need / bandwidth:.3g} s at {format_bytes(bandwidth)}/s) but one iteration lasts "
        f"{iteration_time_s:.3g} s (budget {format_bytes(budget)}). Every slot must also copy the "
        f"compute weights of the operators not yet captured (the first slot: "
        f"{format_bytes(compute_rest)}). Fix: raise the device-to-host bandwidth (pinned buffers, "
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
        operators: Operators in snapshot order; slices are contiguous runs of this order.
        iteration_time_s: The time budget of one slot (s).
        d2h_bandwidth_bytes_per_s: Device-to-host copy bandwidth (bytes/s).
        include_compute_in_full_slot: Also count the compute weights of the active slice.

    Returns:
        W, between 1 (a dense snapshot fits every iteration) and ``len(operators)``.

    Raises:
        WindowSizeError: when even one operator per slot does not fit; the message says what
            to change.
    """
    ops = validate_operators(operators)
    t = positive("iteration_time_s", iteration_time_s, "pass the measured iteration time")
    bw = positive(
        "d2h_bandwidth_bytes_per_s", d2h_bandwidth_bytes_per_s, "pass the measured D2H bandwidth"
    )
    cost = _cost_of(ops, include_compute_in_full_slot)
    w = smallest_window(cost, t * bw)
    if w is None:
        raise WindowSizeError(_infeasible_message(cost, ops, t, bw))
    return w


def least_stall_window_size(
    operators: Sequence[OperatorLike], *, include_compute_in_full_slot: bool = False
) -> int:
    """The window to run when none fits (:func:`find_window_size` raised): the smallest W whose
    largest slot is as small as any cut allows, so the stall per iteration is the least."""
    ops = validate_operators(operators)
    return least_stall_window(_cost_of(ops, include_compute_in_full_slot))


def partition_operators(
    operators: Sequence[Op],
    window_size: int,
    *,
    include_compute_in_full_slot: bool = False,
) -> List[List[Op]]:
    """Cuts ordered operators into ``window_size`` contiguous, non-empty slices whose largest
    slot (in bytes) is as small as the order allows.

    Raises:
        ScheduleError: when ``window_size`` is not in ``[1, len(operators)]``.
    """
    ops = validate_operators(operators)
    bounds = balanced_slices(_cost_of(ops, include_compute_in_full_slot), window_size)
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
