"""Simulator scaling run (MoEvement paper §5.4 / Fig. 11): DeepSeek-MoE 32B to 671B.

Simulates Gemini and MoEvement (and, with --all, CheckFreq and MoC) on the four scaling presets
(512 to 16384 GPUs) at MTBF 1 h, 30 min and 10 min, analytically and with seeded Monte-Carlo,
and reports how long each configuration takes to simulate (the 671B one must finish in well
under a minute). Writes JSON.

    python benchmarks/sim_scaling.py --output results/sim_scaling.json
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from _results import write_results

from megatron_moevement.logging_utils import configure_logging
from megatron_moevement.sim import SimulationConfig, Simulator, get_preset
from megatron_moevement.sim.presets import SCALING_PRESETS


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=Path("results/sim_scaling.json"))
    parser.add_argument("--trials", type=int, default=200, help="Monte-Carlo runs per point")
    parser.add_argument("--all", action="store_true", help="also CheckFreq and MoC")
    args = parser.parse_args()
    configure_logging("WARNING")
    strategies = (
        ["checkfreq", "gemini", "moc", "moevement"] if args.all else ["gemini", "moevement"]
    )
    mtbfs = [3600.0, 1800.0, 600.0]
    rows = []
    print(
        f"{'preset':<20} {'GPUs':>6} {'iter s':>7} {'strategy':<10} "
        f"{'1h':>6} {'30m':>6} {'10m':>6} {'sim time':>9}"
    )
    for name in SCALING_PRESETS:
        start = time.perf_counter()
        scenario = get_preset(name)
        result = Simulator(scenario, SimulationConfig(mc_trials=args.trials)).sweep(
            mtbfs, strategies, monte_carlo=True
        )
        elapsed = time.perf_counter() - start
        for strategy in strategies:
            values = [result.get(strategy, m) for m in mtbfs]
            print(
                f"{name:<20} {scenario.cluster.num_gpus:>6} {result.iteration_s:>7.2f} "
                f"{strategy:<10} "
                + " ".join(f"{v.ettr:>6.3f}" for v in values)
                + f" {elapsed:>8.2f}s"
            )
        rows.append({"preset": name, "simulation_s": elapsed, "result": result.to_dict()})
    write_results(args.output, {"runs": rows}, indent=2)


if __name__ == "__main__":
    main()
