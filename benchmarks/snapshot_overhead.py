"""Snapshot overhead: no checkpointing vs dense in-memory snapshots vs MoEvement, side by side.

Runs the modes of the same model on the local CPU harness interleaved in ``--rounds`` rounds, and
reports per mode the median over rounds of its median iteration time (after warm-up), the median
and spread (min-max) of its per-round ratio to that round's no-checkpointing run, the load
average it ran under, and the bytes snapshotted per iteration (summed over ranks). ``--baselines`` adds the Gemini-like (dense
snapshot every ``--gemini-interval`` iterations) and MoC-like (non-expert state plus
``--moc-fraction`` of the experts every iteration) strategies. ``copy_floor`` runs after
``moevement`` in every round: the same model with no strategy, beside a background thread that
copies and checksums as many bytes per rank per iteration as that round's MoEvement run
snapshotted (:mod:`megatron_moevement.harness.copy_floor`). Its ratio is the measured floor of
that much snapshot traffic on this host, which MoEvement's ratio is compared with
(``ratio_to_floor``). Results go to JSON.

    python benchmarks/snapshot_overhead.py --layout ep2 --output results/snapshot_overhead.json
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

MODES = ("none", "dense", "moevement", "copy_floor")
BASELINE_MODES = ("gemini", "moc")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layout", default="ep2")
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds of every mode (median, spread)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="first iterations excluded from the statistics (default: 2W + 2, W = 8 for auto, "
        "and then also every iteration that first touched a new host buffer and the one after "
        "it: a one-time cost, reported apart; an explicit --warmup keeps those iterations)",
    )
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--ffn-hidden-size", type=int, default=1024)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument(
        "--window-size", default="auto", help='MoEvement window: "auto" (Algorithm 1) or an int'
    )
    parser.add_argument(
        "--d2h-bandwidth",
        type=float,
        default=None,
        help="bytes/s assumed by Algorithm 1 (default: measured)",
    )
    parser.add_argument("--replication-factor", type=int, default=1)
    parser.add_argument(
        "--grouped-gemm",
        action="store_true",
        help="grouped-GEMM experts (GroupedMLP: every local expert stacked in weight1/weight2)",
    )
    parser.add_argument(
        "--baselines", action="store_true", help="also run the gemini and moc baselines"
    )
    parser.add_argument("--gemini-interval", type=int, default=4)
    parser.add_argument("--moc-fraction", type=float, default=0.25)
    parser.add_argument("--output", type=Path, default=Path("results/snapshot_overhead.json"))
    args = parser.parse_args()

    layout = ParallelLayout.parse(args.layout)
    model = dict(
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_experts=args.num_experts,
        num_layers=args.num_layers,
        precision="bf16",
        num_attention_heads=8,
        seq_length=64,
        micro_batch_size=4,
        num_microbatches=4,
        moe_grouped_gemm=args.grouped_gemm,
    )
    window = args.window_size if args.window_size == "auto" else int(args.window_size)
    results = {}
    warmup = args.warmup
    if warmup is None:
        warmup = 2 * (window if isinstance(window, int) else 8) + 2
    if warmup >= args.iterations:
        raise SystemExit(f"--iterations {args.iterations} must exceed the warm-up ({warmup})")
    modes = MODES + (BASELINE_MODES if args.baselines else ())
    baselines = dict(
        gemini=dict(interval=args.gemini_interval), moc=dict(expert_fraction=args.moc_fraction)
    )
    load_before = os.getloadavg()
    rounds: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="moevement-bench-") as tmp:
        # Modes interleaved in rounds (none, dense, moevement, ..., then again): machine drift
        # and load hit every mode alike instead of going straight into one ratio.
        for index, mode in [(i, m) for i in range(args.rounds) for m in modes]:
            moe = dict(mode=mode, window_size=window, replication_factor=args.replication_factor)
            if mode in baselines:
                moe["baseline"] = baselines[mode]
            if mode == "copy_floor":
                # The bytes this round's MoEvement run snapshotted, per rank.
                moe["floor_bytes"] = int(
                    rounds["moevement"][-1]["snapshot_bytes_per_iteration"] / layout.world_size
                )
            if args.d2h_bandwidth:
                moe["d2h_bandwidth_bytes_per_s"] = args.d2h_bandwidth
            spec = WorkerSpec(
                job="overhead",
                layout=layout.to_dict(),
                model=model,
                moevement=moe,
                iterations=args.iterations,
                log_level="WARNING",
            )
            out = Path(tmp) / f"{mode}-{index}"
            print(f"round {index + 1}/{args.rounds}: running {mode} ...", flush=True)
            run_worker_job(spec, out, timeout=1200)
            data = json.loads((out / "overhead.json").read_text())
            rows = _steady_rows(data, warmup, skip_first_touch=args.warmup is None)
            if len(rows) < 8:
                # Too few left once first-touch iterations are out: keep them (their one-time
                # cost then shows in the ratio) rather than report on a handful of iterations.
                print(
                    f"  warning: {mode} first touched host buffers so late that only {len(rows)} "
                    f"steady iterations remain; keeping those iterations (raise --iterations)",
                    flush=True,
                )
                rows = _steady_rows(data, warmup, skip_first_touch=False)
            steady = [data["iteration_times"][i] for i in rows]
            rounds[mode].append(
                dict(
                    window_size=data["window_size"],
                    median_iteration_s=statistics.median(steady),
                    mean_iteration_s=statistics.fmean(steady),
                    snapshot_bytes_per_iteration=statistics.fmean(
                        data["snapshot_bytes_per_iteration"][i] for i in rows
                    ),
                    expert_snapshot_bytes_per_iteration=statistics.fmean(
                        data["expert_snapshot_bytes_per_iteration"][i] for i in rows
                    ),
                    expert_full_state_bytes=data["expert_full_state_bytes"],
                    compute_weight_bytes=data["compute_weight_bytes"],
                    iteration_times=data["iteration_times"],
                    window_size_per_iteration=data.get("window_size_per_iteration"),
                    stages=_stage_breakdown(data, rows),
                    steady_iterations=len(rows),
                    first_touch_s=_first_touch_seconds(data),
                    probe_bandwidth_bytes_per_s=statistics.fmean(data["probe_bandwidth_per_rank"]),
                    idle_core_for_snapshots=data["idle_core_for_snapshots"],
                    host_memory_bytes=data.get("host_memory_bytes"),
                    training_state_bytes=data.get("training_state_bytes"),
                    floor_seconds_per_rank=data.get("floor_seconds_per_rank"),
                )
            )
    for mode in modes:
        per_round = rounds[mode]
        medians = [r["median_iteration_s"] for r in per_round]
        # The ratio of each round to that round's no-checkpointing run, then their median.
        ratios = [
            r["median_iteration_s"] / n["median_iteration_s"]
            for r, n in zip(per_round, rounds["none"])
        ]
        results[mode] = dict(
            per_round[0],
            median_iteration_s=statistics.median(medians),
            round_medians_s=medians,
            ratio_to_none=statistics.median(ratios),
            ratio_per_round=ratios,
            ratio_spread=(min(ratios), max(ratios)),
            iteration_times=[r["iteration_times"] for r in per_round],
            steady_iterations=[r["steady_iterations"] for r in per_round],
            window_size_per_iteration=[r["window_size_per_iteration"] for r in per_round],
            first_touch_s=statistics.median(r["first_touch_s"] for r in per_round),
            stages={
                k: {
                    w: statistics.median(r["stages"][k][w] for r in per_round)
                    for w in ("max", "mean")
                }
                for k in per_round[0]["stages"]
            },
        )
    # MoEvement against the floor of its own traffic, round by round.
    to_floor = [
        m["median_iteration_s"] / f["median_iteration_s"]
        for m, f in zip(rounds["moevement"], rounds["copy_floor"])
    ]
    results["moevement"]["ratio_to_floor"] = statistics.median(to_floor)
    results["moevement"]["ratio_to_floor_per_round"] = to_floor
    results["moevement"]["ratio_to_floor_spread"] = (min(to_floor), max(to_floor))
    none_s = results["none"]["median_iteration_s"]
    for mode in modes:
        r = results[mode]
        # The limit when no core is idle: the copy + checksum work of every rank at the probed
        # rate takes cores from training, shared by the host's cores; with an idle core it can
        # all overlap (limit 1).
        work = (
            r["snapshot_bytes_per_iteration"] / r["probe_bandwidth_bytes_per_s"]
            if (r["probe_bandwidth_bytes_per_s"])
            else 0.0
        )
        r["copy_work_s_per_iteration"] = work
        r["limit_ratio"] = (
            1.0 if r["idle_core_for_snapshots"] else 1.0 + work / (os.cpu_count() or 1) / none_s
        )
        # Share of the experts' full state snapshotted per iteration: 1/W for MoEvement's sparse
        # windows (also with grouped-GEMM experts, whose per-expert slices keep the sparsity).
        full = r["expert_full_state_bytes"]
        r["expert_share_per_iteration"] = (
            r["expert_snapshot_bytes_per_iteration"] / full if full else None
        )
    print(
        f"\nlayout {layout}, model {model}; {args.rounds} interleaved round(s), load average "
        f"{load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after ({os.cpu_count()} cores)"
    )
    print(
        f"{'mode':<10} {'W':>4} {'median it (s)':>14} {'x no-ckpt':>10} {'MB/iteration':>13} "
        f"{'expert share':>13} {'1/W':>6} {'spread (min-max x)':>19}"
    )
    for mode in modes:
        r = results[mode]
        w = "-" if r["window_size"] is None else r["window_size"]
        share = r["expert_share_per_iteration"]
        inv_w = "-" if r["window_size"] is None else f"{1 / r['window_size']:.3f}"
        print(
            f"{mode:<10} {w!s:>4} {r['median_iteration_s']:>14.4f} {r['ratio_to_none']:>10.3f} "
            f"{r['snapshot_bytes_per_iteration'] / 1e6:>13.2f} "
            f"{'-' if share is None else f'{share:.3f}':>13} {inv_w:>6} "
            f"{r['ratio_spread'][0]:>9.3f}-{r['ratio_spread'][1]:.3f}"
        )
    print(
        "\nper iteration (ms, median over rounds of the mean after warm-up; stall: what the "
        "training thread waited, slowest rank; background: per rank mean), limit x no-ckpt:"
    )
    print(
        f"{'mode':<10} {'stall':>7} {'after_step':>10} {'capture':>8} {'wait_copy':>9} "
        f"{'copy':>7} {'checksum':>8} {'replic.':>8} {'limit':>7} {'steady':>7} "
        f"{'first touch (s, once)':>21}"
    )
    for mode in modes:
        st = results[mode]["stages"]
        if not st:
            continue

        def ms(key: str, which: str = "max") -> str:
            return f"{1e3 * st[key][which]:.1f}"

        print(
            f"{mode:<10} {ms('stall'):>7} {ms('after_step'):>10} {ms('capture'):>8} "
            f"{ms('wait_for_copies'):>9} {ms('copy', 'mean'):>7} {ms('checksum', 'mean'):>8} "
            f"{ms('replication', 'mean'):>8} {results[mode]['limit_ratio']:>7.3f} "
            f"{min(results[mode]['steady_iterations']):>7} "
            f"{results[mode]['first_touch_s']:>21.3f}"
        )
    m = results["moevement"]
    print(
        f"\ncopy floor (the same bytes copied + checksummed, nothing else): "
        f"{results['copy_floor']['ratio_to_none']:.3f}x no-ckpt; MoEvement / floor "
        f"{m['ratio_to_floor']:.3f} ({m['ratio_to_floor_spread'][0]:.3f}-"
        f"{m['ratio_to_floor_spread'][1]:.3f})"
    )
    compute = results["moevement"]["compute_weight_bytes"]
    print(
        f"compute weights (all ranks, as stored: FP8 ones as data + scales): {compute / 1e6:.2f} MB"
    )
    write_results(
        args.output,
        dict(
            layout=str(layout),
            model=model,
            rounds=args.rounds,
            load_average=dict(before=load_before, after=os.getloadavg()),
            cpu_count=os.cpu_count(),
            results=results,
            host_memory_bytes={m: results[m].get("host_memory_bytes") for m in modes},
        ),
    )


def _steady_rows(data: dict, warmup: int, skip_first_touch: bool = True) -> list[int]:
    """The iterations a run's statistics read: those after ``warmup``, less (unless
    ``skip_first_touch`` is off) every iteration that first touched a new host buffer and the one
    after it (its copy finishes in the background). A first touch is a one-time cost per buffer
    (an ``auto`` window that grows adds a slot, popularity reordering grows one), reported apart
    as ``first_touch_s``, not the steady overhead."""
    touched: set[int] = set()
    if skip_first_touch:
        for rank in data.get("stage_seconds_per_rank") or []:
            for i, seconds in enumerate(rank.get("first_touch", [])):
                if seconds > 0:
                    touched.update((i, i + 1))
    return [i for i in range(warmup, len(data["iteration_times"])) if i not in touched]


def _first_touch_seconds(data: dict) -> float:
    """The whole run's first-touch copy seconds, slowest rank (the one-time cost of its
    buffers)."""
    per_rank = data.get("stage_seconds_per_rank") or []
    return max((sum(r.get("first_touch", [])) for r in per_rank), default=0.0)


def _stage_breakdown(data: dict, rows: list[int]) -> dict:
    """Per stage, seconds per iteration over the steady ``rows``: the slowest rank's mean
    (``max``) and the mean over ranks (``mean``); ``stall`` = after_step + wait_for_copies."""
    per_rank = data.get("stage_seconds_per_rank") or []
    if not per_rank or not per_rank[0]:
        return {}
    stages = list(per_rank[0]) + ["stall"]
    means: dict[str, list[float]] = {k: [] for k in stages}
    for rank in per_rank:
        rank = dict(
            rank, stall=[a + b for a, b in zip(rank["after_step"], rank["wait_for_copies"])]
        )
        for k in stages:
            steady = [rank[k][i] for i in rows if i < len(rank[k])]
            means[k].append(statistics.fmean(steady) if steady else 0.0)
    return {k: dict(max=max(v), mean=statistics.fmean(v)) for k, v in means.items()}


if __name__ == "__main__":
    main()
