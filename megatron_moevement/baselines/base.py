"""What the baseline strategies share: a :class:`MoEvementStrategy` under a baseline's capture
policy, configured by a :class:`~megatron_moevement.baselines.config.BaselineConfig`."""

from __future__ import annotations

from megatron_moevement.baselines.config import BaselineConfig
from megatron_moevement.config import MoEvementConfig
from megatron_moevement.policy import CapturePolicy
from megatron_moevement.strategy import MoEvementStrategy


class BaselineStrategy(MoEvementStrategy):
    """MoEvement's engine (snapshots, replication, checksums) under a baseline policy.

    Args:
        gpt_model: The unwrapped Megatron-Core ``GPTModel`` stage of this rank.
        optimizer: Its Megatron optimizer.
        config: Shared storage settings (replication factor, checksum, ...); the window, upstream
            logging and recovery scope are overridden (see :meth:`BaselineConfig.moevement_config`).
        baseline: The policy's settings; its ``strategy`` must be the subclass's :attr:`name`.
        num_experts: Experts per MoE layer (defaults to the model config's).
        **kwargs: Further :class:`~megatron_moevement.strategy.MoEvementStrategy` arguments
            (``train_iteration`` for :meth:`recover`, ``verify_replicas``).
    """

    name = ""
    """The ``BaselineConfig.strategy`` value this class implements."""

    def __init__(
        self,
        gpt_model,
        optimizer,
        config: MoEvementConfig | None = None,
        baseline: BaselineConfig | None = None,
        num_experts: int | None = None,
        **kwargs,
    ) -> None:
        self.baseline = baseline or BaselineConfig(strategy=self.name)
        if self.baseline.strategy != self.name:
            raise ValueError(
                f"{type(self).__name__} needs strategy={self.name!r}, got "
                f"{self.baseline.strategy!r}"
            )
        super().__init__(
            gpt_model,
            optimizer,
            self.baseline.moevement_config(config),
            num_experts,
            policy=self.make_policy(self.baseline),
            **kwargs,
        )

    def make_policy(self, baseline: BaselineConfig) -> CapturePolicy:
        """The capture policy of this baseline."""
        raise NotImplementedError
