"""Expert-parallel and data-parallel aware split of the snapshot work.

Every rank snapshots only what it is responsible for, so that the ranks of a stage together hold
each operator exactly once:

* **Experts** live on one expert-parallel rank. When the expert data-parallel size is above one,
  the same experts are replicated on several ranks; each replica snapshots a disjoint subset.
* **Non-expert operators** (embedding, dense, router, output) are replicated on every
  data-parallel rank of the stage; they are split across the replicas, balanced against the
  expert bytes each rank already snapshots (MoC-System's adaptive sharding: a rank with more
  expert work gets fewer non-expert operators).
* With the **distributed optimizer**, the FP32 main parameters and optimizer moments of a
  parameter are sharded over the data-parallel ranks: each rank must snapshot the *full state of
  its own shard* of every operator it holds. Compute weights, which are replicated, are still
  split.

The assignment is computed locally and deterministically from the operator list (which is the
same on all replicas), so no communication is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from megatron_moevement.constants import DEFAULT_CHECKSUM
from megatron_moevement.logging_utils import get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class ShardingContext:
    """This rank's place in the data- and expert-parallel groups of its stage."""

    dp_rank: int
    """Rank in the (non-expert) data-parallel group."""
    dp_size: int
    """Size of the data-parallel group."""
    expert_dp_rank: int
    """Rank in the expert data-parallel group (ranks holding the same experts)."""
    expert_dp_size: int
    """Size of the expert data-parallel group."""
    distributed_optimizer: bool = False
    """Whether main params and optimizer state are sharded over the data-parallel ranks."""

    def __post_init__(self) -> None:
        for rank, size, what in (
            (self.dp_rank, self.dp_size, "dp"),
            (self.expert_dp_rank, self.expert_dp_size, "expert_dp"),
        ):
            if size < 1 or not 0 <= rank < size:
                raise ValueError(
                    f"ShardingContext: {what}_rank={rank} not in [0, {what}_size={size})"
                )


@dataclass
class ShardPlan:
    """What this rank snapshots."""

    full_state: set[str] = field(default_factory=set)
    """Operators whose full state (main params + optimizer state, this rank's part) it captures."""
    compute: set[str] = field(default_factory=set)
    """Operators whose compute weights it captures while they are frozen in a window."""
    owner_of: dict[str, int] = field(default_factory=dict)
    """For every operator of the stage: the replica index (dp or expert-dp rank) that captures
    its compute weights (and its full state unless the optimizer is distributed)."""
    load_bytes: list[int] = field(default_factory=list)
    """Estimated snapshot bytes per replica, for inspection."""

    def captures_full(self, op_name: str) -> bool:
        return op_name in self.full_state

    def captures_compute(self, op_name: str) -> bool:
        return op_name in self.compute


def _lpt_assign(items: Sequence[tuple[str, int]], loads: list[int]) -> dict[str, int]:
    """Longest-processing-time-first assignment of ``(name, bytes)`` items to the least loaded
    replica; ties go to the lowest replica index, items are ordered by bytes then name."""
    owner: dict[str, int] = {}
    for name, nbytes in sorted(items, key=lambda item: (-item[1], item[0])):
        target = min(range(len(loads)), key=lambda i: (loads[i], i))
        owner[name] = target
        loads[target] += nbytes
    return owner


