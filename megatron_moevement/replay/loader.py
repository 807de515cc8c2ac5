"""Loading the slots of a sparse checkpoint into the live model and optimizer of a rank.

Loading slot ``k`` of a window makes the operators of slice ``k`` *active* (their FP32 main
parameters, optimizer state and compute weights are restored) and sets the compute weights of the
operators of later slices, which stay *frozen*. Each rank captured only its share of an operator
replicated over data-parallel ranks (:mod:`megatron_moevement.snapshot.sharding`); the loader
assembles the pieces from the replica that captured them.
"""

from __future__ import annotations

from megatron_moevement.snapshot.sharding import OperatorGroups
from megatron_moevement.snapshot.slots import SnapshotError, SparseCheckpoint
from megatron_moevement.state.operators import operator_tensors
from megatron_moevement.state.rng import RNG_PREFIX, set_rng_state


class SlotLoader:
    """Applies the slots of a sparse checkpoint to the live model and optimizer of a rank,
    assembling the pieces other replicas captured (see :mod:`megatron_moevement.snapshot.sharding`).

    ``groups`` may be ``None`` when no operator has replicas (data-parallel sizes of 1).
    """

    def __init__(self, registry, plan, sharding, groups: OperatorGroups | None) -> None:
        self.registry = registry
        self.plan = plan
        self.sharding = sharding
        self.groups = groups

    def _group_and_rank(self, op) -> tuple[object, int, int]:
        """(process group, my index in it, its size) of the replicas of ``op``."""
        if op.kind == "expert":
            s = self.sharding
            return getattr(self.groups, "expert", None), s.expert_dp_rank, s.expert_dp_size
        return getattr(self.groups, "dense", None), self.sharding.dp_rank, self.sharding.dp_size

    def _place(self, op, kinds: tuple[str, ...], slot, from_owner: bool) -> int:
        """Copies the ``kinds`` tensors of ``op`` from ``slot`` (or from the owner replica)."""
        import torch.distributed as dist

        group, my_index, group_size = self._group_and_rank(op)
        owner_index = self.plan.owner_of.get(op.name, my_index)
        me_owner = owner_index == my_index or not from_owner
        placed = 0
        for key, live in operator_tensors(op, kinds):
            if me_owner:
                if slot is None or key not in slot.records:
                    raise SnapshotError(
                        f"slot {getattr(slot, 'slot', '?')} of rank {getattr(slot, 'owner_rank', '?')}"
                        f" lacks {key!r}: the sparse checkpoint does not match this layout or "
                        "schedule; restore on the layout that wrote it"
                    )
                stored = slot.tensor(key)
                if stored.shape != live.shape or stored.dtype != live.dtype:
                    raise SnapshotError(
                        f"{key}: snapshot holds {tuple(stored.shape)} {stored.dtype} but the "
                        f"model has {tuple(live.shape)} {live.dtype}; the layout or model "
                        "config differs from the one that wrote the checkpoint"
                    )
                live.copy_(stored)
            if from_owner and group_size > 1:
                owner_global = dist.get_global_rank(group, owner_index)
                buf = live if live.device.type == "cpu" else live.cpu()
                dist.broadcast(buf, src=owner_global, group=group)
                if buf is not live:
                    live.copy_(buf)
            placed += 1
        if "compute" in kinds:
            op.after_restore()
        return placed

    def apply(self, ckpt: SparseCheckpoint, k: int) -> dict:
        """Loads slot ``k``: full state of slice ``k``, compute weights and buffers of slices
        ``k..``, and this rank's RNG states of the slot's iteration."""
        slot = ckpt.slots[k]
        if slot is None:
            raise SnapshotError(
                f"sparse checkpoint window {ckpt.window} is incomplete: slot {k} missing"
            )
        slot.verify()
        self.registry.refresh()
        slices = ckpt.schedule["slices"]
        distributed = self.sharding.distributed_optimizer
        stats = {"full": 0, "compute": 0}
        for name in slices[k]:
            op = self.registry[name]
            stats["full"] += self._place(op, ("main", "optim"), slot, from_owner=not distributed)
        for name in [n for s in slices[k:] for n in s]:
            stats["compute"] += self._place(
                self.registry[name], ("compute",), slot, from_owner=True
            )
        rng = {
            key[len(RNG_PREFIX) :]: slot.tensor(key)
            for key in slot.keys()
            if key.startswith(RNG_PREFIX)
        }
        if rng:
            # This rank's generators as they were after the slot's iteration: the next replayed
            # iteration draws the dropout masks the original run drew.
            set_rng_state(rng)
            stats["rng"] = len(rng)
        return stats
