"""Real vs simulated ETTR: a harness run with real SIGKILLs against the simulator's prediction.

For each repeat:

1. profile the harness model (``megatron_moevement.profiler``: per-stage forward / input-grad /
   weight-grad / optimizer times, snapshot and replication throughput, restart cost, and the
   real loop's fault-free, checkpoint-free iteration time ``T``);
2. optionally (``--control``) run MoEvement without failures;
3. run MoEvement (scoped recovery) with the failure trace: each listed rank SIGKILLs itself at
   the given iteration and phase, a spare takes its place;
4. measure ETTR = iterations committed x ``T`` / wall time over the run after ``--warmup``
   iterations (:mod:`megatron_moevement.profiler.run_timeline`, the simulator's definition), and
   feed the simulator the profile, the same window and the same failure instants
   (``Simulator.replay_trace``).

``T`` is the fault-free iteration time measured in the run itself (mean time between commits no
failure interrupted: same machine load as the failures); the ETTR with the profiler's separately
measured ``T`` is reported too ("strict"), and shows how much the load of a shared machine
drifts between two runs. Prints both ETTRs, their relative difference and whether they agree
within ``--tolerance``, the wall time each failure cost against the simulator's recovery time,
and writes JSON. ``--wait-for-quiet`` waits (up to 10 min) for the 1-minute load average to drop
below a threshold before each run.

    python benchmarks/ettr_real_vs_sim.py --output results/ettr_real_vs_sim.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from _results import write_results

from megatron_moevement.harness.launcher import run_elastic_job
from megatron_moevement.harness.layout import ParallelLayout
from megatron_moevement.harness.worker import WorkerSpec
from megatron_moevement.logging_utils import configure_logging
from megatron_moevement.profiler import profile_harness
from megatron_moevement.profiler.harness_scenario import harness_scenario, harness_sim_config
from megatron_moevement.profiler.run_timeline import RealRun, load_real_run
from megatron_moevement.sim import Simulator


def _parse_faults(text: str) -> list[dict]:
    """``rank:iteration:phase[:generation]``; by default the k-th kill (in iteration order)
    strikes process-group generation k (every kill starts a new generation)."""
    faults = []
    for part in filter(None, text.split(",")):
        fields = part.split(":")
        faults.append(
            dict(
                rank=int(fields[0]),
                iteration=int(fields[1]),
                phase=fields[2],
                generation=int(fields[3]) if len(fields) > 3 else None,
            )
        )
    faults.sort(key=lambda f: f["iteration"])
    for k, f in enumerate(faults):
        if f["generation"] is None:
            f["generation"] = k
    return faults


def _wait_for_quiet(threshold: float | None, limit_s: float = 600.0) -> float:
    """Waits until the 1-minute load average is below ``threshold``; returns it."""
    load = os.getloadavg()[0]
    deadline = time.monotonic() + limit_s
    while threshold is not None and load > threshold and time.monotonic() < deadline:
        time.sleep(5)
        load = os.getloadavg()[0]
    return load


def _run(tmp: Path, name: str, layout, model, args, faults) -> RealRun:
    spec = WorkerSpec(
        job="resilient",
        layout=layout.to_dict(),
        model=model,
        iterations=args.iterations,
        log_level="WARNING",
        timeout_s=60,
        moevement=dict(window_size=args.window_size, replication_factor=1, faults=faults),
    )
    run_elastic_job(spec, tmp / name, timeout=1800, spares=len(faults))
    return load_real_run(tmp / name, layout.world_size, args.iterations, args.warmup)


def _simulate(profile, run: RealRun, window: int) -> dict:
    config = harness_sim_config(
        profile, fixed_window=window, replication_factor=1, horizon_s=run.wall_s
    )
    sim = Simulator(harness_scenario(profile), config)
    trace = sim.replay_trace(run.failures_s, run.wall_s, ["moevement"])[0]
    per_failure, before = [], 0.0
    for k in range(1, len(run.failures_s) + 1):  # recovery of each failure, in order
        total = sim.replay_trace(run.failures_s[:k], run.wall_s, ["moevement"])[0].recovery_s
        per_failure.append(total - before)
        before = total
    plan = sim.evaluate(max(run.wall_s, 1.0), ["moevement"])[0]
    return dict(
        ettr=trace.ettr,
        iteration_s=sim.ctx.iteration_s,
        recovery_s_total=trace.recovery_s,
        recovery_s_per_failure=per_failure,
        failures=trace.failures,
        overhead_fraction=trace.overhead_fraction,
        restart_s=config.restart_s,
        conversion_s=plan.details["conversion_s"],
        replay_iteration_s=plan.details["replay_iteration_s"],
        load_s=plan.details["load_s"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layout", default="pp2xdp2xep2")
    parser.add_argument(
        "--model",
        default='{"precision": "bf16", ' '"use_distributed_optimizer": true}',
        help="TinyMoEConfig fields (JSON)",
    )
    parser.add_argument("--iterations", type=int, default=48)
    parser.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="leading iterations excluded (a multiple of the window)",
    )
    parser.add_argument("--window-size", type=int, default=3)
    parser.add_argument(
        "--faults",
        default="1:16:microbatch2,2:33:microbatch1",
        help="rank:iteration:phase,... (phases as in harness/resilient.py)",
    )
    parser.add_argument("--profile-iterations", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--control",
        action="store_true",
        help="also run without failures (real vs simulated ETTR ~ 1)",
    )
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument(
        "--wait-for-quiet",
        type=float,
        default=None,
        metavar="LOAD",
        help="before each run, wait for the 1-min load average to drop below it",
    )
    parser.add_argument("--output", type=Path, default=Path("results/ettr_real_vs_sim.json"))
    args = parser.parse_args()
    configure_logging("WARNING")
    if args.warmup % args.window_size:
        raise SystemExit("--warmup must be a multiple of --window-size (windows start at 0)")
    layout = ParallelLayout.parse(args.layout)
    model = json.loads(args.model)
    faults = _parse_faults(args.faults)
    trials = []
    with tempfile.TemporaryDirectory(prefix="moevement-ettr-") as tmp:
        tmp = Path(tmp)
        for repeat in range(args.repeats):
            t0 = time.perf_counter()
            load = _wait_for_quiet(args.wait_for_quiet)
            print(
                f"[{repeat + 1}/{args.repeats}] profiling {layout} (load {load:.1f}) ...",
                flush=True,
            )
            profile = profile_harness(
                layout.to_dict(),
                model,
                args.profile_iterations,
                output=tmp / f"profile{repeat}.json",
                config=dict(window_size=args.window_size, replication_factor=1),
            )
            iteration_s = profile.metadata["measurements"]["iteration_s"]
            runs = {}
            if args.control:
                print(f"[{repeat + 1}/{args.repeats}] fault-free run ...", flush=True)
                runs["fault_free"] = (
                    _run(tmp, f"control{repeat}", layout, model, args, []),
                    tmp / f"control{repeat}",
                )
            load = _wait_for_quiet(args.wait_for_quiet)
            print(
                f"[{repeat + 1}/{args.repeats}] run with {len(faults)} SIGKILL(s) (load "
                f"{load:.1f}) ...",
                flush=True,
            )
            runs["failures"] = (
                _run(tmp, f"faulty{repeat}", layout, model, args, faults),
                tmp / f"faulty{repeat}",
            )
            trial = dict(profile=profile.to_dict(), iteration_s=iteration_s, runs={})
            for name, (run, out) in runs.items():
                sim = _simulate(profile, run, args.window_size)
                real = run.ettr()
                rel = (sim["ettr"] - real) / real
                trial["runs"][name] = dict(
                    real=dict(
                        ettr=real,
                        ettr_strict=run.ettr(iteration_s),
                        lost_per_failure_s=run.lost_per_failure_s,
                        **run.to_dict(),
                    ),
                    sim=sim,
                    relative_difference=rel,
                    agree=abs(rel) <= args.tolerance,
                    relative_difference_strict=(sim["ettr"] - run.ettr(iteration_s))
                    / run.ettr(iteration_s),
                )
            trials.append(trial)
            print(
                f"[{repeat + 1}/{args.repeats}] done in {time.perf_counter() - t0:.0f} s",
                flush=True,
            )
    print(
        f"\n{layout}, W={args.window_size}, {args.iterations} iterations "
        f"(first {args.warmup} excluded), faults {args.faults}"
    )
    print(
        f"{'trial':>5} {'run':<10} {'T prof':>7} {'T run':>7} {'T sim':>7} {'wall s':>7} "
        f"{'lost real':>9} {'rec sim':>8} {'ETTR real':>9} {'(strict)':>8} {'ETTR sim':>9} "
        f"{'diff':>7} agree"
    )
    for i, trial in enumerate(trials):
        for name, r in trial["runs"].items():
            real, sim = r["real"], r["sim"]
            lost = ",".join(f"{x:.2f}" for x in real["lost_per_failure_s"]) or "-"
            rec = ",".join(f"{x:.2f}" for x in sim["recovery_s_per_failure"]) or "-"
            print(
                f"{i:>5} {name:<10} {trial['iteration_s']:>7.3f} {real['iteration_s']:>7.3f} "
                f"{sim['iteration_s']:>7.3f} {real['wall_s']:>7.2f} {lost:>9} {rec:>8} "
                f"{real['ettr']:>9.3f} {real['ettr_strict']:>8.3f} {sim['ettr']:>9.3f} "
                f"{100 * r['relative_difference']:>+6.1f}% {'yes' if r['agree'] else 'NO'}"
            )
    summary = {}
    for name in trials[0]["runs"]:
        diffs = [t["runs"][name]["relative_difference"] for t in trials]
        summary[name] = dict(
            median_relative_difference=statistics.median(diffs),
            max_abs_relative_difference=max(abs(d) for d in diffs),
            all_agree=all(t["runs"][name]["agree"] for t in trials),
        )
    write_results(
        args.output,
        dict(
            layout=str(layout),
            model=model,
            window_size=args.window_size,
            iterations=args.iterations,
            warmup=args.warmup,
            faults=faults,
            tolerance=args.tolerance,
            trials=trials,
            summary=summary,
        ),
    )


if __name__ == "__main__":
    main()
