"""Expert popularity statistics and operator-ordering policies (paper §3.5 and Appendix B).

MoEvement snapshots the least popular experts first so that popular experts stay *frozen* (no
weight-gradient, no optimizer update) for most of a sparse-to-dense replay. This module keeps
the router statistics that define "popular" and turns them into per-expert scores:

* :class:`ExpertPopularity` accumulates, per MoE layer, the tokens routed to each expert
  (Megatron's ``tokens_per_expert``), optionally the gate probabilities summed per expert and
  the expert capacity, plus a per-iteration exponential moving average. Updates are tensor ops
  on the device of the statistics (no ``.item()``, no host sync); :meth:`~ExpertPopularity.snapshot`
  materializes float64 CPU copies when the scheduler asks, at window boundaries.
* :class:`OrderingPolicy` subclasses map a :class:`PopularitySnapshot` to per-layer scores.
  Built-ins, registered by name: ``hard_count`` (default), ``soft_count``, ``ema`` and
  ``capacity_normalized``. :func:`register_ordering_policy` adds custom ones.
* :func:`should_reorder` is the drift trigger: reorder when the popularity *share* of at least
  ``fraction`` of the experts changed by more than ``threshold`` (relative).
* :func:`expert_order` sorts experts by ascending score with deterministic tie-breaking (layer,
  then expert id), so every rank that sees the same statistics computes the same order.

Cross-rank consistency: each rank only sees the tokens of its own micro-batches. Pass a process
group to :meth:`ExpertPopularity.snapshot` to sum the statistics over the ranks that must agree
on one schedule (all statistics are linear in the counts, the EMA included, so the sum of the
per-rank statistics equals the statistics of the summed counts).

One module on purpose: the policies are functions of the statistics' fields, and the drift
trigger compares their scores; split, each half would need the other's internals.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import (
    Any,
    ClassVar,
    Dict,
    List,
    Mapping,
    Optional,
    Tuple,
    Type,
    Union,
)

import torch

from megatron_moevement.config import register_ordering_name
from megatron_moevement.logging_utils import get_logger

__all__ = [
    "CapacityNormalizedPolicy",
    "EMAPolicy",
    "ExpertPopularity",
    "HardCountPolicy",
    "LayerScores",
    "OrderingPolicy",
    "PopularityError",
    "PopularitySnapshot",
    "SoftCountPolicy",
    "available_ordering_policies",
    "count_drifted_experts",
    "expert_order",
    "get_ordering_policy",
    "register_ordering_policy",
    "should_reorder",
]

logger = get_logger(__name__)

LayerScores = Dict[int, torch.Tensor]
"""Per-layer expert scores: ``{layer: float64 CPU tensor of shape [num_experts]}``."""

_STAT_KINDS = ("counts", "soft_counts", "capacity", "ema")


class PopularityError(ValueError):
    """Raised for invalid popularity input or a policy that lacks the statistics it needs."""


# ---------------------------------------------------------------------------------------------
# Snapshot
# ---------------------------------------------------------------------------------------------


@dataclass
class PopularitySnapshot:
    """CPU copy of the popularity statistics at one point of training.

    Every tensor is float64 on the CPU with shape ``[num_experts]`` of its layer. A layer is
    absent from ``soft_counts`` / ``capacity`` when no update of that layer supplied them.
    """

    iterations: int
    """Number of completed :meth:`ExpertPopularity.step` calls the statistics cover."""

    counts: LayerScores = field(default_factory=dict)
    """Cumulative hard counts: tokens routed to each expert (paper §3.5)."""

    soft_counts: LayerScores = field(default_factory=dict)
    """Cumulative sums of gate probabilities per expert (Appendix B, soft-count popularity)."""

    capacity: LayerScores = field(default_factory=dict)
    """Cumulative expert capacity (max tokens per batch, summed over updates; Appendix B)."""

    ema: LayerScores = field(default_factory=dict)
    """Time-decayed per-iteration hard counts (Appendix B); initialized with the first
    iteration's counts, then ``ema = decay * ema + (1 - decay) * counts``."""

    def layers(self) -> List[int]:
        """Returns the sorted layer ids with hard counts."""
        return sorted(self.counts)


