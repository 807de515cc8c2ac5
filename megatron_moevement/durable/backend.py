"""The ``moevement`` backend of Megatron-Core ``dist_checkpointing`` (version 1).

Saving::

    from megatron.core import dist_checkpointing
    from megatron_moevement.durable import moevement_sharded_state_dict

    state = {"iteration": it, **moevement_sharded_state_dict(strategy)}
    dist_checkpointing.save(state, ckpt_dir, sharded_strategy=("moevement", 1))

writes, per rank, the newest complete sparse checkpoint of the ``MoEvementStrategy`` (W slots,
their manifests and checksums, the schedule, the optimizer-scalar log up to the last completed
iteration, the layout). ``async_sharded_save=True`` returns Megatron's ``AsyncRequest`` instead.

Loading needs no strategy argument: ``dist_checkpointing.load`` reads ``metadata.json``, finds the
``moevement`` backend and uses the load strategy registered here::

    loaded = dist_checkpointing.load(moevement_sharded_state_dict(strategy), ckpt_dir)
    loaded["moevement"].restore(strategy, trainer.train_iteration)   # replay to the saved iteration

Which ``MoEvementStrategy`` is saved, in this order: the one given to
``MoEvementSaveShardedStrategy(strategy)``; the one in the state dict's MoEvement object
(``moevement_sharded_state_dict(strategy)``); the *active* strategy, i.e. the one most recently
built in this process (``MoEvementStrategy`` registers itself; ``set_active_strategy`` overrides
it). The registered default instance (``("moevement", 1)``) has no strategy of its own.

Both strategies are registered when :mod:`megatron_moevement.durable` is imported (building a
``MoEvementStrategy`` imports it).
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Union

from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
from megatron.core.dist_checkpointing.mapping import (
    CheckpointingException,
    ShardedObject,
    ShardedStateDict,
)
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
from megatron.core.dist_checkpointing.strategies.base import (
    AsyncSaveShardedStrategy,
    LoadShardedStrategy,
    StrategyAction,
    register_default_strategy,
)

from megatron_moevement.durable.errors import (
    ERROR_TYPES,
    DenseStateNotStoredError,
    DurableCheckpointError,
    NoStrategyError,
)
from megatron_moevement.durable.payload import RankPayload, payload_from_strategy
from megatron_moevement.logging_utils import get_logger

logger = get_logger(__name__)

BACKEND = "moevement"
VERSION = 1
OBJECT_KEY = "moevement_sparse_checkpoint"
"""``ShardedObject`` key of the per-rank sparse checkpoint (one shard per rank)."""
STATE_DICT_KEY = "moevement"
"""Key of that object in :func:`moevement_sharded_state_dict`."""

_active: weakref.ReferenceType | None = None


# ----------------------------------------------------------------------------- active strategy
def set_active_strategy(strategy) -> None:
    """Makes ``strategy`` the one the registered default backend saves (weakly referenced)."""
    global _active
    _active = None if strategy is None else weakref.ref(strategy)


def clear_active_strategy(strategy=None) -> None:
    """Forgets the active strategy (only if it is ``strategy``, when given)."""
    global _active
    if strategy is None or (_active is not None and _active() is strategy):
        _active = None


def active_strategy():
    """The active ``MoEvementStrategy`` of this process, or ``None``."""
    return None if _active is None else _active()


class MoEvementHandle:
    """What the MoEvement ``ShardedObject`` carries on save: which strategy, and job metadata."""

    def __init__(self, strategy=None, metadata: dict | None = None) -> None:
        self.strategy = strategy
        self.metadata = dict(metadata or {})

    def __repr__(self) -> str:
        return f"MoEvementHandle(strategy={type(self.strategy).__name__})"


def moevement_sharded_state_dict(
    strategy=None, metadata: dict | None = None, key: str = STATE_DICT_KEY
) -> ShardedStateDict:
    """``{key: ShardedObject}`` standing for this rank's sparse checkpoint (one shard per rank).

    Use it as (part of) the state dict for both ``dist_checkpointing.save`` and ``load``; after a
    load, ``result[key]`` is the rank's
    :class:`~megatron_moevement.durable.state.DurableSparseState`. Call on every rank.

    Args:
        strategy: The ``MoEvementStrategy`` to save (default: the active one).
        metadata: Job metadata to store with the files (JSON-serializable).
        key: The state-dict key.
    """
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    handle = MoEvementHandle(strategy, metadata)
    return {key: ShardedObject(OBJECT_KEY, handle, (world,), (rank,), replica_id=0)}


def _moevement_objects(sharded_state_dict: ShardedStateDict) -> tuple[list, list]:
    ours, others = [], []
    for value in nested_values(sharded_state_dict):
        if isinstance(value, ShardedObject) and value.key == OBJECT_KEY:
            ours.append(value)
        else:
            others.append(value)
    return ours, others


def _resolve(explicit, objects: list):
    if explicit is not None:
        return explicit
    for obj in objects:
        data = obj.data
        if isinstance(data, MoEvementHandle) and data.strategy is not None:
            return data.strategy
        if data is not None and hasattr(data, "persisted_checkpoint"):
            return data
    return active_strategy()


def _metadata(objects: list) -> dict:
    merged: dict = {}
    for obj in objects:
        if isinstance(obj.data, MoEvementHandle):
            merged.update(obj.data.metadata)
    return merged


# ----------------------------------------------------------------------------- collectives
def agree(error: BaseException | None, what: str) -> None:
    """Exchanges every rank's outcome; raises the same error on all ranks if any failed.

    The raised error has the class of the first failing rank's error and names every failing
    rank with its message.
    """
    import torch.distributed as dist

    local = None if error is None else (type(error).__name__, str(error))
    outcomes: list = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, local)
    failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
    if not failed:
        return
    cls = ERROR_TYPES.get(failed[0][1][0], DurableCheckpointError)
    lines = "; ".join(f"rank {r}: {msg}" for r, (_, msg) in failed)
    exc = cls(f"{what} failed on ranks {[r for r, _ in failed]}: {lines}")
    if error is not None:
        raise exc from error
    raise exc


# ----------------------------------------------------------------------------- save
def _async_write(checkpoint_dir: str, payload: RankPayload) -> None:
    """The asynchronous part of a save (module level, so any async caller can run it)."""
    from megatron_moevement.durable.writer import write_rank_files

    write_rank_files(checkpoint_dir, payload)


class MoEvementSaveShardedStrategy(AsyncSaveShardedStrategy):
    """Saves the per-rank sparse checkpoint of a ``MoEvementStrategy`` (see the module doc).

    Args:
        strategy: The ``MoEvementStrategy`` to save; ``None`` resolves it at save time.
        metadata: Job metadata stored with the files (e.g. the harness description).
    """

    def __init__(
        self,
        strategy=None,
        metadata: dict | None = None,
        backend: str = BACKEND,
        version: int = VERSION,
    ) -> None:
        super().__init__(backend, version)
        self._strategy = None if strategy is None else weakref.ref(strategy)
        self.metadata = dict(metadata or {})
        self._warned_dense = False

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    @property
    def strategy(self):
        return None if self._strategy is None else self._strategy()

    def _payload(self, sharded_state_dict: ShardedStateDict) -> RankPayload:
        ours, others = _moevement_objects(sharded_state_dict)
        if others and not self._warned_dense:
            self._warned_dense = True
            logger.warning(
                "moevement backend: %d dense tensors/objects of the state dict are not written; "
                "the durable checkpoint holds the sparse checkpoint, from which replay rebuilds "
                "them (moevement-convert turns it into a dense torch_dist checkpoint)",
                len(others),
            )
        strategy = _resolve(self.strategy, ours)
        if strategy is None:
            raise NoStrategyError(
                "moevement backend: no MoEvementStrategy to save. Fix: pass "
                "sharded_strategy=MoEvementSaveShardedStrategy(strategy), put "
                "moevement_sharded_state_dict(strategy) in the state dict, or build the "
                "MoEvementStrategy in this process before saving (it becomes the active one)."
            )
        strategy.flush()  # every copy and replication done: the newest complete = persisted
        metadata = {**self.metadata, **_metadata(ours)}
        return payload_from_strategy(strategy, metadata).prepare()

    def save(self, sharded_state_dict: ShardedStateDict, checkpoint_dir: Union[str, Path]) -> None:
        """Writes this rank's file set synchronously, then rank 0 writes the index."""
        from megatron_moevement.durable.writer import write_rank_files

        payload, error, marker = None, None, None
        try:
            payload = self._payload(sharded_state_dict)
            marker = write_rank_files(checkpoint_dir, payload)
        except Exception as exc:
            error = exc
        agree(error, f"saving durable MoEvement checkpoint {checkpoint_dir}")
        _finish(checkpoint_dir, payload, marker)

    def async_save(
        self, sharded_state_dict: ShardedStateDict, checkpoint_dir: Union[str, Path]
    ) -> AsyncRequest:
        """Prepares a private copy of this rank's file set and returns the request writing it.

        The copy makes the request safe to run at any later time, in a forked or a persistent
        worker process alike (the strategy keeps reusing its host buffers meanwhile). Its
        finalization (on all ranks, after every rank's write) checks every rank's completion
        marker and has rank 0 write the index; Megatron then writes ``metadata.json``.
        """
        error, payload = None, None
        try:
            payload = self._payload(sharded_state_dict).detach()
        except Exception as exc:
            error = exc
        agree(error, f"preparing durable MoEvement checkpoint {checkpoint_dir}")
        checkpoint_dir = str(checkpoint_dir)

        def finalize() -> None:
            from megatron_moevement.durable.writer import read_done_marker

            marker = read_done_marker(checkpoint_dir, payload.rank)
            problem = None
            if marker is None or marker.get("iteration") != payload.iteration:
                problem = DurableCheckpointError(
                    f"rank {payload.rank} has no completion marker for iteration "
                    f"{payload.iteration} in {checkpoint_dir}: its asynchronous write failed "
                    "(see that rank's log); the checkpoint is incomplete"
                )
            agree(problem, f"saving durable MoEvement checkpoint {checkpoint_dir}")
            _finish(checkpoint_dir, payload, marker)

        return AsyncRequest(_async_write, (checkpoint_dir, payload), [finalize])


