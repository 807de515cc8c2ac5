"""Operator order of a sparse checkpointing window (paper ``OrderOperators``).

Experts come by ascending popularity (see :mod:`megatron_moevement.schedule.popularity`), then
the non-expert operators. Non-expert operators see every token (they are the most "popular"
operators), so by the paper's own criterion they are captured last and stay frozen longest
(frozen operators skip their weight-gradient GEMMs and optimizer update during replay). Among
themselves they go from the output toward the input (output layer, then layers by descending
index with router before dense, embedding last), following Appendix E: capturing back layers
first keeps front layers frozen longest.
"""

from __future__ import annotations

import math
from typing import (
    Any,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import torch

from megatron_moevement.schedule.popularity import (
    ExpertPopularity,
    LayerScores,
    OrderingPolicy,
    PopularitySnapshot,
    get_ordering_policy,
)
from megatron_moevement.schedule.window import Op, OperatorLike, ScheduleError, validate_operators

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
    ops = validate_operators(operators)
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