# ---------------------------------------------------------------------------------------------
# Tracker
# ---------------------------------------------------------------------------------------------


class ExpertPopularity:
    """Per-layer, per-expert router statistics, accumulated on device without host syncs.

    Call :meth:`update` for every MoE layer and micro-batch (typically from a router forward
    hook, with Megatron's ``tokens_per_expert``), then :meth:`step` once per training iteration
    (after the optimizer step). :meth:`snapshot` is the only method that synchronizes with the
    device; the scheduler calls it at window boundaries.

    Args:
        ema_decay: Decay of the per-iteration exponential moving average, in (0, 1).
    """

    def __init__(self, ema_decay: float = 0.9) -> None:
        if (
            isinstance(ema_decay, bool)
            or not isinstance(ema_decay, (int, float))
            or not (0.0 < float(ema_decay) < 1.0)
        ):
            raise PopularityError(
                f"ExpertPopularity(ema_decay={ema_decay!r}) is invalid: the decay must lie in "
                "(0, 1). Fix: pass e.g. ema_decay=0.9 (MoEvementConfig.ema_decay)."
            )
        self.ema_decay = float(ema_decay)
        self._iterations = 0
        self._num_experts: Dict[int, int] = {}
        self._pending: Dict[int, torch.Tensor] = {}
        self._stats: Dict[str, Dict[int, torch.Tensor]] = {k: {} for k in _STAT_KINDS}
        self._ema_initialized: Dict[int, bool] = {}

    # ------------------------------------------------------------------ hot path

    def update(
        self,
        layer: int,
        tokens_per_expert: torch.Tensor,
        gate_prob_sum: Optional[torch.Tensor] = None,
        capacity: Optional[Union[torch.Tensor, float, int]] = None,
    ) -> None:
        """Adds one micro-batch's router statistics of ``layer`` (no host synchronization).

        Args:
            layer: Global layer id; must match ``Operator.layer`` of the layer's experts.
            tokens_per_expert: Tokens routed to each expert, shape ``[num_experts]`` (global
                expert ids), any numeric dtype, on any device.
            gate_prob_sum: Gate probabilities summed over the micro-batch's tokens per expert,
                shape ``[num_experts]``; needed by the ``soft_count`` policy.
            capacity: Capacity of each expert for this micro-batch (max tokens it can take),
                a scalar or a ``[num_experts]`` tensor; needed by ``capacity_normalized``.

        Raises:
            PopularityError: on a non-integer layer, a tensor that is not 1-D, or a number of
                experts that differs from earlier updates of the layer.
        """
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise PopularityError(
                f"ExpertPopularity.update: layer={layer!r} must be an int (the global layer id "
                "used by the operator registry). Fix: pass the layer number."
            )
        counts = self._as_vector("tokens_per_expert", layer, tokens_per_expert)
        num_experts = counts.numel()
        known = self._num_experts.setdefault(layer, num_experts)
        if known != num_experts:
            raise PopularityError(
                f"ExpertPopularity.update: layer {layer} had {known} experts in earlier updates "
                f"but tokens_per_expert now has {num_experts}. Fix: pass the per-expert counts "
                "over all (global) experts of the layer, with the same length every time."
            )
        pending = self._pending.get(layer)
        if pending is None:
            self._pending[layer] = counts.clone()
        else:
            pending.add_(counts.to(pending.device))
        if gate_prob_sum is not None:
            soft = self._as_vector("gate_prob_sum", layer, gate_prob_sum, expect=num_experts)
            self._accumulate("soft_counts", layer, soft)
        if capacity is not None:
            if isinstance(capacity, torch.Tensor) and capacity.dim() > 0:
                cap = self._as_vector("capacity", layer, capacity, expect=num_experts)
            else:
                if isinstance(capacity, bool):
                    raise PopularityError("ExpertPopularity.update: capacity must be a number.")
                device = counts.device
                cap = torch.full((num_experts,), 0.0, dtype=torch.float64, device=device).add_(
                    torch.as_tensor(capacity, dtype=torch.float64, device=device)
                )
            self._accumulate("capacity", layer, cap)

    def update_from_routing(
        self,
        layer: int,
        routing_map: torch.Tensor,
        probs: Optional[torch.Tensor] = None,
        capacity: Optional[Union[torch.Tensor, float, int]] = None,
    ) -> None:
        """Like :meth:`update`, from a router's ``[num_tokens, num_experts]`` outputs.

        Args:
            layer: Global layer id.
            routing_map: Boolean (or 0/1) map of which experts each token is routed to.
            probs: Gate probabilities per token and expert (optional, for soft counts).
            capacity: As in :meth:`update`.
        """
        if routing_map.dim() != 2:
            raise PopularityError(
                f"ExpertPopularity.update_from_routing: routing_map of layer {layer} has shape "
                f"{tuple(routing_map.shape)}; expected [num_tokens, num_experts]."
            )
        gate = None
        if probs is not None:
            if probs.shape != routing_map.shape:
                raise PopularityError(
                    f"ExpertPopularity.update_from_routing: probs shape {tuple(probs.shape)} "
                    f"differs from routing_map shape {tuple(routing_map.shape)} (layer {layer})."
                )
            gate = probs.detach().to(torch.float64).sum(dim=0)
        self.update(layer, routing_map.detach().sum(dim=0), gate, capacity)

    def step(self) -> None:
        """Closes one training iteration: folds the pending micro-batch counts into the
        cumulative counts and the EMA (device-side ops only)."""
        decay = self.ema_decay
        for layer, pending in self._pending.items():
            self._accumulate("counts", layer, pending)
            ema = self._stats["ema"].get(layer)
            if ema is None or not self._ema_initialized.get(layer, False):
                self._stats["ema"][layer] = pending.clone()
                self._ema_initialized[layer] = True
            else:
                ema.mul_(decay).add_(pending, alpha=1.0 - decay)
            pending.zero_()
        self._iterations += 1

    # ------------------------------------------------------------------ cold path

    @property
    def iterations(self) -> int:
        """Number of :meth:`step` calls since construction or :meth:`reset`."""
        return self._iterations

    def num_experts(self, layer: int) -> Optional[int]:
        """Number of experts seen for ``layer``, or ``None`` if it was never updated."""
        return self._num_experts.get(layer)

    def snapshot(self, group: Any = None) -> PopularitySnapshot:
        """Materializes the statistics on the CPU (synchronizes with the device).

        Args:
            group: Optional ``torch.distributed`` process group; when given, the statistics are
                summed over its ranks first (one all-reduce), so that every rank of the group
                computes the same order. Requires an initialized process group and the same
                layers and expert counts on every rank.

        Returns:
            A :class:`PopularitySnapshot` covering the completed iterations. Micro-batch
            updates after the last :meth:`step` are not included.
        """
        entries: List[Tuple[str, int, torch.Tensor]] = [
            (kind, layer, t)
            for kind in _STAT_KINDS
            for layer, t in sorted(self._stats[kind].items())
        ]
        if group is not None:
            entries = self._all_reduce(entries, group)
        snap = PopularitySnapshot(iterations=self._iterations)
        for kind, layer, tensor in entries:
            getattr(snap, kind)[layer] = tensor.detach().to("cpu", torch.float64).clone()
        return snap

    def reset(self) -> None:
        """Forgets every statistic (e.g. after a phase change of training)."""
        self._iterations = 0
        self._num_experts.clear()
        self._pending.clear()
        self._ema_initialized.clear()
        for stats in self._stats.values():
            stats.clear()

    def state_dict(self) -> Dict[str, Any]:
        """Returns a CPU copy of the tracker state (for the strategy's checkpoint metadata)."""
        snap = self.snapshot()
        return {
            "ema_decay": self.ema_decay,
            "iterations": snap.iterations,
            **{
                kind: {int(k): v.tolist() for k, v in getattr(snap, kind).items()}
                for kind in _STAT_KINDS
            },
        }

    def load_state_dict(
        self, state: Mapping[str, Any], device: Optional[torch.device] = None
    ) -> None:
        """Restores a state produced by :meth:`state_dict` (pending updates are discarded).

        Args:
            state: The mapping returned by :meth:`state_dict`.
            device: Device for the accumulators (default: CPU).
        """
        missing = [k for k in ("ema_decay", "iterations", *_STAT_KINDS) if k not in state]
        if missing:
            raise PopularityError(
                f"ExpertPopularity.load_state_dict: missing keys {missing}. Fix: pass the dict "
                "returned by ExpertPopularity.state_dict()."
            )
        self.reset()
        self.ema_decay = float(state["ema_decay"])
        self._iterations = int(state["iterations"])
        for kind in _STAT_KINDS:
            for layer, values in state[kind].items():
                t = torch.tensor(values, dtype=torch.float64, device=device)
                self._stats[kind][int(layer)] = t
                self._num_experts.setdefault(int(layer), t.numel())
        for layer in self._stats["ema"]:
            self._ema_initialized[layer] = True

    # ------------------------------------------------------------------ helpers

    def _as_vector(
        self, what: str, layer: int, value: torch.Tensor, expect: Optional[int] = None
    ) -> torch.Tensor:
        if not isinstance(value, torch.Tensor):
            raise PopularityError(
                f"ExpertPopularity.update: {what} of layer {layer} must be a torch.Tensor, got "
                f"{type(value).__name__}. Fix: pass the router's per-expert tensor."
            )
        if value.dim() != 1:
            raise PopularityError(
                f"ExpertPopularity.update: {what} of layer {layer} has shape "
                f"{tuple(value.shape)}; expected a 1-D tensor [num_experts]. Fix: sum over "
                "tokens first (or use update_from_routing with the [tokens, experts] map)."
            )
        if expect is not None and value.numel() != expect:
            raise PopularityError(
                f"ExpertPopularity.update: {what} of layer {layer} has {value.numel()} entries "
                f"but tokens_per_expert has {expect}. Fix: pass one value per expert."
            )
        return value.detach().to(torch.float64)

    def _accumulate(self, kind: str, layer: int, value: torch.Tensor) -> None:
        stats = self._stats[kind]
        acc = stats.get(layer)
        if acc is None:
            stats[layer] = value.clone()
        else:
            acc.add_(value.to(acc.device))

    @staticmethod
    def _all_reduce(
        entries: List[Tuple[str, int, torch.Tensor]], group: Any
    ) -> List[Tuple[str, int, torch.Tensor]]:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise PopularityError(
                "ExpertPopularity.snapshot(group=...) needs an initialized torch.distributed "
                "process group. Fix: call it after init_process_group, or pass group=None."
            )
        if not entries:
            return entries
        device = entries[0][2].device
        flat = torch.cat([t.to(device).reshape(-1) for _, _, t in entries])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        out, offset = [], 0
        for kind, layer, t in entries:
            n = t.numel()
            out.append((kind, layer, flat[offset : offset + n]))
            offset += n
        return out


