"""A uniform view of Megatron-Core optimizers: model param -> FP32 main param -> Adam state.

Megatron-Core keeps the FP32 copy of a parameter and its optimizer moments in different places
depending on the optimizer class: ``FP32Optimizer`` steps the model parameter itself,
``Float16OptimizerWithFloat16Params`` keeps a full FP32 copy, and ``DistributedOptimizer`` keeps
only this data-parallel rank's *shard* of the FP32 copy. ``ChainedOptimizer`` wraps one of these
for dense and one for expert parameters. :class:`OptimizerView` hides those differences so the
operator registry, the snapshot engine and the replay engine see one mapping.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch


@dataclass
class ParamState:
    """Where the full training state of one model parameter lives on this rank."""

    model_param: torch.nn.Parameter
    """The compute weight (bf16/fp16/fp32) the forward pass uses."""

    main_param: torch.Tensor | None
    """The FP32 main parameter the optimizer steps, or this rank's shard of it; ``None`` if this
    rank owns no shard (distributed optimizer)."""

    optimizer_state: dict = field(default_factory=dict)
    """The inner optimizer's state of ``main_param`` (e.g. ``exp_avg``, ``exp_avg_sq``, ``step``);
    the dict object itself, so updates are seen live."""

    shard_range: tuple[int, int] | None = None
    """``(start, end)`` of the flattened parameter that ``main_param`` covers, or ``None`` when it
    covers the whole parameter."""

    main_is_model: bool = False
    """True when the optimizer steps the model parameter itself (plain FP32 training)."""

    optimizer_index: int = 0
    """Index of the owning optimizer in the chain (0 for an unchained optimizer)."""


def iter_optimizers(optimizer) -> list:
    """The leaf Megatron optimizers of ``optimizer`` (unwrapping ``ChainedOptimizer``)."""
    chained = getattr(optimizer, "chained_optimizers", None)
    if chained is not None:
        leaves = []
        for inner in chained:
            leaves.extend(iter_optimizers(inner))
        return leaves
    return [optimizer]


def first_leaf(optimizer):
    """The first leaf optimizer of ``optimizer`` (the one holding the loss scaler and config)."""
    return iter_optimizers(optimizer)[0]


def iter_stepped_params(optimizer) -> Iterator[tuple[Any, torch.Tensor]]:
    """``(leaf, param)`` for every parameter the inner torch optimizers step (the FP32 main
    parameters, or the model's own where it trains in FP32), leaf by leaf; the param's state is
    ``leaf.optimizer.state``."""
    for leaf in iter_optimizers(optimizer):
        for group in leaf.optimizer.param_groups:
            for p in group["params"]:
                yield leaf, p


def ensure_optimizer_state(optimizer) -> None:
    """Creates Adam state (step, moments) for parameters that have none yet, as torch's Adam does
    at its first step, so a rebuilt optimizer has tensors to restore into."""
    for leaf, p in iter_stepped_params(optimizer):
        state = leaf.optimizer.state[p]
        if state:
            continue
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class OptimizerView:
    """Maps each model parameter to its :class:`ParamState` for any Megatron-Core optimizer."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer
        self._by_param: dict[int, ParamState] = {}
        for index, leaf in enumerate(iter_optimizers(optimizer)):
            for state in _leaf_states(leaf):
                state.optimizer_index = index
                self._by_param[id(state.model_param)] = state

    def get(self, model_param: torch.nn.Parameter) -> ParamState | None:
        """The state of ``model_param``; ``None`` if no optimizer on this rank holds it."""
        state = self._by_param.get(id(model_param))
        if state is not None:
            # The inner optimizer creates a state dict lazily at the first step: refresh it.
            state.optimizer_state = _inner_state(self.optimizer, state)
        return state

    def __iter__(self) -> Iterator[ParamState]:
        for state in self._by_param.values():
            state.optimizer_state = _inner_state(self.optimizer, state)
            yield state

    def __len__(self) -> int:
        return len(self._by_param)


def _inner_state(optimizer, state: ParamState) -> dict:
    if state.main_param is None:
        return {}
    leaf = iter_optimizers(optimizer)[state.optimizer_index]
    return leaf.optimizer.state.get(state.main_param, {})


def _leaf_states(leaf) -> list[ParamState]:
    states: list[ParamState] = []
    if hasattr(leaf, "shard_fp32_from_float16_groups"):  # DistributedOptimizer
        pairs = [
            (leaf.model_float16_groups, leaf.shard_fp32_from_float16_groups),
            (leaf.model_fp32_groups, leaf.shard_fp32_groups),
        ]
        for model_groups, shard_groups in pairs:
            for model_group, shard_group in zip(model_groups, shard_groups):
                for model_param, shard in zip(model_group, shard_group):
                    prange = leaf._get_model_param_range_map(model_param)["param"]
                    states.append(
                        ParamState(model_param, shard, shard_range=(prange.start, prange.end))
                    )
        return states
    if hasattr(leaf, "fp32_from_float16_groups"):  # Float16OptimizerWithFloat16Params
        for model_group, main_group in zip(leaf.float16_groups, leaf.fp32_from_float16_groups):
            for model_param, main_param in zip(model_group, main_group):
                states.append(ParamState(model_param, main_param))
        for group in leaf.fp32_from_fp32_groups:
            for param in group:
                states.append(ParamState(param, param, main_is_model=True))
        return states
    # FP32Optimizer: the inner optimizer steps the model parameters directly.
    for group in leaf.optimizer.param_groups:
        for param in group["params"]:
            states.append(ParamState(param, param, main_is_model=True))
    return states
