"""Profiler of the real harness model: per-stage forward / input-gradient / weight-gradient /
optimizer times, snapshot and replication throughput and recovery restart costs, written in the
ETTR simulator's stage-profile format (``docs/simulator.md``, "Profiler").

* :func:`profile_harness` runs the ``profile`` harness job and returns the
  :class:`~megatron_moevement.sim.profile.StageProfile`;
* :func:`~megatron_moevement.profiler.harness_scenario.harness_scenario` and
  :func:`~megatron_moevement.profiler.harness_scenario.harness_sim_config` turn it into
  simulator inputs;
* ``python -m megatron_moevement.profiler --output results/profile.json`` is the command line.
"""

from megatron_moevement.profiler.run import profile_harness

__all__ = ["profile_harness"]
