"""Choosing the recovery tier: a pure function from what survived to a :class:`RecoveryPlan`.

After a failure every rank reports where it stands; gathered, that is a :class:`Survey`, the
same on every rank. :func:`plan_recovery` turns it into a plan without communicating, so every
rank computes the same plan:

1. **Scope** (:func:`~megatron_moevement.recovery.scope.plan_scope`): scoped when the ranks
   outside the failed stages agree on the last committed iteration and every rank kept upstream
   logs, else global.
2. **Tier**: the newest window persisted on every rank with state, rebuilt on the ranks that
   lost it from a surviving peer replica (*sparse-checkpoint*). A rank whose checkpoint has no
   surviving replica needs the *durable* tier (:func:`resolve_durable`, after the driver asked
   the durable loader on every rank); without one, the plan is an error naming the missing
   replica and the next tier. Before any window persisted (a failure in the first window), every
   rank rebuilds the job's initial state and replays from its first iteration
   (*initial-state*), unless the durable tier holds a checkpoint of this run.
3. **Transfers**: which surviving rank sends each lost checkpoint, and which rank sends the
   optimizer-scalar log to the ranks that replay without one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megatron_moevement.recovery.errors import RecoveryError
from megatron_moevement.recovery.scope import RankStatus, ScopePlan, global_plan, plan_scope

__all__ = [
    "INITIAL_STATE",
    "DURABLE",
    "SPARSE_CHECKPOINT",
    "RecoveryPlan",
    "Survey",
    "plan_recovery",
    "resolve_durable",
]

SPARSE_CHECKPOINT = "sparse-checkpoint"
"""Tier: the in-memory sparse checkpoints (own buffers and peer replicas)."""
DURABLE = "durable"
"""Tier: the durable ``dist_checkpointing`` checkpoints, for at least one rank."""
INITIAL_STATE = "initial-state"
"""Tier: no checkpoint had persisted yet; every rank rebuilds the job's initial state."""


@dataclass(frozen=True)
class Survey:
    """What every rank reported after the rebuild (identical on every rank)."""

    statuses: list[RankStatus]
    """Per rank (by rank): stage, data-parallel rank, committed iteration, state flags."""
    failed: list[int]
    """Ranks that failed (their replacements have no state)."""
    window: int
    """Newest window persisted on every rank that has state (-1: none yet)."""
    holds_window: list[bool]
    """Per rank: it holds its own checkpoint of :attr:`window`."""
    replica_peers: list[list[int]]
    """Per rank: the ranks that hold replicas of its checkpoints, in order of preference."""
    has_scalar_log: list[bool]
    """Per rank: it holds the optimizer-scalar log of the original run."""
    corrupted_replicas: list[tuple[int, int]] = field(default_factory=list)
    """``(holder, source)``: the replica of ``source``'s checkpoint of :attr:`window` that
    ``holder`` keeps failed its checksums (it is not fetched from)."""
    prefer_scoped: bool = True
    """Scoped recovery is allowed (upstream logging on and ``recovery_scope="auto"``)."""
    durable_dir_set: bool = False
    """``MoEvementConfig.durable_dir`` is configured."""
    durable_loader_installed: bool = False
    """The driver has a durable checkpoint loader."""

    @property
    def world_size(self) -> int:
        return len(self.statuses)


