"""The ETTR simulator's command line: ``moevement-sim`` or ``python -m megatron_moevement.sim.cli``.

Subcommands::

    moevement-sim run --preset deepseek-moe --mtbf 2h,1h,30m,20m,10m --out results/sim
    moevement-sim run --spec my_job.json --monte-carlo --trials 500
    moevement-sim paper-table3 [--out results/sim_table3.json] [--no-model]
    moevement-sim paper-table7 [--out results/sim_table7.json]
    moevement-sim trace --preset deepseek-moe --failures 600,1500,4000 --horizon 6h
    moevement-sim presets
    moevement-sim profile-schema

``run`` is the default: ``moevement-sim --preset gpt-moe`` works too. ``--set key=value``
overrides any :class:`~megatron_moevement.sim.config.SimulationConfig` field (values are parsed
as JSON when possible, e.g. ``--set restart_s=20 --set localized_recovery=false``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from megatron_moevement.argtypes import NON_NEGATIVE_INT, POSITIVE_INT
from megatron_moevement.logging_utils import configure_logging, get_logger
from megatron_moevement.sim._validation import SimSpecError
from megatron_moevement.sim.config import ETTR_MODELS, STRATEGY_NAMES, SimulationConfig
from megatron_moevement.sim.paper_compare import compare_with_paper, format_comparison
from megatron_moevement.sim.presets import PAPER_PRESETS, PRESETS, get_preset
from megatron_moevement.sim.profile import PROFILE_JSON_SCHEMA
from megatron_moevement.sim.report import format_table, write_json, write_plot
from megatron_moevement.sim.scenario import Scenario, load_scenario_file
from megatron_moevement.sim.simulator import SimulationResult, Simulator
from megatron_moevement.sim.units import parse_duration

__all__ = ["build_parser", "main"]

logger = get_logger(__name__)

DEFAULT_MTBFS = "2h,1h,30m,20m,10m"
"""MTBFs swept when ``--mtbf`` is not given (the paper's Table 3)."""

_SUBCOMMANDS = ("run", "paper-table3", "paper-table7", "trace", "presets", "profile-schema")


def _parse_overrides(pairs: Sequence[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise SimSpecError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _config(args: argparse.Namespace, base: Optional[SimulationConfig] = None) -> SimulationConfig:
    values = (base or SimulationConfig()).to_dict()
    values.update(_parse_overrides(getattr(args, "set", None) or []))
    for name in ("seed", "trials", "ettr_model", "horizon"):
        value = getattr(args, name, None)
        if value is None:
            continue
        if name == "trials":
            values["mc_trials"] = value
        elif name == "horizon":
            values["horizon_s"] = parse_duration(value)
        else:
            values[name] = value
    return SimulationConfig.from_dict(values)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a SimulationConfig field (repeatable)",
    )
    parser.add_argument("--seed", type=NON_NEGATIVE_INT, help="Monte-Carlo seed")
    parser.add_argument("--horizon", help="run length, e.g. 12h (default 12h)")
    parser.add_argument("--ettr-model", choices=ETTR_MODELS, help="analytic ETTR form")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="moevement-sim",
        description="ETTR simulator for CheckFreq-, Gemini-, MoC- and MoEvement-style "
        "checkpointing of MoE training (MoEvement paper §2.4, Appendix C).",
    )
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="simulate presets or JSON specs over MTBFs")
    run.add_argument(
        "--preset",
        action="append",
        default=[],
        help=f"preset name (repeatable; 'paper' = the four Table 2 models); one of {list(PRESETS)}",
    )
    run.add_argument("--spec", action="append", default=[], help="JSON spec file (repeatable)")
    run.add_argument("--mtbf", default=DEFAULT_MTBFS, help=f"MTBFs (default {DEFAULT_MTBFS})")
    run.add_argument(
        "--strategies", default=",".join(STRATEGY_NAMES), help="comma-separated strategies"
    )
    run.add_argument("--out", default="results/sim", help="output directory for JSON and PNG")
    run.add_argument("--monte-carlo", action="store_true", help="also run seeded Monte-Carlo")
    run.add_argument("--trials", type=POSITIVE_INT, help="Monte-Carlo runs per point (default 200)")
    run.add_argument("--no-plot", action="store_true", help="skip the PNG")
    _add_common(run)

    for table in ("3", "7"):
        paper = sub.add_parser(
            f"paper-table{table}",
            help=f"compare the simulator with the paper's Table {table}",
        )
        paper.add_argument(
            "--out", default=f"results/sim_table{table}.json", help="JSON output path"
        )
        paper.add_argument(
            "--no-model", action="store_true", help="only the fed (published-input) column"
        )
        _add_common(paper)

    trace = sub.add_parser("trace", help="replay a failure trace")
    trace.add_argument("--preset", help="preset name")
    trace.add_argument("--spec", help="JSON spec file")
    group = trace.add_mutually_exclusive_group(required=True)
    group.add_argument("--failures", help="comma-separated failure times (e.g. 600,25m,1h)")
    group.add_argument(
        "--failures-file", help="file with one failure time per line, or a JSON list"
    )
    trace.add_argument("--out", help="JSON output path")
    _add_common(trace)

    presets = sub.add_parser("presets", help="list the presets")
    _add_common(presets)
    schema = sub.add_parser("profile-schema", help="print the stage-profile JSON schema")
    _add_common(schema)
    return parser


