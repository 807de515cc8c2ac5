"""Scoped recovery: roll back only the pipeline stages that lost state, fed by neighbours' logs.

After a failure every rank reports ``(pipeline stage, data-parallel rank, committed iteration,
dirty)``. The *scope* is every rank of every stage that holds a failed rank (its replacement has no
state, and its data-parallel and expert-parallel peers must replay with it because gradients are
reduced and tokens exchanged among them) or a *dirty* rank (one interrupted inside its optimizer
step, whose state may be half-updated). Ranks outside the scope keep their live state; they must
all have committed the same iteration ``C`` (a consistent cut), else scoped recovery is impossible
and the driver falls back to global rollback.

Ranks in scope roll back to the persisted sparse checkpoint and replay to ``C`` through a
:class:`ReplayP2PCommunicator`: towards a neighbour stage that is also in scope it communicates
normally (adjacent failed stages recover jointly); towards a neighbour outside the scope it takes
the activations (from upstream) and input-gradients (from downstream) that the neighbour logged
in the original run, and sends nothing. Non-adjacent stages in scope replay in parallel."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_moevement.logging_utils import get_logger

logger = get_logger(__name__)


@dataclass
class RankStatus:
    """Where one rank stands after a failure."""

    rank: int
    pp_rank: int
    dp_rank: int
    committed: int
    """Last iteration whose optimizer step completed on it (-1 for a replacement)."""
    dirty: bool
    """The failure interrupted its optimizer step (its state may be half-updated)."""
    has_state: bool
    """It survived (a replacement has no state)."""
    logging: bool
    """It keeps upstream logs."""
    tp_rank: int = 0
    """Its tensor-parallel rank: p2p partners across stages share (data-parallel, tp) ranks."""


@dataclass
class ScopePlan:
    """The outcome of scope planning."""

    scoped: bool
    """True for scoped recovery, False for global rollback."""
    ranks: list[int]
    """Ranks that roll back and replay."""
    stages: list[int]
    committed: int
    """Iteration every rank is at after recovery."""
    reason: str
    """Why global rollback was chosen (empty for scoped)."""


def global_plan(statuses: list[RankStatus], reason: str) -> ScopePlan:
    """Every rank rolls back and replays to the survivors' last common committed iteration
    (needs at least one rank with state)."""
    committed = min(s.committed for s in statuses if s.has_state)
    return ScopePlan(
        False,
        [s.rank for s in statuses],
        sorted({s.pp_rank for s in statuses}),
        committed,
        reason,
    )


def plan_scope(statuses: list[RankStatus], failed: list[int], prefer_scoped: bool) -> ScopePlan:
    """Chooses the recovery scope (see the module docstring). Needs at least one rank with
    state: when every rank lost it, the driver stops recovery before planning."""
    bad_stages = {s.pp_rank for s in statuses if s.rank in failed or not s.has_state or s.dirty}
    scope = [s for s in statuses if s.pp_rank in bad_stages]
    outside = [s for s in statuses if s.pp_rank not in bad_stages]

    if not prefer_scoped:
        return global_plan(
            statuses,
            "scoped recovery disabled (upstream logging off or recovery_scope='global')",
        )
    if not outside:
        return global_plan(statuses, "every pipeline stage lost state")
    if not all(s.logging for s in statuses):
        return global_plan(statuses, "upstream logs are not kept on every rank")
    cut = {s.committed for s in outside}
    if len(cut) != 1:
        return global_plan(
            statuses,
            f"ranks outside the failed stages disagree on the last committed "
            f"iteration {sorted(cut)}",
        )
    return ScopePlan(True, [s.rank for s in scope], sorted(bad_stages), cut.pop(), "")
