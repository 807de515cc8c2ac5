"""What ranks send each other during a recovery: checkpoints, the scalar log, upstream logs.

Every transfer here is point-to-point over the new generation's default process group and runs
in the same order on every rank (the plan is the same everywhere, see
:mod:`megatron_moevement.recovery.tiers`):

* :func:`exchange_checkpoints`: a rank that lost its checkpoint of the plan's window receives it
  from the surviving rank that holds its replica;
* :func:`exchange_scalar_log`: the ranks that replay without the original run's optimizer
  scalars receive them;
* :func:`exchange_logs`: the neighbours of a replaying stage that stay outside the scope send the
  activations and input-gradients they logged in the original run.
"""

from __future__ import annotations

import json

import torch

from megatron_moevement.logging_utils import get_logger
from megatron_moevement.recovery.errors import RecoveryError
from megatron_moevement.recovery.scope import RankStatus, ScopePlan
from megatron_moevement.recovery.tiers import RecoveryPlan
from megatron_moevement.snapshot.checksum import dtype_from_name, dtype_name
from megatron_moevement.snapshot.slots import SparseCheckpoint
from megatron_moevement.snapshot.transport import recv_bytes, recv_slot, send_bytes, send_slot
from megatron_moevement.upstream.log import ACTIVATION, GRADIENT

logger = get_logger(__name__)


# ---------------------------------------------------------------------------- checkpoints
def exchange_checkpoints(me: int, plan: RecoveryPlan, replicator) -> SparseCheckpoint | None:
    """Sends and receives the checkpoints of ``plan.fetch_from`` (every rank calls it).

    Args:
        me: This rank.
        plan: The recovery plan.
        replicator: This rank's :class:`~megatron_moevement.snapshot.replication.PeerReplicator`
            (its replicas are what a holder sends).

    Returns:
        On a rank that received its checkpoint, that checkpoint; else ``None``.

    Raises:
        RecoveryError: the holder lacks a complete replica of the window.
    """
    received = None
    for lost, sender in sorted(plan.fetch_from.items()):
        if me == sender:
            store = replicator.replicas.get(lost)
            slots = None if store is None else store.windows.get(plan.window)
            if slots is None or any(s is None for s in slots):
                raise RecoveryError(
                    f"rank {sender} lacks a complete replica of rank {lost}'s window {plan.window}"
                )
            send_bytes(json.dumps(len(slots)).encode(), lost)
            for slot in slots:
                send_slot(slot, lost)
        elif me == lost:
            count = json.loads(recv_bytes(sender))
            received = SparseCheckpoint.from_slots([recv_slot(sender) for _ in range(count)])
            logger.info(
                "rank %d received its checkpoint of window %d from rank %d", me, plan.window, sender
            )
    return received


# ---------------------------------------------------------------------------- scalar log
def exchange_scalar_log(me: int, plan: RecoveryPlan, scalar_log) -> dict | None:
    """``plan.log_source`` sends its optimizer-scalar log (global values, the same on every
    rank) to ``plan.needs_log``; returns what this rank received, if anything."""
    received = None
    for lost in plan.needs_log:
        if me == plan.log_source:
            send_bytes(json.dumps(scalar_log.to_dict()).encode(), lost)
        elif me == lost:
            received = json.loads(recv_bytes(plan.log_source))
    return received


# ---------------------------------------------------------------------------- log exchange
def exchange_logs(
    me: int,
    statuses: list[RankStatus],
    plan: ScopePlan,
    upstream_log,
    iterations: list[int],
    num_microbatches: int,
) -> dict:
    """Neighbours outside the scope send the logged tensors a replaying rank needs.

    Returns, on a rank in scope, ``{(direction, iteration, microbatch): tensor}``.
    """
    by_pos = {(s.pp_rank, s.dp_rank, s.tp_rank): s.rank for s in statuses}
    in_scope = set(plan.ranks)
    received: dict = {}
    for s in sorted(statuses, key=lambda x: x.rank):
        if s.rank not in in_scope:
            continue
        for direction, neighbour_pp in ((ACTIVATION, s.pp_rank - 1), (GRADIENT, s.pp_rank + 1)):
            source = by_pos.get((neighbour_pp, s.dp_rank, s.tp_rank))
            if source is None or source in in_scope:
                continue
            if me == source:
                header, chunks = [], []
                for it in iterations:
                    for mb in range(num_microbatches):
                        t = upstream_log.get(direction, it, mb).contiguous()
                        header.append([it, mb, dtype_name(t.dtype), list(t.shape)])
                        chunks.append(bytes(t.reshape(-1).view(torch.uint8).numpy()))
                send_bytes(json.dumps(header).encode(), s.rank)
                send_bytes(b"".join(chunks), s.rank)
            elif me == s.rank:
                header = json.loads(recv_bytes(source))
                blob = recv_bytes(source)
                offset = 0
                for it, mb, dtype, shape in header:
                    dt = dtype_from_name(dtype)
                    n = (
                        int(torch.tensor(shape).prod().item())
                        * torch.empty(0, dtype=dt).element_size()
                    )
                    raw = torch.frombuffer(bytearray(blob[offset : offset + n]), dtype=torch.uint8)
                    received[(direction, it, mb)] = raw.view(dt).reshape(shape).clone()
                    offset += n
    return received