def _load_scenarios(presets: Sequence[str], specs: Sequence[str]) -> List[tuple]:
    loaded: List[tuple] = []
    names: List[str] = []
    for name in presets:
        names.extend(PAPER_PRESETS if name == "paper" else [name])
    for name in names:
        loaded.append((get_preset(name), None))
    for spec in specs:
        loaded.append(load_scenario_file(spec))
    if not loaded:
        raise SimSpecError("give at least one --preset or --spec (see `moevement-sim presets`)")
    return loaded


def _cmd_run(args: argparse.Namespace) -> int:
    mtbfs = [parse_duration(x) for x in args.mtbf.split(",") if x.strip()]
    strategies = [s.strip().lower() for s in args.strategies.split(",") if s.strip()]
    unknown = sorted(set(strategies) - set(STRATEGY_NAMES))
    if unknown:
        raise SimSpecError(f"unknown strategies {unknown}; known: {list(STRATEGY_NAMES)}")
    results: List[SimulationResult] = []
    for scenario, spec_config in _load_scenarios(args.preset, args.spec):
        config = _config(args, spec_config)
        logger.info("simulating %s over %d MTBFs", scenario.name, len(mtbfs))
        result = Simulator(scenario, config).sweep(mtbfs, strategies, args.monte_carlo)
        logger.info("%s done in %.2fs", scenario.name, result.elapsed_s)
        print(format_table(result))
        results.append(result)
    out = Path(args.out)
    write_json({"results": [r.to_dict() for r in results]}, out / "ettr.json")
    print(f"JSON: {out / 'ettr.json'}")
    if not args.no_plot:
        plot = write_plot(results, out / "ettr_vs_mtbf.png")
        if plot is None:
            print("PNG: not written (matplotlib is not installed; pip install matplotlib)")
        else:
            print(f"PNG: {plot}")
    return 0


def _cmd_paper(args: argparse.Namespace, table: str) -> int:
    config = _config(args, SimulationConfig())
    comparison = compare_with_paper(table, include_model=not args.no_model, config=config)
    print(format_comparison(comparison))
    path = write_json(comparison.to_dict(), Path(args.out))
    print(f"JSON: {path}")
    return 0


def _read_failures(args: argparse.Namespace) -> List[float]:
    if args.failures:
        items: List[Any] = [x for x in args.failures.split(",") if x.strip()]
    else:
        text = Path(args.failures_file).read_text(encoding="utf-8")
        try:
            items = list(json.loads(text))
        except json.JSONDecodeError:
            items = [line.strip() for line in text.splitlines() if line.strip()]
    return sorted(parse_duration(x) for x in items)


def _cmd_trace(args: argparse.Namespace) -> int:
    if bool(args.preset) == bool(args.spec):
        raise SimSpecError("trace needs exactly one of --preset or --spec")
    scenario: Scenario
    if args.preset:
        scenario, spec_config = get_preset(args.preset), None
    else:
        scenario, spec_config = load_scenario_file(args.spec)
    config = _config(args, spec_config)
    failures = _read_failures(args)
    horizon = config.horizon_s if args.horizon else max(config.horizon_s, max(failures, default=0))
    simulator = Simulator(scenario, config)
    rows = simulator.replay_trace(failures, horizon)
    print(
        f"{scenario.name}: {len(failures)} failures over {horizon / 3600:g} h "
        f"(mean gap {horizon / max(1, len(failures)):.0f}s)"
    )
    print(f"{'strategy':<10} {'ETTR':>6} {'failures':>8} {'recovery':>10} {'overhead':>9}")
    for row in rows:
        print(
            f"{row.strategy:<10} {row.ettr:>6.3f} {row.failures:>8d} "
            f"{row.recovery_s:>9.0f}s {100 * row.overhead_fraction:>8.1f}%"
        )
    if args.out:
        write_json(
            {
                "scenario": scenario.to_dict(),
                "failures_s": failures,
                "horizon_s": horizon,
                "results": [dataclasses.asdict(r) for r in rows],
            },
            Path(args.out),
        )
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``moevement-sim``; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in _SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "run")
    parser = build_parser()
    args = parser.parse_args(argv)
    level = "DEBUG" if args.verbose else ("WARNING" if args.quiet else "INFO")
    configure_logging(level)
    try:
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "paper-table3":
            return _cmd_paper(args, "3")
        if args.command == "paper-table7":
            return _cmd_paper(args, "7")
        if args.command == "trace":
            return _cmd_trace(args)
        if args.command == "presets":
            for name, build in PRESETS.items():
                scenario = build()
                print(f"{name:<36} {scenario.description}")
            return 0
        if args.command == "profile-schema":
            print(json.dumps(PROFILE_JSON_SCHEMA, indent=2))
            return 0
    except SimSpecError as exc:
        print(f"moevement-sim: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
