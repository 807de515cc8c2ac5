"""Checkpointable operators of each pipeline stage, with their sizes and popularity.

MoEvement treats every expert, every router (gate) and each layer's non-expert part as an
independently snapshotable operator (paper §3.2, §4). This module lists them per stage with
their parameter count, their *activation share* (tokens that pass through the operator per
token of the batch: 1 for non-expert parts, gates and shared experts, ``top_k * p_e`` for
routed expert ``e`` whose popularity share is ``p_e``) and their weight-gradient work
(``params * activation share``), which is what a frozen operator saves during replay.

Expert popularity follows a deterministic Zipf law whose exponent is fitted to a target
normalized Herfindahl-Hirschman index (the skewness measure of the paper's Appendix D):
``S = (sum p_e^2 - 1/E) / (1 - 1/E)``, 0 for uniform routing and 1 when one expert takes all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

import numpy as np

from megatron_moevement.sim._validation import check_fraction
from megatron_moevement.sim.specs import ModelSpec, ParallelPlan

__all__ = [
    "KIND_EXPERT",
    "KIND_NONEXPERT",
    "StageOperators",
    "build_stage_operators",
    "expert_popularity",
    "normalized_hhi",
]

KIND_NONEXPERT = 0
"""Operator kind code: attention, dense FFN, gate, shared expert, embedding, output layer."""

KIND_EXPERT = 1
"""Operator kind code: routed expert."""


def normalized_hhi(shares: np.ndarray) -> float:
    """Normalized Herfindahl-Hirschman index of popularity shares (paper Appendix D)."""
    shares = np.asarray(shares, dtype=np.float64)
    n = shares.size
    if n <= 1:
        return 0.0
    shares = shares / shares.sum()
    return float((np.sum(shares**2) - 1.0 / n) / (1.0 - 1.0 / n))


def _zipf(num_experts: int, exponent: float) -> np.ndarray:
    weights = np.arange(1, num_experts + 1, dtype=np.float64) ** (-exponent)
    return weights / weights.sum()


def expert_popularity(num_experts: int, skew: float) -> np.ndarray:
    """Token shares of ``num_experts`` experts with normalized HHI ``skew``, most popular first.

    Args:
        num_experts: Experts per layer E.
        skew: Target normalized HHI in [0, 1); 0 gives uniform routing.

    Returns:
        Shares summing to 1, in descending order.
    """
    check_fraction("expert_popularity", "skew", skew, high_open=True)
    if num_experts == 1 or skew == 0:
        return np.full(num_experts, 1.0 / num_experts)
    lo, hi = 0.0, 1.0
    while normalized_hhi(_zipf(num_experts, hi)) < skew:
        hi *= 2.0
        if hi > 1e4:  # pragma: no cover - skew numerically ~1
            break
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if normalized_hhi(_zipf(num_experts, mid)) < skew:
            lo = mid
        else:
            hi = mid
    return _zipf(num_experts, 0.5 * (lo + hi))


@dataclass(frozen=True)
class StageOperators:
    """The operators of one pipeline stage (whole stage, all of its expert-parallel ranks)."""

    stage: int
    """Stage index."""

    labels: Tuple[str, ...]
    """Operator names, e.g. ``"L3.expert17"``."""

    params: np.ndarray
    """Parameters of each operator."""

    activation: np.ndarray
    """Tokens passing through each operator per token of the batch (the ordering key)."""

    kind: np.ndarray
    """``KIND_EXPERT`` or ``KIND_NONEXPERT`` per operator."""

    wgrad_work: np.ndarray
    """Relative weight-gradient work of each operator (params x activation; 0 for embeddings,
    whose gradient is a sparse scatter)."""

    @property
    def num_operators(self) -> int:
        """Operators in the stage."""
        return len(self.labels)

    @property
    def total_params(self) -> float:
        """Parameters of the whole stage."""
        return float(self.params.sum())

    @property
    def expert_params(self) -> float:
        """Parameters of the stage's routed experts."""
        return float(self.params[self.kind == KIND_EXPERT].sum())

    @property
    def nonexpert_params(self) -> float:
        """Parameters of everything that is not a routed expert."""
        return self.total_params - self.expert_params


def build_stage_operators(
    model: ModelSpec, plan: ParallelPlan, popularity_skew: float = 0.0
) -> List[StageOperators]:
    """Lists the checkpointable operators of every stage.

    Layers are split over stages by :meth:`ParallelPlan.stage_layer_counts`; the first stage
    also holds the embedding and any extra dense parameters (e.g. a vision encoder), the last
    stage the output layer.

    Args:
        model: The architecture.
        plan: The parallel plan (for the layer split).
        popularity_skew: Normalized HHI of routed-expert popularity (Appendix D).

    Returns:
        One :class:`StageOperators` per stage.
    """
    shares = expert_popularity(model.num_experts, popularity_skew)
    counts = plan.stage_layer_counts(model.num_layers)
    stages: List[StageOperators] = []
    layer = 0
    for s, count in enumerate(counts):
        labels: List[str] = []
        params: List[float] = []
        activation: List[float] = []
        kind: List[int] = []
        wgrad: List[float] = []

        def add(label: str, n: float, act: float, k: int = KIND_NONEXPERT, dense: bool = True):
            labels.append(label)
            params.append(float(n))
            activation.append(float(act))
            kind.append(k)
            wgrad.append(float(n) * act if dense else 0.0)

        if s == 0:
            add("embedding", model.embedding_params, 1.0, dense=False)
            if model.extra_nonexpert_params:
                add("extra_nonexpert", model.extra_nonexpert_params, 1.0)
        for _ in range(count):
            add(f"L{layer}.attention", model.attention_params, 1.0)
            if layer < model.num_dense_layers:
                add(f"L{layer}.mlp", model.dense_ffn_params, 1.0)
            else:
                add(f"L{layer}.gate", model.gate_params, 1.0)
                for j in range(model.num_shared_experts):
                    add(f"L{layer}.shared{j}", model.expert_params, 1.0)
                for e in range(model.num_experts):
                    add(
                        f"L{layer}.expert{e}",
                        model.expert_params,
                        model.top_k * shares[e],
                        KIND_EXPERT,
                    )
            layer += 1
        if s == len(counts) - 1 and model.output_params:
            add("output_layer", model.output_params, 1.0)
        stages.append(
            StageOperators(
                stage=s,
                labels=tuple(labels),
                params=np.asarray(params, dtype=np.float64),
                activation=np.asarray(activation, dtype=np.float64),
                kind=np.asarray(kind, dtype=np.int8),
                wgrad_work=np.asarray(wgrad, dtype=np.float64),
            )
        )
    return stages