def _finish(checkpoint_dir, payload: RankPayload, marker: dict) -> None:
    """All ranks wrote their files: rank 0 writes the index (the others wait for it)."""
    import torch.distributed as dist

    from megatron_moevement.durable.writer import write_index

    markers: list = [None] * dist.get_world_size()
    dist.all_gather_object(markers, marker)
    error = None
    if dist.get_rank() == 0:
        try:
            write_index(checkpoint_dir, payload, dist.get_world_size(), markers)
        except Exception as exc:
            error = exc
    agree(error, f"completing durable MoEvement checkpoint {checkpoint_dir}")


# ----------------------------------------------------------------------------- load
class MoEvementLoadShardedStrategy(LoadShardedStrategy):
    """Loads and verifies this rank's sparse checkpoint; the MoEvement object of the requested
    state dict is replaced by a :class:`~megatron_moevement.durable.state.DurableSparseState`.

    Args:
        strategy: Check the checkpoint's layout against this ``MoEvementStrategy`` at load time
            (default: the state dict's or the active one; without any, ``restore`` checks it).
        verify: Verify every tensor's checksum (default).
    """

    def __init__(self, strategy=None, verify: bool = True) -> None:
        self._strategy = None if strategy is None else weakref.ref(strategy)
        self.verify = verify

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def check_backend_compatibility(self, loaded_backend) -> None:
        if loaded_backend != BACKEND:
            raise CheckpointingException(
                f"the moevement load strategy cannot load a {loaded_backend!r} checkpoint; "
                "call dist_checkpointing.load without sharded_strategy to use the checkpoint's "
                "own backend"
            )

    def check_version_compatibility(self, loaded_version) -> None:
        if int(loaded_version) > VERSION:
            raise CheckpointingException(
                f"moevement checkpoint format version {loaded_version} is newer than this "
                f"megatron-moevement supports ({VERSION}); upgrade megatron-moevement"
            )

    def load(self, sharded_state_dict: ShardedStateDict, checkpoint_dir: Union[str, Path]):
        import torch.distributed as dist

        from megatron_moevement.durable.reader import read_rank

        ours, others = _moevement_objects(sharded_state_dict)
        error, state = None, None
        try:
            if others:
                names = sorted({getattr(o, "key", str(o)) for o in others})[:5]
                raise DenseStateNotStoredError(
                    f"{checkpoint_dir} is a durable MoEvement (sparse) checkpoint and holds no "
                    f"dense tensors, but {len(others)} were requested (e.g. {names}). Fix: load "
                    "moevement_sharded_state_dict(strategy) and call .restore(strategy, "
                    "train_iteration) to rebuild the dense state by replay, or convert it with "
                    "`moevement-convert` to a torch_dist checkpoint first."
                )
            state = read_rank(
                checkpoint_dir, dist.get_rank(), dist.get_world_size(), verify=self.verify
            )
            strategy = _resolve(None if self._strategy is None else self._strategy(), ours)
            if strategy is not None and getattr(strategy, "registry", None) is not None:
                state.check_layout(strategy)
        except Exception as exc:
            error = exc
        agree(error, f"loading durable MoEvement checkpoint {checkpoint_dir}")
        return dict_list_map_inplace(lambda obj: state, sharded_state_dict)

    def load_tensors_metadata(self, checkpoint_dir: Union[str, Path]):
        return {}

    def load_sharded_metadata(self, checkpoint_dir: Union[str, Path]):
        from megatron_moevement.durable.reader import read_index

        world = int(read_index(checkpoint_dir)["world_size"])
        out = {}
        for rank in range(world):
            obj = ShardedObject(OBJECT_KEY, None, (world,), (rank,), replica_id=0)
            out[obj.unique_key] = obj
        return out


def register() -> None:
    """Registers the ``("moevement", 1)`` save and load strategies (idempotent)."""
    register_default_strategy(
        StrategyAction.SAVE_SHARDED, BACKEND, VERSION, MoEvementSaveShardedStrategy()
    )
    register_default_strategy(
        StrategyAction.LOAD_SHARDED, BACKEND, VERSION, MoEvementLoadShardedStrategy()
    )


__all__ = [
    "BACKEND",
    "VERSION",
    "MoEvementHandle",
    "MoEvementLoadShardedStrategy",
    "MoEvementSaveShardedStrategy",
    "active_strategy",
    "clear_active_strategy",
    "moevement_sharded_state_dict",
    "register",
    "set_active_strategy",
]
