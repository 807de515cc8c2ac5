"""Markdown and PNG rendering of the benchmark results (used by ``benchmarks/report.py``).

Every section reads one benchmark's JSON and returns Markdown; plots are written next to the
report when matplotlib is installed (``pip install -e ".[sim]"``) and skipped with a note
otherwise. A benchmark whose JSON is missing gets a one-line note instead of its section.
"""

from __future__ import annotations

import datetime
import json
import subprocess
from pathlib import Path
from typing import Callable, Optional

MISSING = "_not run (no `{name}`)_\n"


def _load(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.exists() else None


def _table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


class Plotter:
    """Saves bar/line/scatter charts as PNG in ``folder`` (no-op without matplotlib)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            self.plt = plt
        except ImportError:
            self.plt = None

    @property
    def available(self) -> bool:
        return self.plt is not None

    def save(self, name: str, draw: Callable) -> str:
        """Draws with ``draw(ax)`` and returns a Markdown image link ('' without matplotlib)."""
        if self.plt is None:
            return ""
        self.folder.mkdir(parents=True, exist_ok=True)
        fig, ax = self.plt.subplots(figsize=(6.4, 3.6))
        draw(ax)
        fig.tight_layout()
        fig.savefig(self.folder / f"{name}.png", dpi=110)
        self.plt.close(fig)
        return f"\n![{name}]({self.folder.name}/{name}.png)\n"


def _share(result: dict) -> str:
    """Share of the experts' full state snapshotted per iteration, next to 1/W."""
    share = result.get("expert_share_per_iteration")
    if share is None:
        return "-"
    return f"{share:.3f} (1/W = {1 / result['window_size']:.3f})"


def overhead_grouped_section(data: Optional[dict], plot: Plotter) -> str:
    if data is None:
        return MISSING.format(name="snapshot_overhead_grouped.json")
    return "Grouped-GEMM experts (`GroupedMLP`, per-expert slices of the stacked weights). " + (
        overhead_section(data, plot, name="overhead_grouped")
    )


def overhead_section(data: Optional[dict], plot: Plotter, name: str = "overhead") -> str:
    if data is None:
        return MISSING.format(name="snapshot_overhead.json")
    res = data["results"]
    rows = [
        [
            mode,
            r["window_size"] if r["window_size"] is not None else "-",
            f"{r['median_iteration_s']:.3f}",
            f"{r['ratio_to_none']:.3f}"
            + (
                f" ({r['ratio_spread'][0]:.3f}-{r['ratio_spread'][1]:.3f})"
                if "ratio_spread" in r
                else ""
            ),
            f"{r['snapshot_bytes_per_iteration'] / 1e6:.2f}",
            _share(r),
        ]
        for mode, r in res.items()
    ]
    load = data.get("load_average")
    text = (
        f"Layout {data['layout']}, model {data['model']}. Median over steady iterations (the "
        "warm-up, each iteration that first touched a new host buffer and the one after it left "
        "out); bytes summed over ranks."
        + (
            f" {data['rounds']} interleaved rounds; load average {load['before'][0]:.2f} before, "
            f"{load['after'][0]:.2f} after, {data['cpu_count']} cores."
            if load
            else ""
        )
        + "\n\n"
    )
    text += _table(
        [
            "mode",
            "W",
            "median iteration (s)",
            "x no checkpointing (spread over rounds)",
            "MB snapshotted / iteration",
            "expert share / iteration",
        ],
        rows,
    )

    staged = [(m, r) for m, r in res.items() if r.get("stages")]
    if staged:
        text += (
            "\nWhere the time goes, per iteration (ms): the training thread's stall (slowest "
            "rank) and the background stages (mean over ranks); the limit is the ratio the copy "
            "and checksum work alone would impose at the probed bandwidth when no core is idle "
            "(1.000 where one is).\n\n"
        )
        text += _table(
            [
                "mode",
                "stall",
                "capture",
                "wait for copies",
                "copy",
                "checksum",
                "replication",
                "first touch (s, once)",
                "limit x no checkpointing",
            ],
            [
                [
                    m,
                    f"{1e3 * r['stages']['stall']['max']:.1f}",
                    f"{1e3 * r['stages']['capture']['max']:.1f}",
                    f"{1e3 * r['stages']['wait_for_copies']['max']:.1f}",
                    f"{1e3 * r['stages']['copy']['mean']:.1f}",
                    f"{1e3 * r['stages']['checksum']['mean']:.1f}",
                    f"{1e3 * r['stages']['replication']['mean']:.1f}",
                    f"{r.get('first_touch_s', 0.0):.2f}",
                    f"{r['limit_ratio']:.3f}",
                ]
                for m, r in staged
            ],
        )

    moe, floor = res.get("moevement", {}), res.get("copy_floor")
    if floor is not None and "ratio_to_floor" in moe:
        lo, hi = moe["ratio_to_floor_spread"]
        text += (
            f"\nMeasured floor (`copy_floor`: the same bytes per rank copied and checksummed on a "
            f"background thread, no strategy): **{floor['ratio_to_none']:.3f}x** no "
            f"checkpointing; MoEvement / floor **{moe['ratio_to_floor']:.3f}** ({lo:.3f}-{hi:.3f} "
            "over rounds). The floor is what that much memory traffic costs training on this "
            "host (replication not included).\n"
        )

    def draw(ax):
        modes = list(res)
        ax.bar(modes, [res[m]["ratio_to_none"] for m in modes], color="tab:blue")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_ylabel("iteration time / no checkpointing")
        ax2 = ax.twinx()
        ax2.plot(
            modes,
            [res[m]["snapshot_bytes_per_iteration"] / 1e6 for m in modes],
            "o-",
            color="tab:red",
        )
        ax2.set_ylabel("MB snapshotted / iteration", color="tab:red")

    return text + plot.save(name, draw)


def replay_section(data: Optional[dict], plot: Plotter) -> str:
    if data is None:
        return MISSING.format(name="replay_cost.json")
    rows = [
        [
            r["iteration"],
            f"{r['frozen_operators']}/{r['operators']}",
            f"{r['seconds']:.4f}",
            f"{r['ratio_to_all_active_replay']:.3f}",
            f"{r['ratio_to_normal']:.3f}",
        ]
        for r in data["replay"]
    ]
    text = (
        f"Layout {data['layout']}, W={data['window_size']}; normal iteration "
        f"{data['normal_iteration_s']:.4f} s, all-active replay iteration "
        f"{data['all_active_replay_s']:.4f} s.\n\n"
    )
    text += _table(
        [
            "replayed iteration",
            "frozen operators",
            "seconds",
            "x all-active replay",
            "x normal iteration",
        ],
        rows,
    )

    def draw(ax):
        frac = [r["frozen_operators"] / r["operators"] for r in data["replay"]]
        ax.plot(frac, [r["ratio_to_all_active_replay"] for r in data["replay"]], "o")
        ax.set_xlabel("fraction of operators frozen")
        ax.set_ylabel("replay time / all-active replay")

    return text + plot.save("replay_cost", draw)


def recovery_section(data: Optional[dict], plot: Plotter, name: str = "recovery_time") -> str:
    if data is None:
        return MISSING.format(name="recovery_time.json")
    res = data["results"]
    rows = [
        [
            mode,
            ",".join(map(str, r.get("scope_ranks", []))) or "all",
            f"{r['recovery_s']:.2f}",
            f"{r['ratio_to_scoped']:.2f}",
            r["microbatches_recomputed"],
        ]
        for mode, r in res.items()
    ]
    text = f"Layout {data['layout']}, fault {data['fault']}."
    if "scoped_to_global_per_round" in data:
        text += (
            f" {data['rounds']} interleaved rounds, the median run of each mode shown; scoped / "
            "global per round: "
            + ", ".join(f"{r:.2f}" for r in data["scoped_to_global_per_round"])
            + "."
        )
    text += "\n\n" + _table(
        ["mode", "ranks rolled back", "recovery (s)", "x scoped", "microbatches recomputed"], rows
    )
    phased = [(m, r) for m, r in res.items() if "detect" in r.get("phases_s", {})]
    if phased:
        text += "\nPhases (s, slowest rank):\n\n" + _table(
            ["mode", "detect", "rebuild", "fetch", "replay"],
            [
                [m] + [f"{r['phases_s'][k]:.3f}" for k in ("detect", "rebuild", "fetch", "replay")]
                for m, r in phased
            ],
        )
    stepped = [(m, r) for m, r in res.items() if r.get("rebuild_steps_s")]
    if stepped:
        steps = list(stepped[0][1]["rebuild_steps_s"])
        text += "\nRebuild steps (s, the rank with the slowest rebuild):\n\n" + _table(
            ["mode"] + steps,
            [[m] + [f"{r['rebuild_steps_s'].get(k, 0.0):.3f}" for k in steps] for m, r in stepped],
        )
    timed = [(m, r) for m, r in res.items() if r.get("replay_iteration_s")]
    if timed:
        text += "\nEach replayed iteration (s, slowest rank in scope):\n\n" + "\n".join(
            f"- {m}: " + ", ".join(f"{t:.3f}" for t in r["replay_iteration_s"]) for m, r in timed
        )
        text += (
            f"\n\nscoped / global: whole recovery {data['scoped_to_global']:.2f}, replay phase "
            f"{data['replay_scoped_to_global']:.2f}, last replayed iteration "
            f"{data['last_replayed_iteration_scoped_to_global']:.2f}.\n"
            if "replay_scoped_to_global" in data
            else "\n"
        )

    def draw(ax):
        ax.bar(list(res), [r["ratio_to_scoped"] for r in res.values()], color="tab:green")
        ax.set_ylabel("recovery time / scoped recovery")

    return text + plot.save(name, draw)


def megatron_lm_recovery_section(data: Optional[dict], plot: Plotter) -> str:
    if data is None:
        return MISSING.format(name="megatron_lm_recovery.json")
    res = data["results"]
    phases = ("detect", "rebuild", "fetch", "replay")
    text = (
        f"{data['layout']}, fault {data['fault']}, one spare. {data['rounds']} interleaved rounds, "
        "the median run of each mode shown (phases on the slowest rank; rebuild = the second "
        "`pretrain()` up to the strategy, replay = data iterators + replayed iterations).\n\n"
    )
    text += _table(
        ["spare", "recovery (s)", *phases, "slowest replayed iteration (s)", "per round (s)"],
        [
            [
                mode,
                f"{r['recovery_s']:.2f}",
                *(f"{r['phases_s'][k]:.3f}" for k in phases),
                f"{r['replay_iteration_s']:.3f}",
                ", ".join(f"{t:.2f}" for t in r["recovery_s_per_round"]),
            ]
            for mode, r in res.items()
        ],
    )
    text += (
        f"\nwarm / cold: whole recovery {data['warm_to_cold']:.2f} (rounds "
        + ", ".join(f"{r:.2f}" for r in data["warm_to_cold_per_round"])
        + f"), rebuild {data['rebuild_warm_to_cold']:.2f}.\n"
    )

    def draw(ax):
        bottom = [0.0] * len(res)
        for k in phases:
            values = [r["phases_s"][k] for r in res.values()]
            ax.bar(list(res), values, bottom=bottom, label=k)
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.set_ylabel("seconds (slowest rank)")
        ax.legend()

    return text + plot.save("megatron_lm_recovery", draw)


def baselines_section(data: Optional[dict], plot: Plotter) -> str:
    if data is None:
        return MISSING.format(name="baselines.json")
    res = data["results"]
    rows = []
    for name, r in res.items():
        s = r["stats"]
        rows.append(
            [
                name,
                (
                    "yes"
                    if r["comparison"]["bitwise_equal"]
                    else f"no ({sum(r['comparison']['differing'].values())} tensors differ)"
                ),
                r["scope"],
                len(r["iterations_recomputed"]),
                r["microbatches_recomputed"],
                f"{r['recovery_s']:.2f}",
                f"{r['bytes_per_iteration_all_ranks'] / 1e6:.2f}",
                s.get("lost_tokens", 0),
                f"{100 * s.get('proportion_lost_tokens', 0.0):.2f}%",
            ]
        )
    moc = res.get("moc", {}).get("stats", {})
    text = (
        f"Layout {data['layout']}, {data['iterations']} iterations, one real SIGKILL "
        f"({data['fault']}); strategies {json.dumps(data['setups'])}.\n\n"
    )
    text += _table(
        [
            "strategy",
            "bitwise equal to fault-free",
            "scope",
            "iterations recomputed",
            "microbatches",
            "recovery (s)",
            "MB snapshotted / iteration",
            "lost tokens",
            "PLT",
        ],
        rows,
    )
    if moc:
        text += (
            f"\nMoC: {moc['groups']} expert groups; lost {moc['lost_tokens']} of "
            f"{moc['total_tokens']} token-to-expert assignments (PLT "
            f"{100 * moc['proportion_lost_tokens']:.2f}%). The simulator's MoC model "
            f"expects {100 * moc['simulator_expected_plt_one_failure']:.2f}% for one "
            "failure in this run (uniform routing).\n"
        )

    def draw(ax):
        names = list(res)
        ax.bar(names, [res[n]["recovery_s"] for n in names], color="tab:purple")
        ax.set_ylabel("recovery (s)")

    return text + plot.save("baselines", draw)


def table3_section(data: Optional[dict], plot: Plotter) -> str:
    if data is None:
        return MISSING.format(name="sim_table3.json")
    summary = data["summary"]
    rows = []
    for column in ("fed", "model"):
        for name, s in [
            ("all", summary[column]["overall"]),
            *summary[column]["per_strategy"].items(),
        ]:
            rows.append(
                [column, name, f"{s['max_abs']:.3f}", f"{s['mean_abs']:.3f}", f"{s['mean']:+.3f}"]
            )
    text = (
        "Deviation = simulator - paper, in ETTR points; *fed*: the simulator's formula on the "
        "row's published overhead and recovery; *model*: the simulator end to end on the "
        "preset (`docs/simulator.md` §5).\n\n"
    )
    text += _table(["column", "strategy", "max |dev|", "mean |dev|", "mean dev"], rows)
    by_mtbf: dict = {}
    for r in data["rows"]:
        key = (r["paper"]["config"], r["paper"]["mtbf_label"])
        by_mtbf.setdefault(key, {})[r["paper"]["strategy"]] = (r["paper"]["ettr"], r["model_ettr"])
    order = ["checkfreq", "gemini", "moc", "moevement"]
    rows = [
        [cfg, mtbf]
        + [f"{v[s][0]:.3f} / {v[s][1]:.3f}" for s in order]
        + ["yes" if max(v, key=lambda s: v[s][1]) == "moevement" else "no"]
        for (cfg, mtbf), v in by_mtbf.items()
    ]
    text += "\nPer row, paper / simulator (model) ETTR, and whether MoEvement ranks first:\n\n"
    text += _table(["model", "MTBF", *order, "MoEvement first (sim)"], rows)
    ranking = data.get("ranking_summary")
    if ranking:
        from megatron_moevement.sim.paper_compare import ranking_lines

        text += (
            "\nRanking (a paper tie may come in either order; where *fed* disagrees, the paper's "
            "printed ETTR contradicts its own overhead and recovery columns, `docs/simulator.md` "
            "§7):\n\n" + "\n".join(ranking_lines(ranking, bullet="* ")) + "\n"
        )

    def draw(ax):
        for s, color in zip(order, ("tab:blue", "tab:orange", "tab:red", "tab:green")):
            pts = [
                (r["paper"]["ettr"], r["model_ettr"])
                for r in data["rows"]
                if r["paper"]["strategy"] == s
            ]
            ax.scatter(*zip(*pts), s=14, label=s, color=color)
        ax.plot([0, 1], [0, 1], color="black", lw=0.8)
        ax.set_xlabel("paper ETTR")
        ax.set_ylabel("simulator ETTR (model)")
        ax.legend(fontsize=7)

    return text + plot.save("table3", draw)


def scaling_section(data: Optional[dict], plot: Plotter) -> str:
    if data is None:
        return MISSING.format(name="sim_scaling.json")
    rows = []
    for run in data["runs"]:
        for e in run["result"]["evaluations"]:
            rows.append(
                [
                    run["preset"],
                    e["strategy"],
                    f"{e['mtbf_s'] / 60:.0f} min",
                    f"{e['ettr']:.3f}",
                    "-" if e.get("ettr_mc") is None else f"{e['ettr_mc']:.3f}",
                    f"{run['simulation_s']:.2f}",
                ]
            )
    return _table(
        ["preset", "strategy", "MTBF", "ETTR", "ETTR (Monte-Carlo)", "simulation (s)"], rows
    )


def cost_scaling_section(data: Optional[dict], plot: Plotter) -> str:
    if data is None:
        return MISSING.format(name="scaling.json")
    rows = []
    for axis, points in data["sweeps"].items():
        for r in points:
            rows.append(
                [
                    axis,
                    r["point"][axis],
                    r["processes"],
                    f"{r['ratio_to_none']:.3f}",
                    f"{r['snapshot_bytes_per_iteration'] / 1e6:.2f}",
                    f"{r['host_memory_bytes']['total'] / 2**20:.2f}",
                    f"{r['training_state_bytes'] / 2**20:.2f}",
                    f"{r['host_to_state']:.2f}",
                ]
            )
    text = (
        f"One axis at a time from {data['base']}; {data['cpu_count']} cores, "
        f"{data['rounds']} round(s) per point.\n\n"
    )
    return text + _table(
        [
            "axis",
            "value",
            "processes",
            "x no checkpointing",
            "MB snapshotted / iteration",
            "host MiB held",
            "training state MiB",
            "host / state",
        ],
        rows,
    )


def ettr_section(data: Optional[dict], plot: Plotter) -> str:
    if data is None:
        return MISSING.format(name="ettr_real_vs_sim.json")
    rows = []
    for i, trial in enumerate(data["trials"]):
        for name, r in trial["runs"].items():
            real, sim = r["real"], r["sim"]
            rows.append(
                [
                    i,
                    name,
                    f"{real['iteration_s']:.3f}",
                    f"{trial['iteration_s']:.3f}",
                    f"{sim['iteration_s']:.3f}",
                    f"{real['wall_s']:.2f}",
                    ", ".join(f"{x:.2f}" for x in real["lost_per_failure_s"]) or "-",
                    ", ".join(f"{x:.2f}" for x in sim["recovery_s_per_failure"]) or "-",
                    f"{real['ettr']:.3f}",
                    f"{real['ettr_strict']:.3f}",
                    f"{sim['ettr']:.3f}",
                    f"{100 * r['relative_difference']:+.1f}%",
                    "yes" if r["agree"] else "**no**",
                ]
            )
    text = (
        f"Layout {data['layout']}, W={data['window_size']}, {data['iterations']} iterations "
        f"(first {data['warmup']} excluded), real SIGKILLs {data['faults']}, scoped "
        f"recovery. ETTR = iterations x T / wall. *T run*: fault-free iteration time measured "
        "in the run itself (between commits no failure interrupted); *T profile*: the "
        "profiler's separate fault-free, checkpoint-free run (ETTR *strict* uses it); "
        "*T sim*: the simulator's 1F1B iteration from the profiled stage times. *Lost*: wall "
        "time a failure cost (its interrupted commit gap minus one iteration); *sim "
        "recovery*: the simulator's recovery time for the same failure.\n\n"
    )
    text += _table(
        [
            "trial",
            "run",
            "T run",
            "T profile",
            "T sim",
            "wall (s)",
            "lost (s)",
            "sim recovery (s)",
            "ETTR real",
            "ETTR real (strict)",
            "ETTR sim",
            "sim - real",
            f"within {100 * data['tolerance']:.0f}%",
        ],
        rows,
    )
    for name, s in data["summary"].items():
        text += (
            f"\n{name}: median difference {100 * s['median_relative_difference']:+.1f}%, "
            f"max |difference| {100 * s['max_abs_relative_difference']:.1f}%, all within "
            f"tolerance: {'yes' if s['all_agree'] else 'no'}.\n"
        )

    def draw(ax):
        labels, bars = [], {"measured": [], "measured, profiler T": [], "simulated": []}
        for i, trial in enumerate(data["trials"]):
            for name, r in trial["runs"].items():
                labels.append(f"{i}:{name}")
                bars["measured"].append(r["real"]["ettr"])
                bars["measured, profiler T"].append(r["real"]["ettr_strict"])
                bars["simulated"].append(r["sim"]["ettr"])
        for k, (label, values) in enumerate(bars.items()):
            ax.bar(
                [i + 0.27 * (k - 1) for i in range(len(labels))], values, width=0.27, label=label
            )
        ax.set_xticks(list(range(len(labels))), labels, fontsize=7)
        ax.set_ylabel("ETTR")
        ax.legend(fontsize=7)

    return text + plot.save("ettr_real_vs_sim", draw)


SECTIONS = [
    ("Snapshot overhead", "snapshot_overhead.json", overhead_section),
    (
        "Snapshot overhead, grouped-GEMM experts",
        "snapshot_overhead_grouped.json",
        overhead_grouped_section,
    ),
    (
        "Snapshot overhead, PP2 x DP2 x EP2 on 2 cores (no idle core)",
        "snapshot_overhead_pp2.json",
        lambda data, plot: overhead_section(data, plot, "overhead_pp2"),
    ),
    ("How the costs scale", "scaling.json", cost_scaling_section),
    ("Sparse-to-dense replay cost", "replay_cost.json", replay_section),
    ("Recovery time", "recovery_time.json", recovery_section),
    (
        "Recovery time, PP4",
        "recovery_time_pp4.json",
        lambda data, plot: recovery_section(data, plot, "recovery_time_pp4"),
    ),
    (
        "Recovery in Megatron-LM's pretrain_gpt.py: warm vs cold spare",
        "megatron_lm_recovery.json",
        megatron_lm_recovery_section,
    ),
    ("Baselines under a real failure", "baselines.json", baselines_section),
    ("Measured vs simulated ETTR", "ettr_real_vs_sim.json", ettr_section),
    ("Simulator vs the paper's Table 3", "sim_table3.json", table3_section),
    ("Simulator scaling (§5.4)", "sim_scaling.json", scaling_section),
]
"""Report sections in order: title, JSON file, renderer."""


def _written_at(path: Path) -> str:
    """When a result file's numbers were measured, to the minute.

    The ``written_at`` stamp the benchmark put in the JSON when there is one; else the time of
    the last commit that touched the file; else its mtime (which, after a fresh checkout, is only
    the checkout time).
    """
    try:
        stamp = json.loads(path.read_text(encoding="utf-8")).get("written_at")
    except (OSError, ValueError, AttributeError):
        stamp = None
    if isinstance(stamp, str) and stamp:
        return stamp[:16]
    try:
        committed = subprocess.run(
            [
                "git",
                "log",
                "-1",
                "--format=%cd",
                "--date=format-local:%Y-%m-%dT%H:%M",
                "--",
                path.name,
            ],
            cwd=path.parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        committed = ""
    if committed:
        return f"{committed} (last commit)"
    return datetime.datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="minutes")


def render_report(results: Path, header: str) -> str:
    """The whole Markdown report from the JSON files in ``results`` (plots in
    ``results/plots``)."""
    plot = Plotter(results / "plots")
    parts = [header]
    if not plot.available:
        parts.append('_matplotlib is not installed: no plots (`pip install -e ".[sim]"`)._\n')
    for title, name, render in SECTIONS:
        parts.append(f"\n## {title}\n\n")
        path = results / name
        if path.exists():
            parts.append(f"_`{name}`, written {_written_at(path)}._\n\n")
        parts.append(render(_load(path), plot))
    return "".join(parts)
