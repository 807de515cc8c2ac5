"""Baselines with real failures: MoEvement vs Gemini-like vs MoC-like on the same SIGKILL.

Runs a fault-free reference, then one elastic run per strategy in which the same rank SIGKILLs
itself at the same point, and reports for each: whether the final state is bitwise equal to the
fault-free run, the recovery (scope, ranks rolled back, iterations and microbatches recomputed,
phase times), the bytes snapshotted per iteration and, for MoC, the lost tokens and their
proportion (PLT) next to what the simulator's MoC model expects for that staleness. Writes JSON.

    python benchmarks/baselines.py --output results/baselines.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from _results import write_results

from megatron_moevement.harness.launcher import run_elastic_job, run_worker_job
from megatron_moevement.harness.layout import ParallelLayout
from megatron_moevement.harness.worker import WorkerSpec


def _states(out: Path, world: int) -> list[dict]:
    return [torch.load(out / f"state_rank{r}.pt") for r in range(world)]


def _compare(a: list[dict], b: list[dict]) -> dict:
    """Tensors that differ (bitwise) between two jobs' final states, by kind."""
    differing, total = {}, 0
    for sa, sb in zip(a, b):
        for key in sa:
            total += 1
            if not torch.equal(
                sa[key].reshape(-1).view(torch.uint8), sb[key].reshape(-1).view(torch.uint8)
            ):
                kind = key.split("/")[0]
                differing[kind] = differing.get(kind, 0) + 1
    return dict(tensors=total, differing=differing, bitwise_equal=not differing)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layout", default="pp2xdp2xep2")
    parser.add_argument("--iterations", type=int, default=16)
    parser.add_argument("--kill-rank", type=int, default=1)
    parser.add_argument("--kill-iteration", type=int, default=10)
    parser.add_argument("--window-size", type=int, default=3, help="MoEvement's window")
    parser.add_argument("--gemini-interval", type=int, default=4)
    parser.add_argument("--moc-fraction", type=float, default=0.25)
    parser.add_argument("--output", type=Path, default=Path("results/baselines.json"))
    args = parser.parse_args()
    layout = ParallelLayout.parse(args.layout)
    world = layout.world_size
    model = dict(precision="bf16", use_distributed_optimizer=True)
    fault = dict(rank=args.kill_rank, iteration=args.kill_iteration, phase="microbatch2")
    setups = {
        "moevement": dict(window_size=args.window_size),
        "gemini": dict(strategy="gemini", baseline=dict(interval=args.gemini_interval)),
        "moc": dict(strategy="moc", baseline=dict(expert_fraction=args.moc_fraction)),
    }
    results = {}
    with tempfile.TemporaryDirectory(prefix="moevement-baselines-") as tmp:
        tmp = Path(tmp)
        print("running the fault-free reference ...", flush=True)
        run_worker_job(
            WorkerSpec(
                layout=layout.to_dict(),
                model=model,
                iterations=args.iterations,
                log_level="WARNING",
            ),
            tmp / "reference",
            timeout=1200,
        )
        reference = _states(tmp / "reference", world)
        for name, fields in setups.items():
            print(
                f"running {name} with a SIGKILL of rank {fault['rank']} in iteration "
                f"{fault['iteration']} ...",
                flush=True,
            )
            spec = WorkerSpec(
                job="resilient",
                layout=layout.to_dict(),
                model=model,
                iterations=args.iterations,
                log_level="WARNING",
                timeout_s=60,
                moevement=dict(fields, replication_factor=1, faults=[fault]),
            )
            start = time.perf_counter()
            agent = run_elastic_job(spec, tmp / name, timeout=1200, spares=1)
            wall = time.perf_counter() - start
            files = [
                json.loads((tmp / name / f"recovery_rank{r}.json").read_text())
                for r in range(world)
            ]
            reports = [f["reports"][-1] for f in files]
            replayed = max((r["iterations_replayed"] for r in reports), key=len)
            results[name] = dict(
                killed=[dict(rank=f["rank"], exit_code=f["code"]) for f in agent.failures],
                job_wall_s=wall,
                comparison=_compare(_states(tmp / name, world), reference),
                scope=reports[0]["scope"],
                scope_ranks=reports[0]["scope_ranks"],
                iterations_recomputed=replayed,
                microbatches_recomputed=sum(r["microbatches_replayed"] for r in reports),
                recovery_s=max(sum(r["times_s"].values()) for r in reports),
                phases_s={k: max(r["times_s"][k] for r in reports) for k in reports[0]["times_s"]},
                stats=files[0]["stats"],
                bytes_per_iteration_all_ranks=sum(
                    f["stats"]["bytes_per_snapshot"] * f["stats"]["snapshots_taken"] for f in files
                )
                / args.iterations,
            )
    moc = results["moc"]["stats"]
    groups = moc["groups"]
    # The simulator's MoC model: a failure loses (n - 1) / 2 iterations of expert updates on
    # average over a round robin of n groups (uniform routing).
    moc["simulator_expected_plt_one_failure"] = (groups - 1) / 2 / args.iterations
    print(
        f"\nlayout {layout}, {args.iterations} iterations, rank {fault['rank']} SIGKILLed in "
        f"iteration {fault['iteration']}"
    )
    print(
        f"{'strategy':<10} {'bitwise':>8} {'scope':>7} {'recomputed':>11} {'mb':>4} "
        f"{'recovery s':>10} {'MB/iter':>8} {'lost tokens':>12} {'PLT':>8}"
    )
    for name, r in results.items():
        s = r["stats"]
        lost = s.get("lost_tokens", 0)
        plt = s.get("proportion_lost_tokens", 0.0)
        print(
            f"{name:<10} {'yes' if r['comparison']['bitwise_equal'] else 'NO':>8} "
            f"{r['scope']:>7} {len(r['iterations_recomputed']):>11} "
            f"{r['microbatches_recomputed']:>4} {r['recovery_s']:>10.2f} "
            f"{r['bytes_per_iteration_all_ranks'] / 1e6:>8.2f} {lost:>12} {100 * plt:>7.2f}%"
        )
    print(
        f"MoC: {groups} expert groups; the simulator's model expects a PLT of "
        f"{100 * moc['simulator_expected_plt_one_failure']:.2f}% for one failure in "
        f"{args.iterations} iterations (uniform routing)"
    )
    write_results(
        args.output,
        dict(
            layout=str(layout),
            model=model,
            iterations=args.iterations,
            fault=fault,
            setups=setups,
            results=results,
        ),
    )


if __name__ == "__main__":
    main()
