"""megatron-moevement: MoEvement fault tolerance for Megatron-Core MoE training.

Sparse in-memory checkpointing, sparse-to-dense reconstruction and localized recovery, after
"MoEvement" (see ``docs/``). The object a training loop talks to is :class:`MoEvementStrategy`;
the rest of the package hides behind it::

    from megatron_moevement import MoEvementConfig, MoEvementStrategy

    strategy = MoEvementStrategy(gpt_model, optimizer, MoEvementConfig(), train_iteration=step)
    for iteration in range(start, end):
        step(iteration)
        strategy.after_optimizer_step(iteration)

:class:`RecoveryDriver` runs such a loop through failures (spares, scoped rollback, replay);
:func:`build_strategy` builds MoEvement or a baseline by name. The names below are loaded on
first use, so importing this package never imports Megatron-Core, Transformer Engine or apex
eagerly and the simulator and the pure-Python parts work without them. The layers of the package
and what may import what: ``docs/architecture.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "MoEvementConfig": "megatron_moevement.config",
    "MoEvementConfigError": "megatron_moevement.config",
    "MoEvementStrategy": "megatron_moevement.strategy",
    "build_strategy": "megatron_moevement.baselines.factory",
    "BaselineConfig": "megatron_moevement.baselines.config",
    "BaselineConfigError": "megatron_moevement.baselines.config",
    "RecoveryDriver": "megatron_moevement.recovery.driver",
    "RecoveryReport": "megatron_moevement.recovery.procedure",
    "Trainer": "megatron_moevement.recovery.driver",
    "ElasticContext": "megatron_moevement.recovery.protocol",
    "RecoveryError": "megatron_moevement.recovery.errors",
    "ReplayReport": "megatron_moevement.replay.engine",
    "ReplayError": "megatron_moevement.replay.scalar_log",
    "SnapshotError": "megatron_moevement.snapshot.slots",
    "SnapshotChecksumError": "megatron_moevement.snapshot.checksum",
    "ReplicationError": "megatron_moevement.snapshot.replication",
    "ReplicaMismatchError": "megatron_moevement.snapshot.sharding",
    "ScheduleError": "megatron_moevement.schedule.window",
    "UpstreamLogError": "megatron_moevement.upstream.log",
    "RegistryError": "megatron_moevement.state.operators",
    "DurableCheckpointError": "megatron_moevement.durable.errors",
    "UnsupportedModelError": "megatron_moevement.state.support",
}

__all__ = [
    "BaselineConfig",
    "BaselineConfigError",
    "DurableCheckpointError",
    "ElasticContext",
    "MoEvementConfig",
    "MoEvementConfigError",
    "MoEvementStrategy",
    "RecoveryDriver",
    "RecoveryError",
    "RecoveryReport",
    "RegistryError",
    "ReplayError",
    "ReplayReport",
    "ReplicaMismatchError",
    "ReplicationError",
    "ScheduleError",
    "SnapshotChecksumError",
    "SnapshotError",
    "Trainer",
    "UnsupportedModelError",
    "UpstreamLogError",
    "build_strategy",
]
"""The public surface (each name is imported from its module on first use)."""

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from megatron_moevement.baselines.config import BaselineConfig, BaselineConfigError
    from megatron_moevement.baselines.factory import build_strategy
    from megatron_moevement.config import MoEvementConfig, MoEvementConfigError
    from megatron_moevement.durable.errors import DurableCheckpointError
    from megatron_moevement.recovery.driver import RecoveryDriver, Trainer
    from megatron_moevement.recovery.errors import RecoveryError
    from megatron_moevement.recovery.procedure import RecoveryReport
    from megatron_moevement.recovery.protocol import ElasticContext
    from megatron_moevement.replay.engine import ReplayReport
    from megatron_moevement.replay.scalar_log import ReplayError
    from megatron_moevement.schedule.window import ScheduleError
    from megatron_moevement.snapshot.checksum import SnapshotChecksumError
    from megatron_moevement.snapshot.replication import ReplicationError
    from megatron_moevement.snapshot.sharding import ReplicaMismatchError
    from megatron_moevement.snapshot.slots import SnapshotError
    from megatron_moevement.state.operators import RegistryError
    from megatron_moevement.state.support import UnsupportedModelError
    from megatron_moevement.strategy import MoEvementStrategy
    from megatron_moevement.upstream.log import UpstreamLogError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'megatron_moevement' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