def plan_shards(operators: Sequence, ctx: ShardingContext) -> ShardPlan:
    """Splits the snapshot work of a stage over its replicas and returns this rank's share.

    Args:
        operators: This rank's operators (objects with ``name``, ``kind``, ``compute_bytes`` and
            ``full_state_bytes``); the same list, up to expert identity, on every replica, and
            with sizes that are the same on every replica (not this rank's optimizer shard),
            or replicas would disagree on the split.
        ctx: This rank's place in the data- and expert-parallel groups.
    """
    experts = [op for op in operators if op.kind == "expert"]
    others = [op for op in operators if op.kind != "expert"]

    def cost(op) -> int:
        return op.compute_bytes + op.full_state_bytes

    # Experts: split over the expert-DP replicas holding the same experts.
    expert_loads = [0] * ctx.expert_dp_size
    expert_owner = _lpt_assign([(op.name, cost(op)) for op in experts], expert_loads)

    # Map expert load onto the (non-expert) DP replicas: dp rank d shares expert-DP replica
    # d % expert_dp_size (Megatron folds EP into DP, expert-DP ranks repeat along DP).
    loads = [expert_loads[d % ctx.expert_dp_size] for d in range(ctx.dp_size)]
    other_owner = _lpt_assign([(op.name, cost(op)) for op in others], loads)

    plan = ShardPlan(load_bytes=loads)
    for op in experts:
        plan.owner_of[op.name] = expert_owner[op.name]
        mine = expert_owner[op.name] == ctx.expert_dp_rank
        if mine:
            plan.compute.add(op.name)
        # With the distributed optimizer each expert-DP rank owns a shard of the expert state.
        if mine or (ctx.distributed_optimizer and ctx.expert_dp_size > 1):
            plan.full_state.add(op.name)
    for op in others:
        plan.owner_of[op.name] = other_owner[op.name]
        mine = other_owner[op.name] == ctx.dp_rank
        if mine:
            plan.compute.add(op.name)
        if mine or (ctx.distributed_optimizer and ctx.dp_size > 1):
            plan.full_state.add(op.name)
    logger.debug(
        "shard plan: %d full-state and %d compute operators on this rank, loads %s",
        len(plan.full_state),
        len(plan.compute),
        loads,
    )
    return plan


@dataclass
class OperatorGroups:
    """Process groups over which the replicas of an operator's state are assembled."""

    dense: object
    """Group of the data-parallel replicas of non-expert operators (CPU-capable)."""
    expert: object
    """Group of the expert data-parallel replicas (same experts)."""


def default_operator_groups() -> OperatorGroups:
    """gloo-backed data-parallel groups from Megatron's ``parallel_state`` (host tensors)."""
    from megatron.core import parallel_state as ps

    def gloo_or(getter_gloo, getter):
        try:
            group = getter_gloo()
            if group is not None:
                return group
        except (AssertionError, AttributeError, RuntimeError):
            pass
        return getter()

    return OperatorGroups(
        dense=gloo_or(ps.get_data_parallel_group_gloo, ps.get_data_parallel_group),
        expert=gloo_or(ps.get_expert_data_parallel_group_gloo, ps.get_expert_data_parallel_group),
    )


class ReplicaMismatchError(RuntimeError):
    """Data-parallel replicas of an operator hold different compute weights."""


def verify_replicas_identical(
    registry, sharding: ShardingContext, algorithm: str = DEFAULT_CHECKSUM
) -> None:
    """Raises :class:`ReplicaMismatchError` unless every replicated operator has the same compute
    weights on all of its data-parallel replicas (collective over the DP and expert-DP groups)."""
    import torch.distributed as dist

    from megatron_moevement.snapshot.checksum import checksum
    from megatron_moevement.state.operators import operator_tensors

    groups = default_operator_groups()
    for kind, group, size in (
        ("dense", groups.dense, sharding.dp_size),
        ("expert", groups.expert, sharding.expert_dp_size),
    ):
        if size <= 1:
            continue
        ops = [op for op in registry.operators if (op.kind == "expert") == (kind == "expert")]
        # Experts are named by global id, so replicas of one expert share the name.
        mine = {
            op.name: [checksum(v, algorithm) for _, v in operator_tensors(op, ("compute",))]
            for op in ops
        }
        gathered: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, (dist.get_rank(), mine), group=group)
        differing = sorted(
            {
                name
                for _, other in gathered
                for name, digest in other.items()
                if mine.get(name, digest) != digest
            }
        )
        if differing:
            ranks = [
                r for r, other in gathered if any(other.get(n) != mine.get(n) for n in differing)
            ]
            raise ReplicaMismatchError(
                f"rank {dist.get_rank()}: {len(differing)} {kind} operator(s) differ between "
                f"data-parallel replicas (e.g. {differing[:3]}; ranks {ranks} disagree with this "
                "one). MoEvement snapshots a replicated operator on one replica and restores it "
                "on all of them, so replicas must hold identical weights. Fix: seed every rank "
                "identically before building the model (torch.manual_seed and "
                "tensor_parallel.model_parallel_cuda_manual_seed), or load/broadcast the same "
                "checkpoint on every replica before constructing MoEvementStrategy."
            )