# ---------------------------------------------------------------------------------------------
# Ordering policies
# ---------------------------------------------------------------------------------------------


class OrderingPolicy(ABC):
    """Maps popularity statistics to per-expert scores; lower scores are snapshotted first."""

    name: ClassVar[str] = ""
    """Registry name (also the value of ``MoEvementConfig.ordering``)."""

    @abstractmethod
    def scores(self, snapshot: PopularitySnapshot) -> LayerScores:
        """Returns ``{layer: float64 CPU tensor [num_experts]}`` for every layer of the snapshot.

        Raises:
            PopularityError: when the snapshot lacks the statistics the policy needs.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


_POLICIES: Dict[str, Type[OrderingPolicy]] = {}


def register_ordering_policy(cls: Type[OrderingPolicy]) -> Type[OrderingPolicy]:
    """Class decorator adding an :class:`OrderingPolicy` to the registry under ``cls.name``.

    Raises:
        PopularityError: when the name is empty or already registered by another class.
    """
    if not (isinstance(cls, type) and issubclass(cls, OrderingPolicy)):
        raise PopularityError(
            f"register_ordering_policy expects an OrderingPolicy subclass, got {cls!r}."
        )
    name = cls.name
    if not isinstance(name, str) or not name:
        raise PopularityError(
            f"{cls.__name__}.name must be a non-empty string. Fix: set a class attribute "
            "name='...'."
        )
    existing = _POLICIES.get(name)
    if existing is not None and existing is not cls:
        raise PopularityError(
            f"An ordering policy named {name!r} is already registered ({existing.__name__}). "
            "Fix: choose another name."
        )
    _POLICIES[name] = cls
    register_ordering_name(name)
    return cls


def available_ordering_policies() -> List[str]:
    """Returns the registered policy names, sorted."""
    return sorted(_POLICIES)


def get_ordering_policy(policy: Union[str, OrderingPolicy]) -> OrderingPolicy:
    """Returns a policy instance for a registry name (instances are passed through).

    Raises:
        PopularityError: for an unknown name; the message lists the registered names.
    """
    if isinstance(policy, OrderingPolicy):
        return policy
    cls = _POLICIES.get(policy) if isinstance(policy, str) else None
    if cls is None:
        raise PopularityError(
            f"Unknown ordering policy {policy!r}. Fix: use one of "
            f"{available_ordering_policies()} or register a custom OrderingPolicy."
        )
    return cls()


def _require(snapshot: PopularitySnapshot, kind: str, policy: str, fix: str) -> LayerScores:
    stats: LayerScores = getattr(snapshot, kind)
    missing = [layer for layer in snapshot.counts if layer not in stats]
    if missing:
        raise PopularityError(
            f"Ordering policy {policy!r} needs {kind} for every MoE layer, but layers {missing} "
            f"have none. Fix: {fix}"
        )
    return stats


@register_ordering_policy
class HardCountPolicy(OrderingPolicy):
    """Ascending cumulative hard counts (tokens routed per expert) — the paper's default."""

    name = "hard_count"

    def scores(self, snapshot: PopularitySnapshot) -> LayerScores:
        return {layer: t.clone() for layer, t in snapshot.counts.items()}


