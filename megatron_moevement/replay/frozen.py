"""Frozen/active execution of a replayed iteration.

* active operators: forward, backward (input and weight gradients) and the optimizer update;
* frozen operators: forward and input gradient only. Their parameters have
  ``requires_grad=False``, which makes Megatron's linear layers take their frozen-weight path (no
  weight-gradient GEMM), leaves their slots in the DDP gradient buffers at zero (so buckets keep
  their layout and reduce in the same order), and their main parameters get no gradient, so the
  optimizer skips them.

The replayed optimizer step (:func:`replay_optimizer_step`) runs Megatron's own step phases with
the original run's scalars (:mod:`megatron_moevement.replay.scalar_log`) instead of values
recomputed from the replay's partial gradients.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Sequence

import torch

from megatron_moevement.logging_utils import get_logger
from megatron_moevement.replay.scalar_log import StepScalars, restore_scaler_state
from megatron_moevement.state.optim_view import iter_optimizers

logger = get_logger(__name__)


@contextlib.contextmanager
def frozen_operators(registry, names: Iterable[str]):
    """Marks the parameters of operators ``names`` as frozen (``requires_grad=False``).

    Frozen operators still propagate input gradients. When the input embedding is frozen, its
    output is made to require grad so the backward pass always reaches every layer: otherwise a
    rank whose local experts of a layer are all frozen (with everything before them frozen too)
    would skip that layer's all-to-all backward while an expert-parallel peer with active experts
    runs it, and the peers would deadlock. Weight gradients do not depend on it.

    A stacked weight (grouped-GEMM experts) is frozen only when every expert that owns a block
    of it is: otherwise it trains, and its frozen blocks' updates are discarded (the next slot
    loads their compute weights, and their full state is loaded with their own slot).
    """
    names = list(names)
    params = _wholly_frozen(registry, names)
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


def _wholly_frozen(registry, names: list[str]) -> list[torch.nn.Parameter]:
    """The parameters every owner of which is among the operators ``names`` (each once)."""
    frozen = set(names)
    out, seen = [], set()
    for name in names:
        for p in registry[name].params:
            if id(p.param) in seen:
                continue
            owners = registry.owners(p.param) if hasattr(registry, "owners") else [name]
            if all(owner in frozen for owner in owners):
                seen.add(id(p.param))
                out.append(p.param)
    return out


def frozen_main_params(registry, names: Iterable[str]) -> list[torch.Tensor]:
    """The main parameters (or shards) of the wholly frozen parameters of operators ``names``
    on this rank (see :func:`frozen_operators`)."""
    registry.refresh()
    names = list(names)
    frozen = {id(param) for param in _wholly_frozen(registry, names)}
    out, seen = [], set()
    for name in names:
        for p in registry[name].params:
            main = None if p.state is None else p.state.main_param
            if main is not None and id(p.param) in frozen and id(main) not in seen:
                seen.add(id(main))
                out.append(main)
    return out
