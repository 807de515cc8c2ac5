"""The local harness job as a simulator :class:`~megatron_moevement.sim.scenario.Scenario`.

The profiler writes a measured stage profile whose ``metadata`` records the harness model
(:class:`~megatron_moevement.harness.model.TinyMoEConfig` fields), the parallel layout and the
machine measurements (:class:`~megatron_moevement.profiler.aggregate.Measurements`). This module
turns that into simulator inputs without importing torch:

* model: the harness GPT (every layer an MoE layer, 2-matrix expert MLPs, untied output layer);
  bf16/fp16 training is the paper's mixed precision (2-byte compute weights, FP32 master weights
  and Adam moments); fp32 training keeps 4-byte weights that are also the master weights;
* plan: Megatron's ``dp`` ranks of a stage include its ``ep`` expert-parallel ranks, so the
  simulator's plan is ``pp``, ``ep``, ``dp / ep``;
* cluster: one machine (every rank on one "node"); the snapshot bandwidth is the measured
  per-rank copy+checksum throughput, the network share per rank the measured gloo replication
  throughput; restores run at the snapshot bandwidth (on CPU both are host copies);
* simulation knobs: the restart cost (localized and global alike: no process restarts, only the
  spare joins) is the measured restart; everything else keeps the simulator's defaults unless
  given.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, Mapping

from megatron_moevement.profiler.aggregate import Measurements
from megatron_moevement.sim.config import SimulationConfig
from megatron_moevement.sim.profile import StageProfile
from megatron_moevement.sim.scenario import Scenario
from megatron_moevement.sim.specs import (
    ClusterSpec,
    ModelSpec,
    ParallelPlan,
    Precision,
    get_precision,
)

__all__ = ["harness_model_spec", "harness_plan", "harness_scenario", "harness_sim_config"]

_FP32 = Precision(
    "fp32",
    compute_weight_bytes=4,
    master_weight_bytes=4,
    optimizer_state_bytes=8,
    activation_bytes=4,
)


def harness_model_spec(model: Mapping[str, Any]) -> ModelSpec:
    """The simulator's view of the harness model (``TinyMoEConfig`` fields, all present)."""
    precision = (
        _FP32
        if model["precision"] == "fp32"
        else get_precision("bf16-fp32" if model["precision"] == "bf16" else "fp16-fp32")
    )
    return ModelSpec(
        name="harness-tiny-moe",
        num_layers=model["num_layers"],
        hidden_size=model["hidden_size"],
        num_experts=model["num_experts"],
        top_k=model["moe_router_topk"],
        expert_ffn_hidden_size=model["ffn_hidden_size"],
        vocab_size=model["vocab_size"],
        seq_length=model["seq_length"],
        gated_linear_unit=False,
        untie_embeddings=True,
        precision=precision,
    )


def harness_plan(layout: Mapping[str, int], model: Mapping[str, Any]) -> ParallelPlan:
    """The simulator's plan of a harness layout (``ParallelLayout`` fields)."""
    tp, pp, dp, ep = (int(layout.get(k, 1)) for k in ("tp", "pp", "dp", "ep"))
    if dp % ep:
        raise ValueError(f"layout {dict(layout)}: the simulator needs ep to divide dp")
    return ParallelPlan(
        pp=pp,
        dp=dp // ep,
        ep=ep,
        tp=tp,
        num_microbatches=model["num_microbatches"],
        micro_batch_size=model["micro_batch_size"],
    )


def harness_scenario(profile: StageProfile) -> Scenario:
    """The scenario of the harness job a measured profile was taken on."""
    meta = profile.metadata
    model, layout = meta["model"], meta["layout"]
    measured = Measurements.from_dict(meta["measurements"])
    world = int(layout.get("tp", 1)) * int(layout["pp"]) * int(layout.get("dp", 1))
    cluster = ClusterSpec(
        num_gpus=world,
        gpus_per_node=world,
        d2h_bandwidth=measured.snapshot_bandwidth,
        h2d_bandwidth=measured.snapshot_bandwidth,
        inter_node_bandwidth=measured.replication_bandwidth * world,
        storage_bandwidth=measured.replication_bandwidth * world,
        name="local CPU harness",
    )
    return Scenario(
        name="harness",
        model=harness_model_spec(model),
        cluster=cluster,
        plan=harness_plan(layout, model),
        profile=profile,
        description="local CPU/gloo harness, measured by megatron_moevement.profiler",
    )


def harness_sim_config(profile: StageProfile, **overrides: Any) -> SimulationConfig:
    """Simulation knobs for the harness: the measured restart for localized and global recovery
    alike, then ``overrides`` (e.g. ``fixed_window``, ``replication_factor``, ``horizon_s``)."""
    measured = Measurements.from_dict(profile.metadata["measurements"])
    values: Dict[str, Any] = dict(restart_s=measured.restart_s, global_restart_s=measured.restart_s)
    values.update(overrides)
    return replace(SimulationConfig(), **values)