@register_ordering_policy
class SoftCountPolicy(OrderingPolicy):
    """Ascending cumulative gate probabilities per expert (Appendix B, soft counts)."""

    name = "soft_count"

    def scores(self, snapshot: PopularitySnapshot) -> LayerScores:
        soft = _require(
            snapshot,
            "soft_counts",
            self.name,
            "pass gate_prob_sum= to ExpertPopularity.update() (or probs= to "
            "update_from_routing()), or use ordering='hard_count'.",
        )
        return {layer: soft[layer].clone() for layer in snapshot.counts}


@register_ordering_policy
class EMAPolicy(OrderingPolicy):
    """Ascending time-decayed counts (Appendix B); the decay is ``ExpertPopularity.ema_decay``."""

    name = "ema"

    def scores(self, snapshot: PopularitySnapshot) -> LayerScores:
        ema = _require(snapshot, "ema", self.name, "call ExpertPopularity.step() every iteration.")
        return {layer: ema[layer].clone() for layer in snapshot.counts}


@register_ordering_policy
class CapacityNormalizedPolicy(OrderingPolicy):
    """Ascending utilization ``count / capacity`` (Appendix B, heterogeneous experts).

    An expert with zero capacity scores 0 when it received no tokens and ``inf`` otherwise.
    """

    name = "capacity_normalized"

    def scores(self, snapshot: PopularitySnapshot) -> LayerScores:
        capacity = _require(
            snapshot,
            "capacity",
            self.name,
            "pass capacity= to ExpertPopularity.update(), or use ordering='hard_count'.",
        )
        out: LayerScores = {}
        for layer, counts in snapshot.counts.items():
            cap = capacity[layer]
            ratio = torch.where(cap > 0, counts / cap.clamp_min(1e-300), torch.zeros_like(counts))
            ratio = torch.where((cap <= 0) & (counts > 0), torch.full_like(counts, math.inf), ratio)
            out[layer] = ratio
        return out


