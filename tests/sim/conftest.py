"""Shared helpers for the simulator tests: small hand-built scenarios with known answers."""

from __future__ import annotations

import pytest

from megatron_moevement.sim import (
    ClusterSpec,
    ModelSpec,
    ParallelPlan,
    Scenario,
    SimulationConfig,
)
from megatron_moevement.sim.units import GB


def toy_scenario(
    d2h_gb_s: float = 0.2,
    iteration_s: float = 1.0,
    pp: int = 4,
    num_microbatches: int = 8,
    num_experts: int = 16,
    num_layers: int = 8,
) -> Scenario:
    """A small MoE job: 16 GPUs (PP4 x EP4), given iteration time."""
    model = ModelSpec(
        name="toy-moe",
        num_layers=num_layers,
        hidden_size=1024,
        num_experts=num_experts,
        top_k=2,
        expert_ffn_hidden_size=2048,
        vocab_size=32000,
        seq_length=1024,
    )
    cluster = ClusterSpec(
        num_gpus=pp * 4,
        gpus_per_node=4,
        d2h_bandwidth=d2h_gb_s * GB,
        inter_node_bandwidth=12.5 * GB,
        storage_bandwidth=5 * GB,
    )
    plan = ParallelPlan(pp=pp, dp=1, ep=4, num_microbatches=num_microbatches, micro_batch_size=4)
    return Scenario(
        name="toy", model=model, cluster=cluster, plan=plan, iteration_time_s=iteration_s
    )


@pytest.fixture
def toy() -> Scenario:
    return toy_scenario()


@pytest.fixture
def quiet_config() -> SimulationConfig:
    """No interference and no replication: the textbook regime."""
    return SimulationConfig(copy_interference=0.0, replication_factor=0)
