"""Recovery time: scoped recovery vs global rollback vs a full restart, side by side.

The same fault (a SIGKILL of one rank mid-iteration) is injected into two elastic MoEvement runs,
one with ``recovery_scope="auto"`` (only the failed stage's data-parallel group rolls back, fed by
upstream logs) and one with ``recovery_scope="global"`` (every rank rolls back). Their recovery
reports give the per-phase times and the microbatches recomputed. The third column is what a job
without in-memory recovery pays: a fresh launch of all processes that builds the model, loads a
dense checkpoint from local disk (``torch.save`` of every tensor, taken at the same iteration as
the persisted sparse window's start, as a CheckFreq-style durable tier would hold) and recomputes
the iterations since it — measured by running exactly that. Scoped and global runs are interleaved
in rounds (``--rounds``); the median run of each represents it, and every round's ratio is
reported beside it. Results are printed as ratios and written as JSON.

    python benchmarks/recovery_time.py --cold-spare --output results/recovery_time.json
    python benchmarks/recovery_time.py --cold-spare --layout pp4 --output results/recovery_time_pp4.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from _results import median_runs, write_results

from megatron_moevement.harness.launcher import run_elastic_job, run_worker_job
from megatron_moevement.harness.layout import ParallelLayout
from megatron_moevement.harness.worker import WorkerSpec


def _elastic(
    tmp: Path, name: str, layout, model, iterations, window, fault, scope, warm_spare=True
) -> dict:
    spec = WorkerSpec(
        job="resilient",
        layout=layout.to_dict(),
        model=model,
        iterations=iterations,
        log_level="WARNING",
        timeout_s=60,
        moevement=dict(
            window_size=window,
            replication_factor=1,
            recovery_scope=scope,
            faults=[fault],
            warm_spare=warm_spare,
        ),
    )
    run_elastic_job(spec, tmp / name, timeout=1200, spares=1)
    reports = [
        json.loads((tmp / name / f"recovery_rank{r}.json").read_text())["reports"][-1]
        for r in range(layout.world_size)
    ]
    total = max(sum(r["times_s"].values()) for r in reports)
    # When the SIGKILL was sent (the fault plugin's record) and when each survivor noticed.
    killed_at = [json.loads(line)["time"] for line in (tmp / name / "faults.jsonl").open()][0]
    survivors = [r for r in reports if not r["spare"]]
    slowest_rebuild = max(reports, key=lambda r: r["times_s"]["rebuild"])
    return dict(
        detect_s_per_rank=[r["times_s"]["detect"] for r in reports],
        noticed_after_kill_s=max(r["noticed_at"] - killed_at for r in survivors),
        scope=reports[0]["scope"],
        scope_ranks=reports[0]["scope_ranks"],
        recovery_s=total,
        phases_s={k: max(r["times_s"][k] for r in reports) for k in reports[0]["times_s"]},
        # The rank whose rebuild was slowest (the one the others wait for), step by step.
        rebuild_steps_s=slowest_rebuild.get("rebuild_steps_s", {}),
        microbatches_recomputed=sum(r["microbatches_replayed"] for r in reports),
        iterations_replayed=reports[0]["iterations_replayed"] or reports[-1]["iterations_replayed"],
        # Per replayed iteration, the slowest rank in scope: the spare's first iterations run
        # cold (fresh allocator and kernels), the last one shows the steady replay speed.
        replay_iteration_s=[
            max(times)
            for times in zip(*(r["replay_iteration_s"] for r in reports if r["replay_iteration_s"]))
        ],
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layout", default="pp2xdp2xep2")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--window-size", type=int, default=3)
    parser.add_argument("--kill-rank", type=int, default=1)
    parser.add_argument("--kill-iteration", type=int, default=7)
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="scoped and global runs, interleaved (order alternating per round); the median "
        "run of each mode is reported, every round's ratio beside it",
    )
    parser.add_argument(
        "--cold-spare",
        action="store_true",
        help="also run scoped recovery with a spare that starts cold (no warm-up iteration)",
    )
    parser.add_argument("--output", type=Path, default=Path("results/recovery_time.json"))
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    layout = ParallelLayout.parse(args.layout)
    model = dict(precision="bf16", use_distributed_optimizer=True)
    fault = dict(rank=args.kill_rank, iteration=args.kill_iteration, phase="microbatch2")
    results = {}
    with tempfile.TemporaryDirectory(prefix="moevement-recovery-") as tmp:
        tmp = Path(tmp)
        # mode -> (recovery_scope, warm spare)
        modes = {"scoped": ("auto", True), "global": ("global", True)}
        if args.cold_spare:
            modes["scoped_cold_spare"] = ("auto", False)
        runs: dict[str, list[dict]] = {mode: [] for mode in modes}
        for round_ in range(args.rounds):
            # Alternate the order so that drift of the machine does not favour one mode.
            order = list(modes) if round_ % 2 == 0 else list(reversed(modes))
            for mode in order:
                scope, warm = modes[mode]
                print(f"round {round_ + 1}/{args.rounds}: running {mode} ...", flush=True)
                runs[mode].append(
                    _elastic(
                        tmp,
                        f"{mode}{round_}",
                        layout,
                        model,
                        args.iterations,
                        args.window_size,
                        fault,
                        scope,
                        warm_spare=warm,
                    )
                )
        # The median run (by whole recovery time) represents its mode.
        results.update(median_runs(runs))
        # Restart: relaunch everything, load the dense on-disk checkpoint taken at the persisted
        # window start, recompute up to the last committed iteration; time the whole relaunch.
        start_it = results["global"]["iterations_replayed"][0] - 1
        committed = results["global"]["iterations_replayed"][-1]
        ckpt_dir = tmp / "dense_ckpt"
        run_worker_job(
            WorkerSpec(
                job="dense_save",
                layout=layout.to_dict(),
                model=model,
                iterations=start_it + 1,
                log_level="WARNING",
                moevement=dict(checkpoint_dir=str(ckpt_dir)),
            ),
            tmp / "dense_save",
            timeout=1200,
        )
        print("running restart ...", flush=True)
        t = time.perf_counter()
        run_worker_job(
            WorkerSpec(
                job="dense_restart",
                layout=layout.to_dict(),
                model=model,
                iterations=committed + 1,
                log_level="WARNING",
                moevement=dict(checkpoint_dir=str(ckpt_dir), resume_from=start_it + 1),
            ),
            tmp / "restart",
            timeout=1200,
        )
        phases = json.loads((tmp / "restart" / "restart.json").read_text())
        recomputed = committed - start_it
        results["restart"] = dict(
            scope="global",
            recovery_s=time.perf_counter() - t,
            phases_s=phases,
            microbatches_recomputed=recomputed * 4 * layout.world_size,
            note="fresh launch of every process, model build, dense "
            "checkpoint load from local disk, recompute of "
            f"{recomputed} iterations",
        )
    for mode in runs:
        r = results[mode]
        print(
            f"{mode}: detect per rank {[round(d, 3) for d in r['detect_s_per_rank']]} s (failure "
            f"noticed {r['noticed_after_kill_s']:.3f} s after the SIGKILL); phases "
            f"{ {k: round(v, 3) for k, v in r['phases_s'].items()} }; replayed iterations "
            f"{[round(t, 3) for t in r['replay_iteration_s']]} s; slowest rebuild "
            f"{ {k: round(v, 3) for k, v in r['rebuild_steps_s'].items()} }"
        )
    base = results["scoped"]["recovery_s"]
    print(
        f"\n{'mode':<18} {'scope ranks':<14} {'recovery (s)':>12} {'x scoped':>9} "
        f"{'microbatches recomputed':>24}"
    )
    for mode, r in results.items():
        r["ratio_to_scoped"] = r["recovery_s"] / base
        ranks = ",".join(map(str, r.get("scope_ranks", []))) or "all"
        print(
            f"{mode:<18} {ranks:<14} {r['recovery_s']:>12.3f} {r['ratio_to_scoped']:>9.2f} "
            f"{r['microbatches_recomputed']:>24}"
        )
    scoped_to_global = base / results["global"]["recovery_s"]
    scoped, global_ = results["scoped"], results["global"]
    replay_ratio = scoped["phases_s"]["replay"] / global_["phases_s"]["replay"]
    # The last replayed iteration: every rank in scope warm, no operator frozen.
    last_iteration_ratio = scoped["replay_iteration_s"][-1] / global_["replay_iteration_s"][-1]
    per_round = [
        a / b for a, b in zip(scoped["recovery_s_per_round"], global_["recovery_s_per_round"])
    ]
    print(
        f"scoped / global rollback = {scoped_to_global:.2f} (median runs; per round "
        f"{', '.join(f'{r:.2f}' for r in per_round)}; replay phase {replay_ratio:.2f}, "
        f"last replayed iteration {last_iteration_ratio:.2f})"
    )
    write_results(
        args.output,
        dict(
            layout=str(layout),
            fault=fault,
            results=results,
            rounds=args.rounds,
            scoped_to_global=scoped_to_global,
            scoped_to_global_per_round=per_round,
            replay_scoped_to_global=replay_ratio,
            last_replayed_iteration_scoped_to_global=last_iteration_ratio,
            cpu_count=os.cpu_count(),
        ),
    )


if __name__ == "__main__":
    main()