# ---------------------------------------------------------------------------------------------
# Order and reorder trigger
# ---------------------------------------------------------------------------------------------


def _as_scores(scores: Mapping[int, Any], what: str) -> LayerScores:
    out: LayerScores = {}
    for layer, values in scores.items():
        t = torch.as_tensor(values, dtype=torch.float64).detach().to("cpu").reshape(-1)
        if torch.isnan(t).any():
            raise PopularityError(
                f"{what}: layer {layer} has NaN scores. Fix: check the router statistics fed to "
                "ExpertPopularity.update()."
            )
        out[int(layer)] = t
    return out


def expert_order(scores: Mapping[int, Any]) -> List[Tuple[int, int]]:
    """Returns ``(layer, expert)`` pairs by ascending score, ties broken by layer then expert.

    Args:
        scores: ``{layer: per-expert scores}`` (tensors or sequences).
    """
    table = _as_scores(scores, "expert_order")
    keyed = [
        (float(value), layer, expert)
        for layer, t in table.items()
        for expert, value in enumerate(t.tolist())
    ]
    keyed.sort()
    return [(layer, expert) for _, layer, expert in keyed]


def _shares(t: torch.Tensor) -> torch.Tensor:
    total = t.sum()
    if not torch.isfinite(total) or total <= 0:
        # Infinite or empty layers: fall back to the raw scores (still comparable run to run).
        return t.clone()
    return t / total


