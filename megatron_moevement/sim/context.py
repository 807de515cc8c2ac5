"""Quantities derived once per scenario that every strategy model uses.

:class:`ScenarioContext` turns a :class:`~megatron_moevement.sim.scenario.Scenario` and a
:class:`~megatron_moevement.sim.config.SimulationConfig` into stage timings, the fault-free
iteration time, the operator inventory and the per-GPU checkpoint sizes and bandwidths.

Checkpoint sizes assume the snapshot work of a stage is spread evenly over every GPU that
holds a copy of it (``tp * ep * dp`` GPUs; distributed-optimizer sharding of the optimizer
state, data-parallel de-duplication of replicated weights), so one GPU's share of a dense
checkpoint is ``stage params * (master + optimizer bytes) / (tp * ep * dp)``; the slowest
(largest) stage sets the pace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List

from megatron_moevement.sim.config import SimulationConfig
from megatron_moevement.sim.operators import KIND_EXPERT, StageOperators, build_stage_operators
from megatron_moevement.sim.pipeline import IterationTimes, iteration_times
from megatron_moevement.sim.profile import StageProfile
from megatron_moevement.sim.scenario import Scenario

__all__ = ["ScenarioContext", "overlapped_copy_cost_s"]


def overlapped_copy_cost_s(copy_s: float, budget_s: float, interference: float) -> float:
    """Training time lost to a checkpoint copy that overlaps with an iteration.

    The part of the copy that does not fit in the overlap window stalls training (paper
    footnote 4); the overlapped part slows training by ``interference`` per second.
    """
    return max(0.0, copy_s - budget_s) + interference * min(copy_s, budget_s)


@dataclass(frozen=True)
class ScenarioContext:
    """Derived, strategy-independent quantities of one scenario."""

    scenario: Scenario
    """The input scenario."""

    config: SimulationConfig
    """The simulation knobs."""

    profile: StageProfile
    """Stage timings used."""

    times: IterationTimes
    """Fault-free iteration time and its parts."""

    stages: List[StageOperators]
    """Checkpointable operators per stage."""

    shard_divisor: int
    """GPUs sharing one stage's snapshot work: ``tp * ep * dp``."""

    full_state_bytes_per_gpu: float
    """One GPU's share of a dense checkpoint (master weights + optimizer), largest stage."""

    nonexpert_full_bytes_per_gpu: float
    """Non-expert part of ``full_state_bytes_per_gpu`` (same stage)."""

    expert_full_bytes_per_gpu: float
    """Routed-expert part of ``full_state_bytes_per_gpu`` (same stage)."""

    total_state_bytes: float
    """Dense checkpoint of the whole job (bytes)."""

    expert_work_share: float
    """Share of the weight-gradient (matmul) work done by routed experts."""

    cache: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """MTBF-independent results of strategy models (e.g. MoEvement's window), by key."""

    @classmethod
    def build(cls, scenario: Scenario, config: SimulationConfig) -> "ScenarioContext":
        """Derives every quantity from the scenario."""
        stages = build_stage_operators(scenario.model, scenario.plan, config.popularity_skew)
        profile = scenario.stage_profile(config.popularity_skew)
        plan = scenario.plan
        times = iteration_times(profile, plan.num_microbatches, plan.virtual_pipeline_stages)
        shard = plan.tp * plan.ep * plan.dp
        full = scenario.model.precision.full_state_bytes
        largest = max(stages, key=lambda s: s.total_params)
        work_total = sum(float(s.wgrad_work.sum()) for s in stages)
        work_expert = sum(float(s.wgrad_work[s.kind == KIND_EXPERT].sum()) for s in stages)
        return cls(
            scenario=scenario,
            config=config,
            profile=profile,
            times=times,
            stages=stages,
            shard_divisor=shard,
            full_state_bytes_per_gpu=largest.total_params * full / shard,
            nonexpert_full_bytes_per_gpu=largest.nonexpert_params * full / shard,
            expert_full_bytes_per_gpu=largest.expert_params * full / shard,
            total_state_bytes=scenario.model.total_params * full,
            expert_work_share=work_expert / work_total if work_total else 0.0,
        )

    # ----- convenience accessors ----------------------------------------------------------

    @property
    def iteration_s(self) -> float:
        """Fault-free iteration time without checkpointing (s)."""
        return self.times.iteration_s

    @property
    def overlap_budget_s(self) -> float:
        """Time per iteration a snapshot copy can overlap with (s)."""
        return self.times.overlap_s

    @property
    def d2h_bandwidth(self) -> float:
        """Effective device-to-host bandwidth per GPU (bytes/s)."""
        return self.scenario.cluster.d2h_bandwidth

    @property
    def network_per_gpu(self) -> float:
        """A GPU's share of its node's network, all of it (used during recovery) (bytes/s)."""
        return self.scenario.cluster.network_bandwidth_per_gpu

    @property
    def checkpoint_network_per_gpu(self) -> float:
        """A GPU's share of the network available to background replication (bytes/s)."""
        return self.network_per_gpu * self.config.checkpoint_network_share

    @property
    def storage_bandwidth(self) -> float:
        """Aggregate bandwidth to durable storage, capped by the nodes' network (bytes/s)."""
        cluster = self.scenario.cluster
        network = cluster.num_nodes * cluster.inter_node_bandwidth
        return min(cluster.storage_bandwidth, network * self.config.checkpoint_network_share)

    def copy_cost_s(self, copy_s: float) -> float:
        """Training time lost to one overlapped snapshot copy of ``copy_s`` seconds."""
        return overlapped_copy_cost_s(copy_s, self.overlap_budget_s, self.config.copy_interference)

    def reload_from_host_s(self, bytes_per_gpu: float | None = None) -> float:
        """Time for a GPU to restore ``bytes_per_gpu`` (default: its dense checkpoint share)
        from host memory while training is paused."""
        size = self.full_state_bytes_per_gpu if bytes_per_gpu is None else bytes_per_gpu
        return size / self.scenario.cluster.h2d_bandwidth

    def fetch_from_peers_s(self, bytes_per_gpu: float) -> float:
        """Time for the replacement node's GPUs to fetch ``bytes_per_gpu`` each from peers."""
        return bytes_per_gpu / self.network_per_gpu

    def log_transfer_s(self, stage: int) -> float:
        """Time to fetch one iteration of upstream logs for ``stage`` from its neighbours."""
        plan = self.scenario.plan
        model = self.scenario.model
        directions = (1 if stage > 0 else 0) + (1 if stage < plan.pp - 1 else 0)
        per_microbatch = (
            plan.micro_batch_size
            * model.seq_length
            * model.hidden_size
            * model.precision.activation_bytes
            / (plan.ep * plan.tp)
        )
        return directions * plan.num_microbatches * per_microbatch / self.network_per_gpu
