"""In-memory recovery inside Megatron-LM's own pretrain_gpt.py: a warm spare vs a cold one.

Runs the patched ``pretrain_gpt.py`` (a copy of the Megatron-LM tree, patched in a temporary
folder) on PP2 x DP2 x EP2 under the local launcher's elastic agent with one spare, and SIGKILLs
one rank mid-iteration. The spare takes its place and Megatron-LM's ``pretrain()`` runs again on
every rank. Two modes, interleaved in rounds (order alternating):

* ``warm``: the spare compiled Megatron's fusions while it waited (the default,
  ``megatron/spare_warm_up.py``);
* ``cold``: ``MOEVEMENT_WARM_SPARE=0``, the spare compiles them in its first ``pretrain()``.

Each run's recovery reports give the phases on the slowest rank (detect, rebuild = the second
``pretrain()`` up to the strategy, fetch, replay = data iterators + replayed iterations) and the
replayed iterations' times; the median run of each mode is reported with every round's numbers,
as JSON.

    python benchmarks/megatron_lm_recovery.py --rounds 3 --output results/megatron_lm_recovery.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from _results import median_runs, write_results

from megatron_moevement.harness.megatron_lm import (
    model_args,
    patch_tree,
    recovery_reports,
    run_pretrain,
)
from megatron_moevement.megatron.spare_warm_up import WARM_SPARE_ENV

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TREE = Path(os.environ.get("MEGATRON_LM_DIR", ROOT.parent / "shared" / "megatron-lm"))
PHASES = ("detect", "rebuild", "fetch", "replay")


def _run(tree: Path, out: Path, mode: str, fault: dict, iterations: int) -> dict:
    os.environ[WARM_SPARE_ENV] = "1" if mode == "warm" else "0"
    started = time.perf_counter()
    run_pretrain(
        tree,
        out,
        "moevement",
        [*model_args(iterations), "--untie-embeddings-and-output-weights"],
        spares=1,
        elastic=True,
        faults=[fault],
    )
    wall = time.perf_counter() - started
    reports = {rank: rs[0] for rank, rs in recovery_reports(out).items()}
    phases = {k: max(r["times_s"][k] for r in reports.values()) for k in PHASES}
    spare = next(r for r in reports.values() if r["spare"])
    return dict(
        phases_s=phases,
        recovery_s=max(sum(r["times_s"].values()) for r in reports.values()),
        replay_iteration_s=max(
            (max(r["replay_iteration_s"]) for r in reports.values() if r["replay_iteration_s"]),
            default=0.0,
        ),
        spare_replay_iteration_s=spare["replay_iteration_s"],
        scope_ranks=spare["scope_ranks"],
        path=spare["path"],
        job_wall_s=wall,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--megatron-lm", type=Path, default=DEFAULT_TREE)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--kill-rank", type=int, default=1)
    parser.add_argument("--kill-iteration", type=int, default=4)
    parser.add_argument("--output", type=Path, default=Path("results/megatron_lm_recovery.json"))
    args = parser.parse_args()
    if not (args.megatron_lm / "pretrain_gpt.py").is_file():
        raise SystemExit(
            f"{args.megatron_lm} is not a Megatron-LM tree: pass --megatron-lm (core_v0.16.1)"
        )
    fault = {"rank": args.kill_rank, "iteration": args.kill_iteration, "phase": "microbatch1"}
    runs: dict[str, list[dict]] = {"warm": [], "cold": []}
    with tempfile.TemporaryDirectory(prefix="moevement-mlm-recovery-") as tmp:
        tree = patch_tree(args.megatron_lm, Path(tmp) / "Megatron-LM")
        for round_ in range(args.rounds):
            order = ["warm", "cold"] if round_ % 2 == 0 else ["cold", "warm"]
            for mode in order:
                run = _run(tree, Path(tmp) / f"{round_}-{mode}", mode, fault, args.iterations)
                runs[mode].append(run)
                print(
                    f"round {round_ + 1}/{args.rounds} {mode}: recovery {run['recovery_s']:.2f} s "
                    + " ".join(f"{k} {run['phases_s'][k]:.2f}" for k in PHASES),
                    flush=True,
                )
    os.environ.pop(WARM_SPARE_ENV, None)
    results = median_runs(runs)
    per_round = [
        w["recovery_s"] / c["recovery_s"] for w, c in zip(runs["warm"], runs["cold"], strict=True)
    ]
    rebuild = [
        w["phases_s"]["rebuild"] / c["phases_s"]["rebuild"]
        for w, c in zip(runs["warm"], runs["cold"], strict=True)
    ]
    payload = dict(
        layout="tp1xpp2xdp2xep2 (Megatron-LM pretrain_gpt.py, bf16, distributed optimizer)",
        fault=fault,
        rounds=args.rounds,
        results=results,
        warm_to_cold=statistics.median(per_round),
        warm_to_cold_per_round=per_round,
        rebuild_warm_to_cold=statistics.median(rebuild),
        cpu_count=os.cpu_count(),
    )
    print(
        f"\nwarm / cold spare: recovery {payload['warm_to_cold']:.2f} (rounds "
        + ", ".join(f"{r:.2f}" for r in per_round)
        + f"), rebuild {payload['rebuild_warm_to_cold']:.2f}"
    )
    for mode, r in results.items():
        print(
            f"  {mode}: recovery {r['recovery_s']:.2f} s; "
            + " ".join(f"{k} {r['phases_s'][k]:.3f}" for k in PHASES)
            + f"; slowest replayed iteration {r['replay_iteration_s']:.3f} s"
        )
    write_results(args.output, payload)


if __name__ == "__main__":
    main()