def count_drifted_experts(
    old: Optional[Mapping[int, Any]],
    new: Mapping[int, Any],
    threshold: float,
    normalize: bool = True,
) -> Tuple[int, int]:
    """Counts experts whose popularity changed by more than ``threshold`` (relative).

    Args:
        old: Scores the current order was built from (``None`` = no order yet).
        new: Current scores, same layers and expert counts.
        threshold: Relative change ``|new - old| / old`` above which an expert has drifted. An
            expert with ``old == 0`` drifted iff ``new != 0``.
        normalize: Compare per-layer shares (score / layer total) instead of raw scores, so
            that cumulative counts growing over time do not count as drift.

    Returns:
        ``(drifted, total)``. Every expert counts as drifted when ``old`` is ``None`` or the
        layers or expert counts differ.
    """
    new_t = _as_scores(new, "count_drifted_experts(new)")
    total = sum(t.numel() for t in new_t.values())
    if old is None:
        return total, total
    old_t = _as_scores(old, "count_drifted_experts(old)")
    if sorted(old_t) != sorted(new_t) or any(old_t[k].numel() != new_t[k].numel() for k in new_t):
        return total, total
    drifted = 0
    for layer in sorted(new_t):
        o, n = old_t[layer], new_t[layer]
        if normalize:
            o, n = _shares(o), _shares(n)
        both_zero = (o == 0) & (n == 0)
        rel = torch.where(
            o != 0, (n - o).abs() / o.abs().clamp_min(1e-300), torch.full_like(o, math.inf)
        )
        rel = torch.where(both_zero | (o == n), torch.zeros_like(rel), rel)
        drifted += int((rel > threshold).sum())
    return drifted, total


def should_reorder(
    old: Optional[Mapping[int, Any]],
    new: Mapping[int, Any],
    threshold: float = 0.10,
    fraction: float = 0.25,
    normalize: bool = True,
) -> bool:
    """Reorder trigger (paper §3.5): True when >= ``fraction`` of experts drifted > ``threshold``.

    Args:
        old: Scores the current order was built from, or ``None`` (then True).
        new: Current scores.
        threshold: Relative-change threshold per expert (0.10 = 10%).
        fraction: Fraction of experts (over all layers) that must have drifted, in (0, 1].
        normalize: See :func:`count_drifted_experts`.
    """
    if not (isinstance(threshold, (int, float)) and threshold > 0):
        raise PopularityError(
            f"should_reorder: threshold={threshold!r} must be > 0. Fix: pass e.g. 0.10."
        )
    if not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise PopularityError(
            f"should_reorder: fraction={fraction!r} must lie in (0, 1]. Fix: pass e.g. 0.25."
        )
    drifted, total = count_drifted_experts(old, new, threshold, normalize)
    if total == 0:
        return False
    return drifted >= fraction * total - 1e-9
