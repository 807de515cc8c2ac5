"""One entry point for every in-memory checkpointing strategy: :func:`build_strategy`."""

from __future__ import annotations

from typing import Any, Mapping

from megatron_moevement.baselines.config import BaselineConfig, BaselineConfigError
from megatron_moevement.config import MoEvementConfig
from megatron_moevement.constants import CKPT_STRATEGIES

__all__ = ["build_strategy"]


def build_strategy(
    name: str,
    gpt_model,
    optimizer,
    config: MoEvementConfig | None = None,
    baseline: BaselineConfig | Mapping[str, Any] | None = None,
    num_experts: int | None = None,
    **kwargs,
):
    """Builds the strategy ``name`` for one rank; the training loop talks to it the same way.

    Args:
        name: ``"moevement"`` (:class:`~megatron_moevement.strategy.MoEvementStrategy`),
            ``"gemini"`` (:class:`~megatron_moevement.baselines.dense.DenseSnapshotStrategy`) or
            ``"moc"`` (:class:`~megatron_moevement.baselines.moc.PartialExpertStrategy`).
        gpt_model: The unwrapped Megatron-Core ``GPTModel`` stage of this rank.
        optimizer: Its Megatron optimizer.
        config: Shared settings (for a baseline: its storage knobs).
        baseline: Baseline policy fields (ignored for ``"moevement"``); ``strategy`` defaults to
            ``name``.
        num_experts: Experts per MoE layer (defaults to the model config's).
        **kwargs: Further :class:`~megatron_moevement.strategy.MoEvementStrategy` arguments
            (``train_iteration`` for ``recover()``, ``verify_replicas``).

    Raises:
        BaselineConfigError: For an unknown name or an invalid baseline policy.
    """
    if name not in CKPT_STRATEGIES:
        raise BaselineConfigError(
            f"unknown checkpointing strategy {name!r}. Fix: use one of {list(CKPT_STRATEGIES)}."
        )
    if name == "moevement":
        from megatron_moevement.strategy import MoEvementStrategy

        return MoEvementStrategy(gpt_model, optimizer, config, num_experts, **kwargs)
    if baseline is None:
        baseline = BaselineConfig(strategy=name)
    elif not isinstance(baseline, BaselineConfig):
        baseline = BaselineConfig.from_dict({"strategy": name, **dict(baseline)})
    if baseline.strategy != name:
        raise BaselineConfigError(
            f"strategy {name!r} was asked for with a BaselineConfig for {baseline.strategy!r}. "
            "Fix: make them agree."
        )
    if name == "gemini":
        from megatron_moevement.baselines.dense import DenseSnapshotStrategy

        return DenseSnapshotStrategy(gpt_model, optimizer, config, baseline, num_experts, **kwargs)
    from megatron_moevement.baselines.moc import PartialExpertStrategy

    return PartialExpertStrategy(gpt_model, optimizer, config, baseline, num_experts, **kwargs)
