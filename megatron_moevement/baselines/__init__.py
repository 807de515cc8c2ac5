"""Baseline checkpointing strategies on MoEvement's own machinery (same engine, other policies).

* ``gemini`` — :class:`~megatron_moevement.baselines.dense.DenseSnapshotStrategy`: dense in-memory
  snapshots every k iterations, replicated to peers; recovery rolls every rank back and retrains
  (bitwise equal to a fault-free run).
* ``moc`` — :class:`~megatron_moevement.baselines.moc.PartialExpertStrategy`: every iteration the
  non-expert state plus a rotating group of experts; recovery restores experts from stale
  snapshots and loses tokens (reported as the proportion of lost tokens; not bitwise equal).

Each is a :class:`~megatron_moevement.policy.CapturePolicy` on a
:class:`~megatron_moevement.strategy.MoEvementStrategy`. :func:`build_strategy` builds any of
them, or MoEvement, by name. See ``docs/baselines.md``.
"""

from megatron_moevement.baselines.config import BaselineConfig, BaselineConfigError
from megatron_moevement.baselines.factory import build_strategy
from megatron_moevement.constants import BASELINE_STRATEGIES, CKPT_STRATEGIES

__all__ = [
    "BASELINE_STRATEGIES",
    "CKPT_STRATEGIES",
    "BaselineConfig",
    "BaselineConfigError",
    "build_strategy",
]
