"""Bounded host memory over a long run: RSS and MoEvement's host bytes every N iterations.

Trains the harness model for ``--iterations`` (default 1,000) with peer replication and upstream
logging (a pipeline layout), once fault-free and once with a rank SIGKILLed at
``--kill-iteration`` (default 500) and recovered by a spare. Every ``--every`` iterations each
rank records its RSS and the strategy's host bytes (snapshot buffers, peer replicas, upstream
log). The strategy keeps one persisted and one in-flight window, so after the second window its
buffers must stay constant and its total within the bound reached in the next two windows (the
upstream log grows and shrinks with the position in the window); RSS growth after warm-up is
reported per 100 iterations. Writes JSON and, with matplotlib, a plot.

    python benchmarks/memory_bound.py --output results/memory_bound.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _results import write_results

from megatron_moevement.harness.launcher import run_elastic_job
from megatron_moevement.harness.layout import ParallelLayout
from megatron_moevement.harness.worker import WorkerSpec


def _run(args, layout, faults, out: Path) -> list[list[dict]]:
    spec = WorkerSpec(
        job="resilient",
        layout=layout.to_dict(),
        model=dict(
            hidden_size=32,
            ffn_hidden_size=64,
            num_layers=2 * layout.pp,
            num_experts=4,
            num_attention_heads=4,
            seq_length=16,
            micro_batch_size=2,
            num_microbatches=2,
        ),
        iterations=args.iterations,
        log_level="WARNING",
        timeout_s=120,
        moevement=dict(
            window_size=args.window_size,
            replication_factor=1,
            memory_every=args.every,
            faults=faults,
        ),
    )
    run_elastic_job(spec, out, timeout=7200, spares=1 if faults else 0)
    return [
        json.loads((out / f"recovery_rank{r}.json").read_text())["memory"]
        for r in range(layout.world_size)
    ]


def _summary(series: list[list[dict]], window: int, recovered_at: int | None) -> dict:
    """Per rank: the bound (the most host bytes during the two windows after the second one:
    buffers of both window generations allocated, the upstream log through a full cycle), the
    most seen afterwards, whether the buffers stayed constant (from two windows after the
    recovery, which rebuilds the strategy and refills its buffers), and the RSS trend."""
    per_rank = []
    for rows in series:
        first = rows[0]["iteration"] if rows else 0  # a spare's series starts when it joined
        start = first + 2 * window
        cycle = [r["total"] for r in rows if start <= r["iteration"] < start + 2 * window]
        steady = [r for r in rows if r["iteration"] >= start]
        settled = max(start, (recovered_at or 0) + 2 * window)
        buffers = {r["snapshots"] + r["replicas"] for r in steady if r["iteration"] >= settled}
        bound = max(cycle, default=None)
        most = max((r["total"] for r in steady), default=None)
        rss = [r["rss"] for r in steady]
        span = max(1, steady[-1]["iteration"] - steady[0]["iteration"]) if steady else 1
        growth = (rss[-1] - rss[0]) * 100 / span if rss else None
        per_rank.append(
            dict(
                host_bytes_bound=bound,
                host_bytes_max=most,
                within_bound=bound is not None and most <= bound,
                buffers_constant=len(buffers) <= 1,
                rss_first=rss[0] if rss else None,
                rss_last=rss[-1] if rss else None,
                rss_growth_bytes_per_100_iterations=growth,
            )
        )
    bounded = all(r["within_bound"] and r["buffers_constant"] for r in per_rank)
    return dict(ranks=per_rank, bounded=bounded)


def _plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    fig, (ax_rss, ax_host) = plt.subplots(1, 2, figsize=(11, 4))
    for run, data in results["runs"].items():
        for rank, rows in enumerate(data["series"]):
            its = [r["iteration"] for r in rows]
            style = "-" if run == "fault_free" else "--"
            ax_rss.plot(its, [r["rss"] / 2**20 for r in rows], style, label=f"{run} r{rank}")
            ax_host.plot(its, [r["total"] / 2**20 for r in rows], style, label=f"{run} r{rank}")
    ax_rss.set(xlabel="iteration", ylabel="RSS (MiB)", title="process RSS")
    ax_host.set(xlabel="iteration", ylabel="MiB", title="MoEvement host bytes")
    ax_host.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layout", default="pp2")
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--every", type=int, default=1, help="record every N iterations")
    parser.add_argument("--window-size", type=int, default=4)
    parser.add_argument("--kill-iteration", type=int, default=500)
    parser.add_argument("--kill-rank", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path("results/memory_bound.json"))
    args = parser.parse_args()
    if not 0 <= args.kill_iteration < args.iterations:
        raise SystemExit(f"--kill-iteration must lie in [0, {args.iterations})")
    layout = ParallelLayout.parse(args.layout)
    fault = dict(rank=args.kill_rank, iteration=args.kill_iteration, phase="microbatch1")
    results = dict(layout=str(layout), iterations=args.iterations, window_size=args.window_size)
    results["runs"] = {}
    with tempfile.TemporaryDirectory(prefix="moevement-memory-") as tmp:
        for name, faults in (("fault_free", []), ("failure", [fault])):
            print(f"running {name} ({args.iterations} iterations) ...", flush=True)
            series = _run(args, layout, faults, Path(tmp) / name)
            results["runs"][name] = dict(
                faults=faults,
                series=series,
                **_summary(series, args.window_size, args.kill_iteration if faults else None),
            )
    for name, data in results["runs"].items():
        print(f"\n{name}: within the bound, buffers constant: {data['bounded']}")
        for rank, r in enumerate(data["ranks"]):
            print(
                f"  rank {rank}: host bytes bound {r['host_bytes_bound'] / 2**20:.2f} MiB, "
                f"max {r['host_bytes_max'] / 2**20:.2f} MiB; RSS {r['rss_first'] / 2**20:.0f} -> "
                f"{r['rss_last'] / 2**20:.0f} MiB "
                f"({r['rss_growth_bytes_per_100_iterations'] / 2**20:+.2f} MiB / 100 iterations)"
            )
    write_results(args.output, results)
    _plot(results, args.output.with_suffix(".png"))


if __name__ == "__main__":
    main()
