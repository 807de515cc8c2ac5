"""The p2p communicator that logs what a pipeline stage sends (upstream logging).

Every send of Megatron-Core's pipeline schedules goes through one method,
``P2PCommunicator._communicate``. :func:`make_logging_communicator` builds a subclass of the
communicator that keeps, for every tensor sent, a host copy in an
:class:`~megatron_moevement.upstream.log.UpstreamLog` tagged ``(direction, iteration,
microbatch)``: activations sent downstream and input-gradients sent upstream. The schedule takes
the communicator as an argument (``forward_backward_func(..., p2p_communicator=...,
pg_collection=...)``), so nothing in Megatron is patched.

In 1F1B both directions carry microbatches in order 0..m-1 within an iteration, so a
per-direction counter reset at ``begin_iteration`` gives the microbatch id. The interleaved
(virtual pipeline) schedule is not supported: :func:`check_schedule_supported` says so when it
is configured.
"""

from __future__ import annotations

from megatron_moevement.upstream.log import ACTIVATION, GRADIENT, UpstreamLog, UpstreamLogError


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
