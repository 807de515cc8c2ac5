"""The durable tier: MoEvement sparse checkpoints through Megatron-Core ``dist_checkpointing``.

Importing this package registers the ``("moevement", 1)`` save and load strategies, so that
``dist_checkpointing.save(..., sharded_strategy=("moevement", 1))`` and a plain
``dist_checkpointing.load(...)`` of such a checkpoint work. See ``docs/durable.md``.

Modules: :mod:`~.backend` (the strategies, the state-dict helper, the active strategy),
:mod:`~.periodic` (non-blocking saves every ``durable_interval`` iterations),
:mod:`~.payload` / :mod:`~.writer` / :mod:`~.reader` (one rank's file set),
:mod:`~.files` (on-disk layout), :mod:`~.layout` (layout checks), :mod:`~.state` (the loaded
state and its replay), :mod:`~.convert` (``moevement-convert``: to a dense torch_dist checkpoint),
:mod:`~.recovery_loader` (the durable fallback of ``RecoveryDriver``).
"""

from megatron_moevement.durable.backend import (
    BACKEND,
    VERSION,
    MoEvementLoadShardedStrategy,
    MoEvementSaveShardedStrategy,
    active_strategy,
    clear_active_strategy,
    moevement_sharded_state_dict,
    register,
    set_active_strategy,
)
from megatron_moevement.durable.errors import (
    DenseStateNotStoredError,
    DurableCheckpointError,
    DurableChecksumError,
    IncompleteCheckpointError,
    LayoutMismatchError,
    MissingRankFileError,
    NoStrategyError,
)
from megatron_moevement.durable.files import latest_checkpoint, resolve_checkpoint
from megatron_moevement.durable.reader import read_index, read_rank
from megatron_moevement.durable.recovery_loader import DurableTierLoader
from megatron_moevement.durable.state import DurableSparseState

register()

__all__ = [
    "BACKEND",
    "VERSION",
    "DenseStateNotStoredError",
    "DurableCheckpointError",
    "DurableChecksumError",
    "DurableSparseState",
    "DurableTierLoader",
    "IncompleteCheckpointError",
    "LayoutMismatchError",
    "MissingRankFileError",
    "MoEvementLoadShardedStrategy",
    "MoEvementSaveShardedStrategy",
    "NoStrategyError",
    "active_strategy",
    "clear_active_strategy",
    "latest_checkpoint",
    "moevement_sharded_state_dict",
    "read_index",
    "read_rank",
    "register",
    "resolve_checkpoint",
    "set_active_strategy",
]
