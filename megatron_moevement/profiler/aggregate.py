"""From raw per-rank phase timings to the simulator's per-stage profile (pure Python).

Per rank, over ``n`` timed iterations of ``m`` microbatches, inside the pipeline schedule::

    forward_backward = forward + backward + p2p + grad_sync

so the backward passes take ``forward_backward - forward - p2p - grad_sync``. A second set of
iterations with every operator frozen except the embedding (frozen parameters skip the
weight-gradient GEMMs, as in sparse-to-dense replay) gives the input-gradient part ``b``; the
weight-gradient part is ``w = (b + w) - b``. ``p2p`` totals include waiting for the neighbour
stage (the pipeline bubble, which the simulator models itself), so the profile's ``p2p_s`` is
the fastest single exchange: the transfer alone.

Ranks of one stage (its data- and expert-parallel replicas, which run in lockstep) are averaged.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Sequence

from megatron_moevement.sim.profile import StageProfile, StageTimes

__all__ = ["Measurements", "PhaseTotals", "RankTimings", "build_stage_profile", "stage_times"]


@dataclass(frozen=True)
class PhaseTotals:
    """Summed phase times of one rank over ``iterations`` timed iterations."""

    iterations: int
    """Timed iterations."""
    microbatches: int
    """Microbatches per iteration."""
    forward_s: float
    """All forward passes (s)."""
    forward_backward_s: float
    """The whole pipeline schedule (s)."""
    p2p_s: float
    """All point-to-point exchanges, waiting included (s)."""
    grad_sync_s: float
    """All data-parallel gradient reductions (s)."""
    optimizer_s: float = 0.0
    """All optimizer steps (s); 0 when they were skipped."""
    p2p_min_s: float = 0.0
    """Fastest single exchange (s): the transfer without waiting."""
    iteration_s: float = 0.0
    """All training iterations end to end (s)."""
    step_wait_s: float = 0.0
    """Waiting at the barrier before each optimizer step (s): the other stages finishing."""

    def __post_init__(self) -> None:
        if self.iterations < 1 or self.microbatches < 1:
            raise ValueError(
                f"PhaseTotals needs iterations and microbatches >= 1, got "
                f"{self.iterations}, {self.microbatches}"
            )

    @property
    def backward_per_microbatch_s(self) -> float:
        """Backward time per microbatch (s): the schedule's remainder, never negative."""
        rest = self.forward_backward_s - self.forward_s - self.p2p_s - self.grad_sync_s
        return max(0.0, rest) / (self.iterations * self.microbatches)

    @property
    def forward_per_microbatch_s(self) -> float:
        return self.forward_s / (self.iterations * self.microbatches)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PhaseTotals":
        return cls(**dict(data))


@dataclass(frozen=True)
class RankTimings:
    """What the profiler measured on one rank."""

    rank: int
    """Global rank."""
    stage: int
    """Pipeline stage."""
    normal: PhaseTotals
    """Ordinary training iterations."""
    frozen: PhaseTotals
    """Iterations with every operator but the embedding frozen (input gradients only)."""

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RankTimings":
        return cls(
            rank=data["rank"],
            stage=data["stage"],
            normal=PhaseTotals.from_dict(data["normal"]),
            frozen=PhaseTotals.from_dict(data["frozen"]),
        )


def stage_times(ranks: Sequence[RankTimings]) -> StageTimes:
    """The costs of one stage from its ranks' timings (averaged over the ranks)."""
    if not ranks:
        raise ValueError("a stage needs at least one rank's timings")
    mean = statistics.fmean
    forward = mean(r.normal.forward_per_microbatch_s for r in ranks)
    full_backward = mean(r.normal.backward_per_microbatch_s for r in ranks)
    input_grad = min(full_backward, mean(r.frozen.backward_per_microbatch_s for r in ranks))
    return StageTimes(
        forward_s=forward,
        backward_s=input_grad,
        weight_grad_s=full_backward - input_grad,
        optimizer_s=mean(r.normal.optimizer_s / r.normal.iterations for r in ranks),
        grad_sync_s=mean(r.normal.grad_sync_s / r.normal.iterations for r in ranks),
        p2p_s=min(r.normal.p2p_min_s for r in ranks),
    )


def build_stage_profile(
    ranks: Sequence[RankTimings],
    micro_batch_size: int,
    seq_length: int,
    metadata: Dict[str, Any] | None = None,
) -> StageProfile:
    """A measured :class:`StageProfile`, first stage first."""
    by_stage: Dict[int, List[RankTimings]] = {}
    for r in ranks:
        by_stage.setdefault(r.stage, []).append(r)
    stages = sorted(by_stage)
    if stages != list(range(len(stages))):
        raise ValueError(f"timings cover stages {stages}; every stage 0..p-1 needs a rank")
    return StageProfile(
        stages=tuple(stage_times(by_stage[s]) for s in stages),
        micro_batch_size=micro_batch_size,
        seq_length=seq_length,
        source="measured",
        metadata=dict(metadata or {}),
    )


@dataclass
class Measurements:
    """Machine-level quantities the profiler measures next to the stage times."""

    iteration_s: float
    """Median fault-free, checkpoint-free iteration time of the real training loop (s)."""
    snapshot_bandwidth: float
    """Per-rank snapshot throughput (copy into a host buffer plus checksum) with every rank
    snapshotting at once (bytes/s)."""
    replication_bandwidth: float
    """Per-rank throughput of peer replication over gloo with every rank sending at once
    (bytes/s)."""
    rebuild_s: float
    """Rebuilding parallel state, model, DDP, optimizer and strategy, as a recovery does (s)."""
    group_init_s: float
    """Creating a process group over every rank (a new generation's group) (s)."""
    detect_s: float
    """Time from a death until survivors start rebuilding: the agent's batching window plus
    the agent's and the workers' polling periods (constants of the local agent) (s)."""
    resume_s: float = 0.0
    """Extra time of the first iteration after a rebuild over the second (first-touch
    allocations, a new checkpoint window) (s)."""
    extra: Dict[str, Any] = field(default_factory=dict)
    """Raw samples and anything else worth keeping."""

    @property
    def restart_s(self) -> float:
        """Fixed cost of a recovery besides loading state and replaying: detect + group init +
        rebuild + resume (s)."""
        return self.detect_s + self.group_init_s + self.rebuild_s + self.resume_s

    def to_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["restart_s"] = self.restart_s
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Measurements":
        fields = {k: v for k, v in data.items() if k != "restart_s"}
        return cls(**fields)
