"""Reports of simulation results: plain-text table, JSON file and ETTR-vs-MTBF plot.

Matplotlib is optional (``pip install megatron-moevement[sim]``); it is imported lazily with
the non-interactive Agg backend, and :func:`write_plot` says clearly when it is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from megatron_moevement.logging_utils import get_logger
from megatron_moevement.sim.simulator import SimulationResult
from megatron_moevement.sim.strategies import STRATEGIES
from megatron_moevement.sim.units import format_duration

__all__ = ["format_table", "matplotlib_available", "write_json", "write_plot"]

logger = get_logger(__name__)


def _label(strategy: str) -> str:
    return STRATEGIES[strategy].label if strategy in STRATEGIES else strategy


def format_table(result: SimulationResult) -> str:
    """Strategies x MTBF table: ETTR, interval (or window), overhead, recovery time."""
    scenario = result.scenario
    has_mc = any(e.ettr_mc is not None for e in result.evaluations)
    header = (
        f"{'strategy':<10} {'MTBF':>5} {'ETTR':>6}"
        + (f" {'ETTR(MC)':>15}" if has_mc else "")
        + f" {'interval':>8} {'window':>6} {'overhead':>15} {'recovery/fail':>13}"
        f" {'total rec.':>10}"
    )
    lines = [
        f"{scenario.name}: {scenario.model.name}, {scenario.cluster.num_gpus} GPUs "
        f"(PP{scenario.plan.pp} DP{scenario.plan.dp} EP{scenario.plan.ep} TP{scenario.plan.tp}), "
        f"iteration {result.iteration_s:.3f}s, horizon {format_duration(result.config.horizon_s)}",
        header,
        "-" * len(header),
    ]
    for strategy in result.strategies:
        for mtbf in result.mtbfs:
            e = result.get(strategy, mtbf)
            window = "inf" if e.window_iterations is None else str(e.window_iterations)
            mc = ""
            if has_mc:
                mc = (
                    f" {e.ettr_mc:>8.3f}+-{e.ettr_mc_stderr:.3f}"
                    if e.ettr_mc is not None
                    else f" {'-':>15}"
                )
            lines.append(
                f"{_label(strategy):<10} {format_duration(mtbf):>5} {e.ettr:>6.3f}{mc}"
                f" {e.interval_iterations:>8g} {window:>6}"
                f" {e.overhead_s_per_iteration:>7.3f}s ({100 * e.overhead_fraction:>4.1f}%)"
                f" {e.recovery_s:>12.1f}s {e.total_recovery_s:>9.0f}s"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_json(payload: Union[SimulationResult, Dict[str, Any], List[Any]], path: Path) -> Path:
    """Writes a result (or any JSON-ready payload) to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = payload.to_dict() if isinstance(payload, SimulationResult) else payload
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n", encoding="utf-8")
    logger.info("wrote %s", path)
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def matplotlib_available() -> bool:
    """True when matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plot(results: Sequence[SimulationResult], path: Path) -> Optional[Path]:
    """Plots ETTR against MTBF for every strategy (one panel per scenario) as a PNG.

    Returns:
        The path written, or ``None`` when matplotlib is not installed (a warning says how to
        install it).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning(
            "matplotlib is not installed: no plot written to %s. Install it with "
            "`pip install matplotlib` (or the `sim` extra: pip install megatron-moevement[sim]).",
            path,
        )
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = len(results)
    cols = min(count, 2)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4 * rows), squeeze=False)
    for ax, result in zip(axes.flat, results):
        mtbfs = sorted(result.mtbfs, reverse=True)
        minutes = [m / 60.0 for m in mtbfs]
        for strategy in result.strategies:
            values = [result.get(strategy, m).ettr for m in mtbfs]
            ax.plot(minutes, values, marker="o", label=_label(strategy))
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xticks(minutes)
        ax.set_xticklabels([format_duration(m) for m in mtbfs])
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("MTBF")
        ax.set_ylabel("ETTR")
        ax.set_title(result.scenario.name)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower left", fontsize="small")
    for ax in list(axes.flat)[count:]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    logger.info("wrote %s", path)
    return path
