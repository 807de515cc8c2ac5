"""Sparse-to-dense conversion: frozen/active execution and replay from a sparse checkpoint.

Loading slot ``k`` of a window makes the operators of slice ``k`` *active* (their FP32 main
parameters, optimizer state and compute weights are restored) and sets the compute weights of the
operators of later slices, which stay *frozen*. Replaying the next iteration then runs

* active operators: forward, backward (input and weight gradients) and the optimizer update;
* frozen operators: forward and input gradient only. Their parameters have
  ``requires_grad=False``, which makes Megatron's linear layers take their frozen-weight path (no
  weight-gradient GEMM), leaves their slots in the DDP gradient buffers at zero (so buckets keep
  their layout and reduce in the same order), and their main parameters get no gradient, so the
  optimizer skips them.

Global values the optimizer step depends on are not recomputed from the partial gradients of a
replay: the total gradient norm (hence the clip coefficient), the skip decision of fp16 loss
scaling and the learning rates are taken from the :class:`ScalarLog` written during the original
run. After slot ``W-1`` every operator is active and the state equals a dense checkpoint at the
window's last iteration; replay then continues, all active, to the target iteration.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from megatron_moevement.logging_utils import get_logger
from megatron_moevement.state.optim_view import iter_optimizers
from megatron_moevement.snapshot.engine import SnapshotError, SparseCheckpoint, _operator_tensors

logger = get_logger(__name__)


class ReplayError(RuntimeError):
    """Replay cannot reproduce the original run (missing log entry, layout mismatch, ...)."""


@dataclass
class StepScalars:
    """What one optimizer step of the original run depended on beyond local gradients."""

    iteration: int
    grad_norm: float | None
    """Total gradient norm over all parameters of all stages (``None`` without clipping)."""
    update_successful: bool
    """False when fp16 loss scaling skipped the step (found inf/nan)."""
    learning_rates: list[list[float]] = field(default_factory=list)
    """``param_group["lr"]`` of every param group of every leaf optimizer, at step time."""
    scaler_state: dict | None = None
    """The fp16 loss scaler's state before the step (``None`` without a scaler)."""

    def to_dict(self) -> dict:
        return dict(
            iteration=self.iteration,
            grad_norm=self.grad_norm,
            update_successful=self.update_successful,
            learning_rates=self.learning_rates,
            scaler_state=self.scaler_state,
        )

    @classmethod
    def from_dict(cls, d: dict) -> "StepScalars":
        return cls(**d)


class ScalarLog:
    """Per-iteration :class:`StepScalars` of the original run, kept in host memory."""

    def __init__(self) -> None:
        self._entries: dict[int, StepScalars] = {}

    def record(self, entry: StepScalars) -> None:
        self._entries[entry.iteration] = entry

    def get(self, iteration: int) -> StepScalars:
        try:
            return self._entries[iteration]
        except KeyError:
            raise ReplayError(
                f"no logged optimizer scalars for iteration {iteration} (have "
                f"{self.span()}); replay needs the log from the original run — fall back to a "
                "global rollback from an older checkpoint or the durable tier"
            ) from None

    def __contains__(self, iteration: int) -> bool:
        return iteration in self._entries

    def span(self) -> str:
        if not self._entries:
            return "none"
        return f"{min(self._entries)}..{max(self._entries)}"

    def discard_before(self, iteration: int) -> None:
        """Frees entries older than ``iteration`` (the start of the persisted checkpoint)."""
        for key in [k for k in self._entries if k < iteration]:
            del self._entries[key]

    def to_dict(self) -> dict:
        return {str(k): v.to_dict() for k, v in sorted(self._entries.items())}

    def load_dict(self, data: dict) -> None:
        for value in data.values():
            self.record(StepScalars.from_dict(value))

    def __len__(self) -> int:
        return len(self._entries)


def learning_rates(optimizer) -> list[list[float]]:
    return [
        [float(g["lr"]) for g in leaf.optimizer.param_groups] for leaf in iter_optimizers(optimizer)
    ]


@contextlib.contextmanager
def frozen_operators(registry, names: Iterable[str]):
    """Marks the parameters of operators ``names`` as frozen (``requires_grad=False``).

    Frozen operators still propagate input gradients. When the input embedding is frozen, its
    output is made to require grad so the backward pass always reaches every layer: otherwise a
    rank whose local experts of a layer are all frozen (with everything before them frozen too)
    would skip that layer's all-to-all backward while an expert-parallel peer with active experts
    runs it, and the peers would deadlock. Weight gradients do not depend on it.
    """
    names = list(names)
    params = [p.param for name in names for p in registry[name].params]
    previous = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    embedding = getattr(registry, "input_embedding", None)
    handle = None
    if embedding is not None and "embedding" in names:

        def require_grad(module, args, output):
            if torch.is_tensor(output) and output.is_floating_point() and not output.requires_grad:
                return output.detach().requires_grad_()
            return output

        handle = embedding.register_forward_hook(require_grad)
    try:
        yield params
    finally:
        if handle is not None:
            handle.remove()
        for p, req in zip(params, previous):
            p.requires_grad_(req)


