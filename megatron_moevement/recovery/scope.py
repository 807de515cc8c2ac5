"""Scoped recovery: roll back only the pipeline stages that lost state, fed by neighbours' logs.

After a failure every rank reports ``(pipeline stage, data-parallel rank, committed iteration,
dirty)``. The *scope* is every rank of every stage that holds a failed rank (its replacement has no
state, and its data-parallel and expert-parallel peers must replay with it because gradients are
reduced and tokens exchanged among them) or a *dirty* rank (one interrupted inside its optimizer
step, whose state may be half-updated). Ranks outside the scope keep their live state; they must
all have committed the same iteration ``C`` (a consistent cut), else scoped recovery is impossible
and the driver falls back to global rollback.

Ranks in scope roll back to the persisted sparse checkpoint and replay to ``C`` through a
:class:`ReplayP2PCommunicator`: towards a neighbour stage that is also in scope it communicates
normally (adjacent failed stages recover jointly); towards a neighbour outside the scope it takes
the activations (from upstream) and input-gradients (from downstream) that the neighbour logged
in the original run, and sends nothing. Non-adjacent stages in scope replay in parallel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from megatron_moevement.logging_utils import get_logger
from megatron_moevement.snapshot.engine import _operator_tensors
from megatron_moevement.snapshot.transport import recv_bytes, send_bytes
from megatron_moevement.upstream.log import ACTIVATION, GRADIENT, UpstreamLogError

logger = get_logger(__name__)


@dataclass
class RankStatus:
    rank: int
    pp_rank: int
    dp_rank: int
    committed: int
    dirty: bool
    has_state: bool
    logging: bool


@dataclass
class ScopePlan:
    """The outcome of scope planning."""

    scoped: bool
    """True for scoped recovery, False for global rollback."""
    ranks: list[int]
    """Ranks that roll back and replay."""
    stages: list[int]
    committed: int
    """Iteration every rank is at after recovery."""
    reason: str
    """Why global rollback was chosen (empty for scoped)."""


def gather_status(status: RankStatus, world_size: int) -> list[RankStatus]:
    import torch.distributed as dist

    t = torch.zeros(world_size, 6, dtype=torch.int64)
    t[status.rank] = torch.tensor(
        [
            status.pp_rank,
            status.dp_rank,
            status.committed,
            int(status.dirty),
            int(status.has_state),
            int(status.logging),
        ]
    )
    dist.all_reduce(t)
    return [
        RankStatus(r, *[int(v) for v in t[r][:3]], bool(t[r][3]), bool(t[r][4]), bool(t[r][5]))
        for r in range(world_size)
    ]


def global_plan(statuses: list[RankStatus], reason: str) -> ScopePlan:
    """Every rank rolls back and replays to the survivors' last common committed iteration
    (needs at least one rank with state)."""
    committed = min(s.committed for s in statuses if s.has_state)
    return ScopePlan(
        False,
        [s.rank for s in statuses],
        sorted({s.pp_rank for s in statuses}),
        committed,
        reason,
    )


def plan_scope(statuses: list[RankStatus], failed: list[int], prefer_scoped: bool) -> ScopePlan:
    """Chooses the recovery scope (see the module docstring). Needs at least one rank with
    state: when every rank lost it, the driver stops recovery before planning."""
    bad_stages = {s.pp_rank for s in statuses if s.rank in failed or not s.has_state or s.dirty}
    scope = [s for s in statuses if s.pp_rank in bad_stages]
    outside = [s for s in statuses if s.pp_rank not in bad_stages]

    if not prefer_scoped:
        return global_plan(
            statuses,
            "scoped recovery disabled (upstream logging off or recovery_scope='global')",
        )
    if not outside:
        return global_plan(statuses, "every pipeline stage lost state")
    if not all(s.logging for s in statuses):
        return global_plan(statuses, "upstream logs are not kept on every rank")
    cut = {s.committed for s in outside}
    if len(cut) != 1:
        return global_plan(
            statuses,
            f"ranks outside the failed stages disagree on the last committed "
            f"iteration {sorted(cut)}",
        )
    return ScopePlan(True, [s.rank for s in scope], sorted(bad_stages), cut.pop(), "")


# ---------------------------------------------------------------------------- live state backup
def capture_live_state(registry) -> dict[str, torch.Tensor]:
    """Host copies of every tensor of this rank's training state (kept across a rebuild)."""
    registry.refresh()
    out = {}
    for op in registry.operators:
        for key, tensor in _operator_tensors(op, ("compute", "main", "optim")):
            out[key] = tensor.detach().to("cpu", copy=True)
    return out


def state_fingerprint(registry) -> str:
    """CRC32 over this rank's compute weights and main parameters, in registry order.

    Recorded when a job starts and compared after a rebuild: equal only if the rebuild
    reproduces the job's initial weights (a seeded build), which the initial-state recovery tier
    requires. Optimizer moments are left out: before the first step they do not exist yet.
    """
    import zlib

    from megatron_moevement.snapshot.serialization import checksum

    registry.refresh()
    digest = 0
    for op in registry.operators:
        for key, tensor in _operator_tensors(op, ("compute", "main")):
            digest = zlib.crc32(f"{key}:{checksum(tensor)};".encode(), digest)
    return f"{digest & 0xFFFFFFFF:08x}"


def restore_live_state(registry, backup: dict[str, torch.Tensor]) -> int:
    """Copies :func:`capture_live_state` output into a rebuilt model and optimizer."""
    registry.refresh()
    restored = 0
    with torch.no_grad():
        for op in registry.operators:
            for key, live in _operator_tensors(op, ("compute", "main", "optim")):
                saved = backup.get(key)
                if saved is None or saved.shape != live.shape or saved.dtype != live.dtype:
                    raise RuntimeError(
                        f"cannot restore {key!r} after the rebuild: the saved state does not "
                        "match the rebuilt model (layout or config changed)"
                    )
                live.copy_(saved)
                restored += 1
    return restored


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
    from megatron_moevement.snapshot.serialization import dtype_from_name, dtype_name

    by_pos = {(s.pp_rank, s.dp_rank): s.rank for s in statuses}
    in_scope = set(plan.ranks)
    received: dict = {}
    for s in sorted(statuses, key=lambda x: x.rank):
        if s.rank not in in_scope:
            continue
        for direction, neighbour_pp in ((ACTIVATION, s.pp_rank - 1), (GRADIENT, s.pp_rank + 1)):
            source = by_pos.get((neighbour_pp, s.dp_rank))
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