@dataclass(frozen=True)
class RecoveryPlan:
    """How a recovery proceeds (the same on every rank)."""

    scope: ScopePlan
    """Which ranks roll back (scoped or global) and the iteration everyone ends at."""
    tier: str
    """:data:`SPARSE_CHECKPOINT`, :data:`DURABLE` or :data:`INITIAL_STATE`."""
    window: int
    """Window every rank in scope rolls back to (-1 with the initial state)."""
    fetch_from: dict[int, int] = field(default_factory=dict)
    """Rank that lacks its checkpoint of :attr:`window` -> the surviving replica holder that
    sends it."""
    durable_ranks: list[int] = field(default_factory=list)
    """Ranks whose checkpoint has no surviving replica: they need the durable tier."""
    log_source: int = 0
    """The rank that sends the optimizer-scalar log to the ranks that need it."""
    needs_log: list[int] = field(default_factory=list)
    """Ranks that receive the optimizer-scalar log from :attr:`log_source`."""
    reason: str = ""
    """Why recovery is global (empty when scoped)."""

    @property
    def path(self) -> str:
        """``scoped``/``global`` (in memory) or ``durable``: the recovery that runs."""
        if self.tier == DURABLE:
            return "durable"
        return "scoped" if self.scope.scoped else "global"

    @property
    def needs_durable(self) -> bool:
        """True until the durable tier has been consulted (:func:`resolve_durable`)."""
        return bool(self.durable_ranks) and self.tier != DURABLE


def _holders(survey: Survey, rank: int) -> list[int]:
    """Surviving ranks with an intact replica of ``rank``'s checkpoint, in order of preference."""
    bad = set(survey.corrupted_replicas)
    return [
        p for p in survey.replica_peers[rank] if p not in survey.failed and (p, rank) not in bad
    ]


def _lost_ranks(survey: Survey, needs: list[bool]) -> list[int]:
    """Ranks that need the window's checkpoint and have no surviving, intact replica."""
    return [r for r in range(survey.world_size) if needs[r] and not _holders(survey, r)]


def _transfers(
    survey: Survey, scope: ScopePlan, needs_ckpt: list[bool], skip: list[int]
) -> tuple[dict[int, int], int, list[int]]:
    fetch = {}
    for r in range(survey.world_size):
        if needs_ckpt[r] and r not in skip:
            fetch[r] = _holders(survey, r)[0]
    in_scope = set(scope.ranks)
    if scope.scoped:
        log_source = min(r for r in range(survey.world_size) if r not in in_scope)
        needs_log = [r for r in sorted(in_scope) if r != log_source]
    else:
        log_source = min(r for r, s in enumerate(survey.statuses) if s.has_state)
        needs_log = [
            r for r in range(survey.world_size) if r != log_source and not survey.has_scalar_log[r]
        ]
    return fetch, log_source, needs_log


def _why_lost(survey: Survey, lost: list[int]) -> str:
    if survey.window < 0:
        return (
            "no sparse checkpoint is persisted on every surviving rank yet (failure in the "
            "first window)"
        )
    bad = set(survey.corrupted_replicas)

    def why(r: int) -> str:
        corrupted = sorted(h for h, s in bad if s == r)
        if not corrupted:
            return (
                f"rank {r}'s sparse checkpoint has no surviving replica (its peers "
                f"{survey.replica_peers[r]} failed too)"
            )
        return (
            f"rank {r}'s sparse checkpoint has no surviving replica that verifies (its peers "
            f"{survey.replica_peers[r]}: the replicas on {corrupted} are corrupted, the others "
            "failed)"
        )

    return "; ".join(why(r) for r in lost)