def restore_scaler_state(optimizer, scalars: StepScalars) -> None:
    """Puts the fp16 loss scaler back in the state it had before the original step (call before
    the replayed forward/backward, whose loss it scales)."""
    if scalars.scaler_state is None:
        return
    for leaf in iter_optimizers(optimizer):
        scaler = getattr(leaf, "grad_scaler", None)
        if scaler is not None:
            scaler.load_state_dict(
                {
                    k: torch.tensor([v]) if k == "scale" else v
                    for k, v in scalars.scaler_state.items()
                }
            )


def replay_optimizer_step(
    optimizer, scalars: StepScalars, frozen_main_params: Sequence, use_logged_norm: bool = True
):
    """One optimizer step of a replayed iteration, driven by the original run's scalars.

    Runs Megatron's own step phases — ``prepare_grads`` (copy to main grads, unscale),
    clipping with the *logged* total norm, and ``step_with_ready_grads`` (inner step, copy to
    model params, parameter all-gather) — with the frozen main parameters' gradients removed, so
    the inner optimizer leaves them (and their moments) untouched.

    ``use_logged_norm=False`` recomputes the norm from the replay's partial gradients instead; it
    exists only to demonstrate (in tests) that doing so breaks bitwise equality.
    """
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    leaves = iter_optimizers(optimizer)
    restore_scaler_state(optimizer, scalars)
    for leaf, lrs in zip(leaves, scalars.learning_rates):
        for group, lr in zip(leaf.optimizer.param_groups, lrs):
            group["lr"] = lr
    restore = _force_found_inf(leaves, not scalars.update_successful)
    try:
        optimizer.prepare_grads()
    finally:
        restore()
    if not scalars.update_successful:
        return False, None, None
    total_norm = scalars.grad_norm if use_logged_norm else optimizer.get_grad_norm()
    for leaf in leaves:
        if getattr(leaf, "is_stub_optimizer", False) or leaf.config.clip_grad <= 0.0:
            continue
        params = leaf.get_parameters()
        if params and total_norm is not None:
            clip_grad_by_total_norm_fp32(
                params,
                max_norm=leaf.config.clip_grad,
                total_norm=total_norm,
                use_decoupled_grad=getattr(
                    leaf.config, "use_precision_aware_optimizer_no_fp8_or_ds_fp8", False
                ),
            )
    for main in frozen_main_params:
        main.grad = None
    success = optimizer.step_with_ready_grads()
    return success, total_norm, None


def _force_found_inf(leaves, value: bool):
    """Makes the loss-scaler overflow check use the logged decision; returns an undo function.

    Megatron's check unscales the main gradients and then all-reduces ``found_inf`` over the
    model-parallel group, which spans the stages that do not replay in a scoped recovery (and
    the partial gradients of a replay could overflow differently anyway). The replacement does
    the same local unscale with the same torch op, and takes the decision from the log.
    """
    patched = []
    for leaf in leaves:
        scaler = getattr(leaf, "grad_scaler", None)
        if scaler is None or not hasattr(leaf, "_unscale_main_grads_and_check_for_nan"):
            continue
        original = leaf._unscale_main_grads_and_check_for_nan

        def forced(leaf=leaf, scaler=scaler):
            if not getattr(leaf, "is_stub_optimizer", False):
                grads = leaf._collect_main_grad_data_for_unscaling()
                found = torch.zeros(1, dtype=torch.float, device=scaler.inv_scale.device)
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found, scaler.inv_scale)
            return value

        leaf._unscale_main_grads_and_check_for_nan = forced
        patched.append((leaf, original))

    def restore():
        for leaf, original in patched:
            leaf._unscale_main_grads_and_check_for_nan = original

    return restore


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
        for key, live in _operator_tensors(op, kinds):
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
        return placed

    def apply(self, ckpt: SparseCheckpoint, k: int) -> dict:
        """Loads slot ``k``: full state of slice ``k``, compute weights of slices ``k..``."""
        slot = ckpt.slots[k]
        if slot is None:
            raise SnapshotError(
                f"sparse checkpoint window {ckpt.generation} is incomplete: slot {k} missing"
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
        return stats


def frozen_main_params(registry, names: Iterable[str]) -> list[torch.Tensor]:
    """The main parameters (or shards) of operators ``names`` on this rank."""
    registry.refresh()
    out = []
    for name in names:
        for p in registry[name].params:
            if p.state is not None and p.state.main_param is not None:
                out.append(p.state.main_param)
    return out
