"""ETTR simulator for MoE checkpointing strategies (MoEvement paper §2.4 and Appendix C).

Estimates iteration time, per-iteration checkpoint overhead, recovery time and the Effective
Training Time Ratio of CheckFreq-, Gemini-, MoC- and MoEvement-style checkpointing for a model,
cluster, parallel plan and MTBF — analytically, by seeded Monte-Carlo, or by replaying a
failure trace. See ``docs/simulator.md`` for the model and its assumptions.

Example::

    from megatron_moevement.sim import Simulator, get_preset

    result = Simulator(get_preset("deepseek-moe")).sweep([7200, 3600, 600])
    print(result.get("moevement", 600).ettr)

The package imports only numpy (matplotlib lazily, for plots); it never imports torch or
Megatron-Core.
"""

from megatron_moevement.sim._validation import SimSpecError
from megatron_moevement.sim.config import STRATEGY_NAMES, SimulationConfig
from megatron_moevement.sim.estimator import ComputeSpec, estimate_profile
from megatron_moevement.sim.ettr import (
    ettr_first_order,
    ettr_from_totals,
    ettr_renewal,
    young_daly_interval_s,
)
from megatron_moevement.sim.presets import get_preset, list_presets
from megatron_moevement.sim.profile import (
    PROFILE_JSON_SCHEMA,
    StageProfile,
    StageTimes,
    load_profile,
    save_profile,
)
from megatron_moevement.sim.scenario import Scenario, load_scenario_file
from megatron_moevement.sim.simulator import SimulationResult, Simulator, simulate
from megatron_moevement.sim.specs import (
    PRECISIONS,
    ClusterSpec,
    ModelSpec,
    ParallelPlan,
    Precision,
)
from megatron_moevement.sim.strategies import StrategyEvaluation, get_strategy

__all__ = [
    "PRECISIONS",
    "PROFILE_JSON_SCHEMA",
    "STRATEGY_NAMES",
    "ClusterSpec",
    "ComputeSpec",
    "ModelSpec",
    "ParallelPlan",
    "Precision",
    "Scenario",
    "SimSpecError",
    "SimulationConfig",
    "SimulationResult",
    "Simulator",
    "StageProfile",
    "StageTimes",
    "StrategyEvaluation",
    "estimate_profile",
    "ettr_first_order",
    "ettr_from_totals",
    "ettr_renewal",
    "get_preset",
    "get_strategy",
    "list_presets",
    "load_profile",
    "load_scenario_file",
    "save_profile",
    "simulate",
    "young_daly_interval_s",
]
