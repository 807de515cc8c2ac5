"""One command for every benchmark and a Markdown report with tables and plots.

Runs, one after the other (each writes its JSON into the results folder, output streamed with a
prefix so long runs show progress):

* ``snapshot_overhead.py --layout single --baselines`` — no checkpointing / dense / MoEvement /
  Gemini / MoC on one rank (a core left idle for the snapshot threads),
* ``snapshot_overhead.py --layout pp2xdp2xep2`` — the same modes with no idle core,
* ``snapshot_overhead.py --grouped-gemm`` — the same with grouped-GEMM experts (expert share),
* ``replay_cost.py`` — replayed iterations with frozen operators,
* ``recovery_time.py`` (PP2 x DP2 x EP2, and ``--layout pp4``) — scoped vs global rollback vs
  full restart,
* ``megatron_lm_recovery.py`` — recovery inside Megatron-LM's ``pretrain_gpt.py``, warm vs cold
  spare,
* ``baselines.py`` — MoEvement, Gemini-like and MoC-like under the same real SIGKILL,
* ``ettr_real_vs_sim.py`` — measured vs simulated ETTR with real SIGKILLs,
* ``sim_paper_table3.py`` and ``sim_scaling.py`` — the simulator against the paper,

then writes ``results/report.md`` (plots in ``results/plots/``, matplotlib needed for them).
``--quick`` shrinks models, iterations and repeats (a few minutes on 2 cores instead of about
half an hour); ``--only``/``--skip`` select benchmarks, ``--render-only`` rebuilds the report from
existing JSON.

    python benchmarks/report.py --quick
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report_md import render_report  # noqa: E402  (benchmarks/ is not a package)

# name: (script, output JSON, full-mode arguments, quick-mode arguments)
BENCHMARKS = {
    "overhead": (
        "snapshot_overhead.py",
        "snapshot_overhead.json",
        ["--layout", "single", "--baselines"],
        [
            "--layout",
            "single",
            "--baselines",
            "--iterations",
            "16",
            "--window-size",
            "3",
            "--hidden-size",
            "128",
            "--ffn-hidden-size",
            "512",
        ],
    ),
    "overhead_grouped": (
        "snapshot_overhead.py",
        "snapshot_overhead_grouped.json",
        ["--grouped-gemm"],
        [
            "--grouped-gemm",
            "--iterations",
            "16",
            "--window-size",
            "3",
            "--hidden-size",
            "128",
            "--ffn-hidden-size",
            "512",
        ],
    ),
    "overhead_pp2": (
        "snapshot_overhead.py",
        "snapshot_overhead_pp2.json",
        ["--layout", "pp2xdp2xep2"],
        ["--layout", "pp2xdp2xep2", "--iterations", "16", "--rounds", "2"],
    ),
    "replay": (
        "replay_cost.py",
        "replay_cost.json",
        [],
        # The default model, one repeat (hidden 128 / W=4 hangs in a replayed EP all-to-all).
        ["--repeats", "1"],
    ),
    "recovery": ("recovery_time.py", "recovery_time.json", [], []),
    "recovery_pp4": (
        "recovery_time.py",
        "recovery_time_pp4.json",
        ["--layout", "pp4"],
        ["--layout", "pp4"],
    ),
    "megatron_lm_recovery": (
        "megatron_lm_recovery.py",
        "megatron_lm_recovery.json",
        ["--rounds", "3"],
        ["--rounds", "1"],
    ),
    "baselines": (
        "baselines.py",
        "baselines.json",
        [],
        ["--iterations", "12", "--kill-iteration", "8"],
    ),
    "ettr": (
        "ettr_real_vs_sim.py",
        "ettr_real_vs_sim.json",
        ["--repeats", "3", "--control"],
        ["--repeats", "1"],
    ),
    "table3": ("sim_paper_table3.py", "sim_table3.json", [], []),
    "scaling": ("sim_scaling.py", "sim_scaling.json", ["--all"], ["--trials", "20"]),
}


def _run(name: str, args: list[str], results: Path, index: int, total: int) -> bool:
    script, output, _, _ = BENCHMARKS[name]
    cmd = [sys.executable, str(HERE / script), "--output", str(results / output), *args]
    print(f"\n[{index}/{total}] {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE.parent
    )
    for line in proc.stdout:
        print(f"  {name} | {line.rstrip()}", flush=True)
    code = proc.wait()
    status = "done" if code == 0 else f"FAILED (exit {code})"
    print(f"[{index}/{total}] {name} {status} in {time.perf_counter() - start:.0f} s", flush=True)
    return code == 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small runs (a few minutes)")
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--only", default="", help=f"comma-separated subset of {list(BENCHMARKS)}")
    parser.add_argument("--skip", default="", help="comma-separated benchmarks to skip")
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="only rebuild report.md from the JSON already in --results",
    )
    parser.add_argument(
        "--wait-for-quiet",
        type=float,
        default=None,
        metavar="LOAD",
        help="passed to the ETTR benchmark: wait for the load average to drop",
    )
    args = parser.parse_args()
    results = args.results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    names = [n for n in (args.only.split(",") if args.only else BENCHMARKS) if n]
    unknown = [n for n in names + [s for s in args.skip.split(",") if s] if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    names = [n for n in names if n not in args.skip.split(",")]
    failed = []
    start = time.perf_counter()
    if not args.render_only:
        for i, name in enumerate(names, start=1):
            extra = list(BENCHMARKS[name][3 if args.quick else 2])
            if name == "ettr" and args.wait_for_quiet is not None:
                extra += ["--wait-for-quiet", str(args.wait_for_quiet)]
            if not _run(name, extra, results, i, len(names)):
                failed.append(name)
    header = (
        "# megatron-moevement benchmark report\n\n"
        f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} by "
        f"`python benchmarks/report.py{' --quick' if args.quick else ''}"
        f"{' --render-only' if args.render_only else ''}` on {platform.node()} "
        f"({os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f} at the end). Timings on a shared CPU machine "
        "vary by 10-30% between runs; rerun for your numbers.\n"
    )
    if failed:
        header += f"\n**Failed benchmarks:** {', '.join(failed)} (their sections may be stale).\n"
    report = results / "report.md"
    report.write_text(render_report(results, header))
    print(f"\nwrote {report} ({time.perf_counter() - start:.0f} s)")
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
