"""Upstream logging: a host-memory copy of everything a pipeline stage sends to its neighbours.

Every send of Megatron-Core's pipeline schedules goes through one method,
``P2PCommunicator._communicate``. :class:`LoggingP2PCommunicator` subclasses the communicator and
keeps, for every tensor sent, a host copy tagged ``(direction, iteration, microbatch)``:
activations sent downstream and input-gradients sent upstream. The schedule takes the
communicator as an argument (``forward_backward_func(..., p2p_communicator=...,
pg_collection=...)``), so nothing in Megatron is patched.

In 1F1B both directions carry microbatches in order 0..m-1 within an iteration, so a per-direction
counter reset at :meth:`LoggingP2PCommunicator.begin_iteration` gives the microbatch id. Copies are
asynchronous on CUDA (pinned buffers, a dedicated stream and an event per entry, like the snapshot
engine) and synchronous on CPU (a clone). The log is bounded: entries older than the persisted
sparse checkpoint are freed (:meth:`UpstreamLog.discard_before`), and exceeding ``max_bytes``
raises a clear error rather than silently dropping what a recovery would need.

This is the data source of scoped recovery (a failed stage replays from its neighbours' logs).
The interleaved (virtual pipeline) schedule is not supported: :func:`check_schedule_supported`
says so when it is configured.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from megatron_moevement.logging_utils import get_logger

logger = get_logger(__name__)

ACTIVATION = "activation"
"""Tensors a stage sends to the next stage (forward)."""
GRADIENT = "gradient"
"""Input gradients a stage sends to the previous stage (backward)."""


class UpstreamLogError(RuntimeError):
    """An upstream log entry is missing, or the log would exceed its memory bound."""


@dataclass
class LogEntry:
    tensor: torch.Tensor
    event: object | None = None

    def wait(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.tensor


class UpstreamLog:
    """Host copies of sent tensors, keyed by ``(direction, iteration, microbatch)``.

    Args:
        max_bytes: Upper bound of host memory; ``None`` for no bound.
    """

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self._entries: dict[tuple[str, int, int], LogEntry] = {}
        self._lock = threading.Lock()
        self.nbytes = 0
        self._stream = torch.cuda.Stream() if torch.cuda.is_available() else None

    def put(self, direction: str, iteration: int, microbatch: int, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.max_bytes is not None and self.nbytes + nbytes > self.max_bytes:
            raise UpstreamLogError(
                f"upstream log would exceed its bound of {self.max_bytes} bytes at iteration "
                f"{iteration}: free entries older than the persisted sparse checkpoint more "
                "often (shorter window) or raise the bound (MoEvementConfig."
                "host_memory_budget_bytes)"
            )
        if tensor.is_cuda:
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                host.copy_(tensor, non_blocking=True)
                tensor.record_stream(self._stream)
                event = torch.cuda.Event()
                event.record(self._stream)
            entry = LogEntry(host, event)
        else:
            entry = LogEntry(tensor.detach().clone())
        with self._lock:
            old = self._entries.pop((direction, iteration, microbatch), None)
            if old is not None:
                self.nbytes -= old.tensor.numel() * old.tensor.element_size()
            self._entries[(direction, iteration, microbatch)] = entry
            self.nbytes += nbytes

    def get(self, direction: str, iteration: int, microbatch: int) -> torch.Tensor:
        with self._lock:
            entry = self._entries.get((direction, iteration, microbatch))
        if entry is None:
            raise UpstreamLogError(
                f"no logged {direction} for iteration {iteration} microbatch {microbatch} (log "
                f"spans iterations {self.span()}); scoped recovery cannot replay it — fall back "
                "to global rollback"
            )
        return entry.wait()

    def span(self) -> str:
        with self._lock:
            its = sorted({k[1] for k in self._entries})
        return f"{its[0]}..{its[-1]}" if its else "none"

    def keys(self) -> list[tuple[str, int, int]]:
        with self._lock:
            return sorted(self._entries)

    def discard_before(self, iteration: int) -> None:
        """Frees entries of iterations before ``iteration``."""
        with self._lock:
            for key in [k for k in self._entries if k[1] < iteration]:
                entry = self._entries.pop(key)
                self.nbytes -= entry.tensor.numel() * entry.tensor.element_size()


def check_schedule_supported(config) -> None:
    """Raises when the configured pipeline schedule cannot be logged."""
    if getattr(config, "virtual_pipeline_model_parallel_size", None):
        raise UpstreamLogError(
            "upstream logging supports Megatron's 1F1B (non-interleaved) pipeline schedule; the "
            "interleaved schedule (virtual_pipeline_model_parallel_size="
            f"{config.virtual_pipeline_model_parallel_size}) is not supported. Disable it, or "
            "set MoEvementConfig.upstream_logging=False (recovery then rolls back globally)"
        )


def make_logging_communicator(config, log: UpstreamLog):
    """A ``P2PCommunicator`` of this rank's pipeline group that logs every send into ``log``,
    and the ``ProcessGroupCollection`` the schedule needs next to a custom communicator."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    check_schedule_supported(config)

    class LoggingP2PCommunicator(P2PCommunicator):
        """Megatron's communicator, plus a host copy of every tensor it sends."""

        def __init__(self) -> None:
            super().__init__(pp_group=ps.get_pipeline_model_parallel_group(), config=config)
            self.log = log
            self.iteration = -1
            self._sent = {ACTIVATION: 0, GRADIENT: 0}
            self.enabled = True

        def begin_iteration(self, iteration: int) -> None:
            self.iteration = iteration
            self._sent = {ACTIVATION: 0, GRADIENT: 0}

        def _communicate(self, *, tensor_send_next=None, tensor_send_prev=None, **kwargs):
            if self.enabled:
                if tensor_send_next is not None:
                    self.log.put(
                        ACTIVATION, self.iteration, self._sent[ACTIVATION], tensor_send_next
                    )
                    self._sent[ACTIVATION] += 1
                if tensor_send_prev is not None:
                    self.log.put(GRADIENT, self.iteration, self._sent[GRADIENT], tensor_send_prev)
                    self._sent[GRADIENT] += 1
            return super()._communicate(
                tensor_send_next=tensor_send_next, tensor_send_prev=tensor_send_prev, **kwargs
            )

    return LoggingP2PCommunicator(), pipeline_process_groups()


def pipeline_process_groups():
    """The ``ProcessGroupCollection`` the 1F1B schedule needs next to a custom communicator."""
    from megatron.core import parallel_state as ps
    from megatron.core.process_groups_config import ProcessGroupCollection

    pgs = ProcessGroupCollection()
    pgs.tp = ps.get_tensor_model_parallel_group()
    pgs.pp = ps.get_pipeline_model_parallel_group()
    pgs.embd = ps.get_embedding_group(check_initialized=False)
    pgs.pos_embd = ps.get_position_embedding_group(check_initialized=False)
    pgs.cp = ps.get_context_parallel_group()
    pgs.dp_cp = ps.get_data_parallel_group(with_context_parallel=True, partial_data_parallel=False)
    return pgs
