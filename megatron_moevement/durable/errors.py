"""Errors of the durable tier, each naming the problem and the fix.

All of them derive from Megatron-Core's ``CheckpointingException``, so code that already handles
``dist_checkpointing`` failures handles these too.
"""

from __future__ import annotations

from megatron.core.dist_checkpointing.mapping import CheckpointingException


class DurableCheckpointError(CheckpointingException):
    """A durable MoEvement checkpoint cannot be written or read."""


class IncompleteCheckpointError(DurableCheckpointError):
    """The checkpoint was not finished (a rank's files or the completion marker are missing)."""


class MissingRankFileError(IncompleteCheckpointError):
    """The file set of one rank is missing or truncated."""


class DurableChecksumError(DurableCheckpointError):
    """Bytes on disk do not match the checksums recorded when they were captured."""


class LayoutMismatchError(DurableCheckpointError):
    """The checkpoint was written by a job with another world size, parallel layout or model."""


class DenseStateNotStoredError(DurableCheckpointError):
    """Dense tensors were requested from a sparse checkpoint, which does not hold them."""


class NoStrategyError(DurableCheckpointError):
    """No :class:`~megatron_moevement.strategy.MoEvementStrategy` was found to save."""


ERROR_TYPES = {
    cls.__name__: cls
    for cls in (
        DurableCheckpointError,
        IncompleteCheckpointError,
        MissingRankFileError,
        DurableChecksumError,
        LayoutMismatchError,
        DenseStateNotStoredError,
        NoStrategyError,
    )
}
"""Error classes by name (errors are re-raised on every rank after a status exchange)."""
