"""How MoEvement's costs grow with the work: experts, layers, hidden size, window, ranks.

For each point of each sweep it runs the overhead job (``harness/overhead.py``) without
checkpointing and with MoEvement, interleaved in ``--rounds`` rounds, and records the ratio of
median iteration times, the bytes snapshotted per iteration, the host memory MoEvement holds at
the end (snapshot buffers + peer replicas + upstream logs, summed over ranks) and the model's
training state (compute weights + FP32 main params + optimizer state). One axis moves at a time
from the base point; the machine's core count is recorded beside the rank sweep (processes beyond
the cores share them, so time ratios there measure contention as much as MoEvement).

    python benchmarks/scaling.py --output results/scaling.json   # also writes results/scaling.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from _results import write_results

from megatron_moevement.harness.launcher import run_worker_job
from megatron_moevement.harness.layout import ParallelLayout
from megatron_moevement.harness.worker import WorkerSpec

BASE = dict(num_experts=8, num_layers=2, hidden_size=128, window_size=4, layout="single")
"""The point every sweep starts from."""
SWEEPS = dict(
    num_experts=[8, 16, 32, 64],
    num_layers=[2, 4, 8],
    hidden_size=[64, 128, 256],
    window_size=[1, 2, 4, 8],
    layout=["single", "ep2", "pp2xep2", "pp2xdp4xep2"],
)
"""Values of each axis (``layout``: 1, 2, 4 and 8 processes)."""


def _run(point: dict, mode: str, iterations: int, out: Path) -> dict:
    model = dict(
        hidden_size=point["hidden_size"],
        ffn_hidden_size=2 * point["hidden_size"],
        num_experts=point["num_experts"],
        num_layers=point["num_layers"],
        precision="bf16",
        num_attention_heads=4,
        seq_length=32,
        micro_batch_size=2,
        num_microbatches=2,
    )
    spec = WorkerSpec(
        job="overhead",
        layout=ParallelLayout.parse(point["layout"]).to_dict(),
        model=model,
        moevement=dict(mode=mode, window_size=point["window_size"], replication_factor=1),
        iterations=iterations,
        log_level="WARNING",
    )
    run_worker_job(spec, out, timeout=1200)
    return json.loads((out / "overhead.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=10, help="iterations left out of timing")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds per point")
    parser.add_argument(
        "--axes", nargs="*", default=list(SWEEPS), choices=list(SWEEPS), help="sweeps to run"
    )
    parser.add_argument("--output", type=Path, default=Path("results/scaling.json"))
    args = parser.parse_args()
    if args.warmup >= args.iterations:
        raise SystemExit(f"--iterations {args.iterations} must exceed --warmup {args.warmup}")
    points = []
    for axis in args.axes:
        for value in SWEEPS[axis]:
            points.append((axis, dict(BASE, **{axis: value})))
    measured: dict[str, dict] = {}  # the base point recurs in every sweep: run it once
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="moevement-scaling-") as tmp:
        for index, (axis, point) in enumerate(points):
            key = json.dumps(point, sort_keys=True)
            if key in measured:
                continue
            print(f"[{index + 1}/{len(points)}] {axis}: {point}", flush=True)
            runs: dict[str, list[dict]] = {"none": [], "moevement": []}
            for r in range(args.rounds):
                for mode in runs:
                    runs[mode].append(
                        _run(point, mode, args.iterations, Path(tmp) / f"{index}-{mode}-{r}")
                    )
            ratios = [
                statistics.median(m["iteration_times"][args.warmup :])
                / statistics.median(n["iteration_times"][args.warmup :])
                for m, n in zip(runs["moevement"], runs["none"])
            ]
            last = runs["moevement"][-1]
            measured[key] = dict(
                point=point,
                processes=ParallelLayout.parse(point["layout"]).world_size,
                ratio_to_none=statistics.median(ratios),
                ratio_per_round=ratios,
                median_iteration_s=statistics.median(last["iteration_times"][args.warmup :]),
                snapshot_bytes_per_iteration=statistics.fmean(
                    last["snapshot_bytes_per_iteration"][args.warmup :]
                ),
                host_memory_bytes=last["host_memory_bytes"],
                training_state_bytes=last["training_state_bytes"],
                host_to_state=last["host_memory_bytes"]["total"] / last["training_state_bytes"],
            )
    sweeps = {
        axis: [measured[json.dumps(dict(BASE, **{axis: v}), sort_keys=True)] for v in SWEEPS[axis]]
        for axis in args.axes
    }
    print(
        f"\n{os.cpu_count()} cores; load average {load_before[0]:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after; {args.rounds} round(s) per point"
    )
    print(
        f"{'axis':<12} {'value':>12} {'procs':>5} {'x no-ckpt':>9} {'MB/iter':>8} "
        f"{'host MiB':>9} {'state MiB':>9} {'host/state':>10}"
    )
    for axis, rows in sweeps.items():
        for row in rows:
            print(
                f"{axis:<12} {row['point'][axis]!s:>12} {row['processes']:>5} "
                f"{row['ratio_to_none']:>9.3f} {row['snapshot_bytes_per_iteration'] / 1e6:>8.2f} "
                f"{row['host_memory_bytes']['total'] / 2**20:>9.2f} "
                f"{row['training_state_bytes'] / 2**20:>9.2f} {row['host_to_state']:>10.2f}"
            )
    write_results(
        args.output,
        dict(
            base=BASE,
            iterations=args.iterations,
            warmup=args.warmup,
            rounds=args.rounds,
            cpu_count=os.cpu_count(),
            load_average=dict(before=load_before, after=os.getloadavg()),
            sweeps=sweeps,
        ),
    )
    if "num_experts" in sweeps:
        _plot(sweeps["num_experts"], args.output.with_suffix(".png"))


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    experts = [r["point"]["num_experts"] for r in rows]
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    ax_time.plot(experts, [r["ratio_to_none"] for r in rows], "o-")
    ax_time.axhline(1.0, color="grey", lw=0.5)
    ax_time.set(
        xlabel="experts per layer",
        ylabel="iteration time / no checkpointing",
        title="fault-free overhead",
        xscale="log",
    )
    ax_mem.plot(
        experts,
        [r["host_memory_bytes"]["total"] / 2**20 for r in rows],
        "o-",
        label="MoEvement host memory",
    )
    ax_mem.plot(
        experts, [r["training_state_bytes"] / 2**20 for r in rows], "s--", label="training state"
    )
    ax_mem.set(xlabel="experts per layer", ylabel="MiB", title="host memory", xscale="log")
    ax_mem.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