def plan_recovery(survey: Survey) -> RecoveryPlan:
    """The recovery plan for ``survey`` (see the module docstring).

    A returned plan with :attr:`RecoveryPlan.needs_durable` still needs the durable tier's
    answer (:func:`resolve_durable`).

    Raises:
        RecoveryError: every rank lost its state, or a checkpoint without a surviving replica
            and no durable tier configured; the message says what to fall back to.
    """
    if not any(s.has_state for s in survey.statuses):
        # Host memory (checkpoints, replicas, scalar log) died with every process: nothing in
        # memory can rebuild the run, and waiting for another generation would not help.
        raise RecoveryError(
            f"every rank lost its state (ranks {survey.failed} failed and no rank survived: all "
            "failed at once, or the job has a single rank, whose sparse checkpoints have no "
            "peer to be replicated to). In-memory recovery needs a surviving replica. Fix: "
            "restart the job from the durable tier (MoEvementConfig.durable_dir) or from "
            "Megatron's --save/--load; run with at least two ranks for in-memory recovery."
        )
    scope = plan_scope(survey.statuses, survey.failed, survey.prefer_scoped)
    durable = survey.durable_dir_set and survey.durable_loader_installed
    if survey.window < 0:
        if durable:  # the durable tier may hold a checkpoint of this run: ask it first
            return RecoveryPlan(
                scope, SPARSE_CHECKPOINT, -1, durable_ranks=list(range(survey.world_size))
            )
        return _initial_state_plan(survey)
    in_scope = set(scope.ranks)
    needs_ckpt = [r in in_scope and not survey.holds_window[r] for r in range(survey.world_size)]
    lost = _lost_ranks(survey, needs_ckpt)
    if lost and not durable:
        missing = (
            "MoEvementConfig.durable_dir is not set"
            if not survey.durable_dir_set
            else "no durable checkpoint loader is installed (RecoveryDriver.durable_loader)"
        )
        raise RecoveryError(
            f"{_why_lost(survey, lost)}. Tried scoped and global in-memory recovery; the durable "
            f"tier is the next fallback, but {missing}. Fix: configure the durable tier "
            "(MoEvementConfig.durable_dir) or raise replication_factor; restart the job from "
            "the durable tier."
        )
    fetch, log_source, needs_log = _transfers(survey, scope, needs_ckpt, skip=lost)
    return RecoveryPlan(
        scope,
        SPARSE_CHECKPOINT,
        survey.window,
        fetch_from=fetch,
        durable_ranks=lost,
        log_source=log_source,
        needs_log=needs_log,
        reason=scope.reason,
    )


def _initial_state_plan(survey: Survey) -> RecoveryPlan:
    scope = global_plan(
        survey.statuses,
        "no sparse checkpoint had persisted yet (failure in the first window): every rank "
        "replays from the job's initial state",
    )
    _, log_source, needs_log = _transfers(survey, scope, [False] * survey.world_size, [])
    return RecoveryPlan(
        scope, INITIAL_STATE, -1, log_source=log_source, needs_log=needs_log, reason=scope.reason
    )


def resolve_durable(
    plan: RecoveryPlan, survey: Survey, durable_windows: list[int], durable_dir: str = ""
) -> RecoveryPlan:
    """The plan once the durable tier answered: ``durable_windows[r]`` is the window of rank
    ``r``'s newest durable checkpoint (-1: none).

    * Every rank's durable checkpoint is of the in-memory window: only the lost ranks take
      theirs; the scope stays.
    * All of an older window: every rank rolls back to it (global).
    * None anywhere while no window persisted in memory: the initial-state tier.

    Raises:
        RecoveryError: some ranks have no durable checkpoint, or they span several windows.
    """
    low, high = min(durable_windows), max(durable_windows)
    why = _why_lost(survey, plan.durable_ranks)
    if survey.window < 0 and high < 0:
        return _initial_state_plan(survey)
    if low < 0 or low != high:
        absent = [r for r, w in enumerate(durable_windows) if w < 0]
        detail = (
            f"ranks {absent} have no durable checkpoint"
            if absent
            else f"durable checkpoints span windows {low}..{high}"
        )
        raise RecoveryError(
            f"{why}, and the durable tier ({durable_dir}) cannot replace it: {detail}. "
            "Restart the job from an older durable checkpoint."
        )
    if low == survey.window:
        # Same window: the lost ranks load theirs, the others fetch from replicas as planned.
        return dataclasses.replace(plan, tier=DURABLE)
    # An older window: every rank has just loaded it and rolls back to it (global).
    scope = global_plan(
        survey.statuses,
        f"the durable tier holds window {low}, not the in-memory window {survey.window}: every "
        "rank rolls back to it",
    )
    _, log_source, needs_log = _transfers(survey, scope, [False] * survey.world_size, [])
    return RecoveryPlan(
        scope,
        DURABLE,
        low,
        durable_ranks=list(range(survey.world_size)),
        log_source=log_source,
        needs_log=needs_log,
        reason=scope.reason,
    )
