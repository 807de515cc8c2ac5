"""Sparse-to-dense replay cost: replayed iterations with frozen operators vs normal iterations.

Frozen operators run forward and input-gradient only (no weight-gradient GEMMs, no optimizer
update), so the first replayed iterations of a window, where most operators are frozen, should be
cheaper than a normal iteration. Prints each replayed iteration's time and frozen fraction next to
the normal iteration time, measured in the same job, and writes JSON.

    python benchmarks/replay_cost.py --output results/replay_cost.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _results import write_results

from megatron_moevement.harness.launcher import run_worker_job
from megatron_moevement.harness.layout import ParallelLayout
from megatron_moevement.harness.worker import WorkerSpec


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layout", default="ep2")
    parser.add_argument("--window-size", type=int, default=6)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--ffn-hidden-size", type=int, default=1024)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("results/replay_cost.json"))
    args = parser.parse_args()
    layout = ParallelLayout.parse(args.layout)
    w = args.window_size
    model = dict(
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_experts=args.num_experts,
        num_attention_heads=8,
        seq_length=64,
        micro_batch_size=4,
        num_microbatches=4,
        precision="bf16",
    )
    spec = WorkerSpec(
        job="replay_cost",
        layout=layout.to_dict(),
        model=model,
        moevement=dict(window_size=w, replication_factor=0, repeats=args.repeats),
        iterations=2 * w + 1,
        log_level="WARNING",
    )
    with tempfile.TemporaryDirectory(prefix="moevement-replay-") as tmp:
        run_worker_job(spec, Path(tmp), timeout=1800)
        data = json.loads((Path(tmp) / "replay_cost.json").read_text())
    normal = data["normal_iteration_s"]
    # Normal iterations also pay for background snapshot copies; an all-active replay iteration
    # runs the same training code without them, so it is the like-for-like baseline.
    active = [r["seconds"] for r in data["replay"] if r["frozen_operators"] == 0]
    all_active = sorted(active)[len(active) // 2] if active else normal
    data["all_active_replay_s"] = all_active
    print(
        f"layout {layout}, W={data['window_size']}, normal iteration {normal:.4f} s, "
        f"all-active replay iteration {all_active:.4f} s"
    )
    print(
        f"{'iteration':>9} {'frozen ops':>11} {'seconds':>9} {'x normal':>9} "
        f"{'x all-active':>13}"
    )
    for row in data["replay"]:
        row["ratio_to_normal"] = row["seconds"] / normal
        row["ratio_to_all_active_replay"] = row["seconds"] / all_active
        print(
            f"{row['iteration']:>9} {row['frozen_operators']:>4}/{row['operators']:<6} "
            f"{row['seconds']:>9.4f} {row['ratio_to_normal']:>9.3f} "
            f"{row['ratio_to_all_active_replay']:>13.3f}"
        )
    write_results(args.output, dict(layout=str(layout), model=model, **data))


if __name__ == "__main__":
    main()
