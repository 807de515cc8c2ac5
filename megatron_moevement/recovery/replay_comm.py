"""The p2p communicator of a scoped replay: real p2p towards in-scope neighbours, logged tensors from the others.

Towards a neighbour stage that is also in scope it communicates normally (adjacent failed
stages recover jointly); towards a neighbour outside the scope it takes the activations (from
upstream) and input-gradients (from downstream) that the neighbour logged in the original run,
and sends nothing. Sends are still logged, so the replaying rank's own upstream log is whole
again for later recoveries of its neighbours.
"""

from __future__ import annotations

import torch

from megatron_moevement.upstream.log import ACTIVATION, GRADIENT, UpstreamLogError


def make_replay_communicator(
    config, feed: dict, prev_in_scope: bool, next_in_scope: bool, upstream_log=None
):
    """A ``P2PCommunicator`` for replay: real p2p towards in-scope neighbours, logged tensors from
    out-of-scope neighbours (and no sends to them). Sends are still logged into
    ``upstream_log``, so this rank's log is whole again for later recoveries of its neighbours."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    class ReplayP2PCommunicator(P2PCommunicator):
        def __init__(self) -> None:
            super().__init__(pp_group=ps.get_pipeline_model_parallel_group(), config=config)
            self.iteration = -1
            self._counts = {}

        def begin_iteration(self, iteration: int) -> None:
            self.iteration = iteration
            self._counts = {"recv_prev": 0, "recv_next": 0, ACTIVATION: 0, GRADIENT: 0}

        def _feed(self, direction: str, counter: str) -> torch.Tensor:
            key = (direction, self.iteration, self._counts[counter])
            self._counts[counter] += 1
            if key not in feed:
                raise UpstreamLogError(f"neighbour log lacks {key}; fall back to global rollback")
            return feed[key]

        def _communicate(
            self,
            *,
            tensor_send_next=None,
            tensor_send_prev=None,
            recv_prev=False,
            recv_next=False,
            tensor_shape=None,
            wait_on_reqs=True,
        ):
            if upstream_log is not None:
                if tensor_send_next is not None:
                    upstream_log.put(
                        ACTIVATION, self.iteration, self._counts[ACTIVATION], tensor_send_next
                    )
                    self._counts[ACTIVATION] += 1
                if tensor_send_prev is not None:
                    upstream_log.put(
                        GRADIENT, self.iteration, self._counts[GRADIENT], tensor_send_prev
                    )
                    self._counts[GRADIENT] += 1
            out_prev = out_next = None
            real = dict(
                tensor_send_next=tensor_send_next if next_in_scope else None,
                tensor_send_prev=tensor_send_prev if prev_in_scope else None,
                recv_prev=recv_prev and prev_in_scope,
                recv_next=recv_next and next_in_scope,
            )
            if recv_prev and not prev_in_scope:
                out_prev = self._feed(ACTIVATION, "recv_prev").clone().requires_grad_(True)
            if recv_next and not next_in_scope:
                out_next = self._feed(GRADIENT, "recv_next").clone()
            reqs = None
            if any(v is not None and v is not False for v in real.values()):
                got_prev, got_next, reqs = super()._communicate(
                    **real, tensor_shape=tensor_shape, wait_on_reqs=wait_on_reqs
                )
                out_prev = got_prev if out_prev is None else out_prev
                out_next = got_next if out_next is None else out_next
            return out_prev, out_next, reqs

    return ReplayP2PCommunicator()
