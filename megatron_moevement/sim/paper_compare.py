"""Side-by-side comparison of the simulator's ETTR with the paper's Table 3 (and Table 7).

Two simulator columns are produced for every published row:

* **fed** — the simulator's ETTR formula applied to the row's *published* inputs: the
  per-iteration overhead (percent column), the total recovery time and the run length
  (12 h): ``ETTR = (1 - total_recovery / run) / (1 + overhead)`` (paper §2.4, Appendix C with
  ``run / MTBF`` failures). This checks the accounting, not the cost models.
* **model** — the simulator run end to end on the matching preset (its own intervals,
  overheads and recoveries from the model, cluster and plan), at the same MTBF. This checks
  the cost models; nothing in them is fitted to these tables.

Deviations are simulator minus paper, in ETTR points (absolute).

:meth:`PaperComparison.ranking` compares the *order* of the strategies per (configuration,
MTBF): the paper's, the fed column's and the model's, with MoEvement's margin over the best
other strategy. The paper's order is weak where it prints equal values (QWen-MoE at 2 h:
CheckFreq = MoC); a simulated order agrees when every pair the paper orders strictly is
ordered the same way. Where the *fed* order disagrees, the paper's printed ETTR contradicts its
own published overhead and recovery time under its Appendix C formula; no cost model can
reproduce such an order without fitting.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from megatron_moevement.logging_utils import get_logger
from megatron_moevement.sim.config import SimulationConfig
from megatron_moevement.sim.ettr import ettr_from_totals
from megatron_moevement.sim.paper_data import (
    PAPER_RUN_S,
    TABLE3_PRESETS,
    TABLE7_PRESETS,
    PaperRow,
    paper_rows,
)
from megatron_moevement.sim.presets import get_preset
from megatron_moevement.sim.simulator import Simulator

__all__ = [
    "ComparisonRow",
    "PaperComparison",
    "RankingRow",
    "compare_with_paper",
    "format_comparison",
    "orders_agree",
    "ranking_lines",
]

logger = get_logger(__name__)


@dataclass(frozen=True)
class ComparisonRow:
    """A published row with the simulator's values beside it."""

    paper: PaperRow
    """The published values."""

    fed_ettr: float
    """Simulator ETTR from the row's published overhead and recovery time."""

    model_ettr: Optional[float] = None
    """End-to-end simulator ETTR of the matching preset (``None`` if not run)."""

    model_interval: Optional[float] = None
    """Interval the simulator's policy chose for the preset."""

    model_window: Optional[int] = None
    """Window the simulator chose (MoEvement)."""

    model_overhead_percent: Optional[float] = None
    """Simulated per-iteration overhead (%)."""

    model_total_recovery_s: Optional[float] = None
    """Simulated total recovery time over the run (s)."""

    @property
    def fed_deviation(self) -> float:
        """``fed_ettr - paper ETTR``."""
        return self.fed_ettr - self.paper.ettr

    @property
    def paper_unexplained_s_per_failure(self) -> float:
        """Lost time per failure that the published ETTR implies beyond the published recovery
        time: ``((1 - ETTR * (1 + o)) * run - total_recovery) / failures`` (s). Zero when the
        published columns are consistent with the first-order formula."""
        p = self.paper
        failures = PAPER_RUN_S / p.mtbf_s
        lost = (1.0 - p.ettr * (1.0 + p.overhead_percent / 100.0)) * PAPER_RUN_S
        return (lost - p.total_recovery_s) / failures

    @property
    def model_deviation(self) -> Optional[float]:
        """``model_ettr - paper ETTR``."""
        return None if self.model_ettr is None else self.model_ettr - self.paper.ettr

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict."""
        out = {"paper": asdict(self.paper)}
        out.update({k: v for k, v in asdict(self).items() if k != "paper"})
        out["fed_deviation"] = self.fed_deviation
        out["model_deviation"] = self.model_deviation
        out["paper_unexplained_s_per_failure"] = self.paper_unexplained_s_per_failure
        return out


def _stats(values: List[float]) -> Dict[str, float]:
    if not values:
        return {}
    absolute = [abs(v) for v in values]
    return {
        "max_abs": max(absolute),
        "mean_abs": sum(absolute) / len(absolute),
        "mean": sum(values) / len(values),
        "count": float(len(values)),
    }


def _order(values: Mapping[str, float]) -> Tuple[str, ...]:
    """Strategy names by descending ETTR (ties keep report order)."""
    return tuple(sorted(values, key=lambda name: -values[name]))


def orders_agree(reference: Mapping[str, float], candidate: Mapping[str, float]) -> bool:
    """True when every pair ``reference`` orders strictly, ``candidate`` orders the same way
    (pairs the reference ties may come in either order)."""
    names = [n for n in reference if n in candidate]
    for a in names:
        for b in names:
            if reference[a] > reference[b] and not candidate[a] > candidate[b]:
                return False
    return True


def _margin(values: Mapping[str, float], name: str = "moevement") -> Optional[float]:
    """``values[name]`` minus the best other value (positive: ``name`` ranks first)."""
    others = [v for n, v in values.items() if n != name]
    if name not in values or not others:
        return None
    return values[name] - max(others)


@dataclass(frozen=True)
class RankingRow:
    """The strategies' order at one (configuration, MTBF): paper, fed and model."""

    config: str
    """Model name as in the paper."""

    mtbf_label: str
    """MTBF as printed (``2H`` ... ``10M``)."""

    paper: Dict[str, float]
    """Published ETTR per strategy."""

    fed: Dict[str, float]
    """Fed-column ETTR per strategy."""

    model: Optional[Dict[str, float]] = None
    """Model-column ETTR per strategy (``None`` if not run)."""

    @property
    def fed_agrees(self) -> bool:
        """The fed column orders the strategies as the paper does."""
        return orders_agree(self.paper, self.fed)

    @property
    def model_agrees(self) -> Optional[bool]:
        """The model orders the strategies as the paper does."""
        return None if self.model is None else orders_agree(self.paper, self.model)

    @property
    def fed_moevement_margin(self) -> Optional[float]:
        """MoEvement minus the best other strategy, fed column."""
        return _margin(self.fed)

    @property
    def model_moevement_margin(self) -> Optional[float]:
        """MoEvement minus the best other strategy, model column."""
        return None if self.model is None else _margin(self.model)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict."""
        return {
            "config": self.config,
            "mtbf_label": self.mtbf_label,
            "paper_order": list(_order(self.paper)),
            "fed_order": list(_order(self.fed)),
            "model_order": None if self.model is None else list(_order(self.model)),
            "fed_agrees": self.fed_agrees,
            "model_agrees": self.model_agrees,
            "paper_moevement_margin": _margin(self.paper),
            "fed_moevement_margin": self.fed_moevement_margin,
            "model_moevement_margin": self.model_moevement_margin,
        }


@dataclass
class PaperComparison:
    """All rows of one table with deviation statistics."""

    table: str
    """``"3"`` or ``"7"``."""

    run_s: float
    """Run length assumed for the totals (s)."""

    rows: List[ComparisonRow] = field(default_factory=list)
    """One entry per published (configuration, MTBF, strategy)."""

    def summary(self) -> Dict[str, Any]:
        """Max/mean absolute deviations, overall and per strategy, for both columns."""
        out: Dict[str, Any] = {}
        for column in ("fed", "model"):
            values = [getattr(r, f"{column}_deviation") for r in self.rows]
            values = [v for v in values if v is not None]
            per_strategy = {}
            for strategy in ("checkfreq", "gemini", "moc", "moevement"):
                sub = [
                    getattr(r, f"{column}_deviation")
                    for r in self.rows
                    if r.paper.strategy == strategy
                ]
                per_strategy[strategy] = _stats([v for v in sub if v is not None])
            out[column] = {"overall": _stats(values), "per_strategy": per_strategy}
        return out

    def ranking(self) -> List[RankingRow]:
        """The strategies' order per (configuration, MTBF), in table order."""
        groups: Dict[Tuple[str, str], Dict[str, ComparisonRow]] = {}
        for row in self.rows:
            groups.setdefault((row.paper.config, row.paper.mtbf_label), {})[
                row.paper.strategy
            ] = row
        out = []
        for (config, mtbf), rows in groups.items():
            has_model = all(r.model_ettr is not None for r in rows.values())
            out.append(
                RankingRow(
                    config=config,
                    mtbf_label=mtbf,
                    paper={s: r.paper.ettr for s, r in rows.items()},
                    fed={s: r.fed_ettr for s, r in rows.items()},
                    model={s: r.model_ettr for s, r in rows.items()} if has_model else None,
                )
            )
        return out

    def ranking_summary(self) -> Dict[str, Any]:
        """How often the fed and model columns order the strategies as the paper does, and
        rank MoEvement first, with the rows where they do not."""
        ranking = self.ranking()
        out: Dict[str, Any] = {"rows": len(ranking)}
        for column in ("fed", "model"):
            rows = [r for r in ranking if getattr(r, column) is not None]
            if not rows:
                continue
            agree = [getattr(r, f"{column}_agrees") for r in rows]
            margins = [getattr(r, f"{column}_moevement_margin") for r in rows]
            out[column] = {
                "order_agrees": sum(agree),
                "moevement_first": sum(m > 0 for m in margins),
                "disagreements": [
                    {
                        "config": r.config,
                        "mtbf_label": r.mtbf_label,
                        "order": list(_order(getattr(r, column))),
                        "paper_order": list(_order(r.paper)),
                        "moevement_margin": m,
                    }
                    for r, ok, m in zip(rows, agree, margins)
                    if not ok
                ],
            }
        return out

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict."""
        return {
            "table": self.table,
            "source": "MoEvement paper, Table " + self.table,
            "run_s": self.run_s,
            "summary": self.summary(),
            "ranking_summary": self.ranking_summary(),
            "ranking": [r.to_dict() for r in self.ranking()],
            "rows": [r.to_dict() for r in self.rows],
        }


def compare_with_paper(
    table: str = "3",
    include_model: bool = True,
    config: Optional[SimulationConfig] = None,
) -> PaperComparison:
    """Builds the comparison for Table ``table``.

    Args:
        table: ``"3"`` (§5.2) or ``"7"`` (§5.7).
        include_model: Also run the matching presets end to end.
        config: Simulation knobs for the end-to-end runs (defaults otherwise).
    """
    rows = paper_rows(table)
    presets = TABLE3_PRESETS if table == "3" else TABLE7_PRESETS
    simulators: Dict[str, Simulator] = {}
    comparison = PaperComparison(table=table, run_s=PAPER_RUN_S)
    cfg = config or SimulationConfig(horizon_s=PAPER_RUN_S)
    for row in rows:
        fed = ettr_from_totals(row.overhead_percent / 100.0, row.total_recovery_s, PAPER_RUN_S)
        extra: Dict[str, Any] = {}
        if include_model:
            if row.config not in simulators:
                logger.info("Table %s: simulating preset %s", table, presets[row.config])
                simulators[row.config] = Simulator(get_preset(presets[row.config]), cfg)
            evaluation = simulators[row.config].evaluate(row.mtbf_s, [row.strategy])[0]
            extra = {
                "model_ettr": evaluation.ettr,
                "model_interval": evaluation.interval_iterations,
                "model_window": evaluation.window_iterations,
                "model_overhead_percent": 100.0 * evaluation.overhead_fraction,
                "model_total_recovery_s": evaluation.total_recovery_s,
            }
        comparison.rows.append(ComparisonRow(paper=row, fed_ettr=fed, **extra))
    return comparison


def format_comparison(comparison: PaperComparison) -> str:
    """Plain-text table of a comparison with a deviation summary."""
    has_model = any(r.model_ettr is not None for r in comparison.rows)
    header = f"{'config':<20} {'MTBF':>4} {'strategy':<10} {'paper':>6} {'fed':>6} {'dev':>7}"
    if has_model:
        header += f" {'model':>6} {'dev':>7} {'I/W paper':>9} {'I/W sim':>8}"
    lines = [
        f"MoEvement paper Table {comparison.table} vs simulator "
        f"(run {comparison.run_s / 3600:g} h; deviations in ETTR points)",
        header,
        "-" * len(header),
    ]
    for r in comparison.rows:
        p = r.paper
        line = (
            f"{p.config:<20} {p.mtbf_label:>4} {p.strategy:<10} {p.ettr:>6.3f} "
            f"{r.fed_ettr:>6.3f} {r.fed_deviation:>+7.3f}"
        )
        if has_model and r.model_ettr is not None:
            paper_iw = p.window_iterations if p.strategy == "moevement" else p.interval_iterations
            sim_iw = r.model_window if p.strategy == "moevement" else r.model_interval
            line += (
                f" {r.model_ettr:>6.3f} {r.model_deviation:>+7.3f} "
                f"{'-' if paper_iw is None else paper_iw:>9} "
                f"{'-' if sim_iw is None else f'{sim_iw:g}':>8}"
            )
        lines.append(line)
    summary = comparison.summary()
    lines.append("")
    for column, title in (("fed", "fed (published inputs)"), ("model", "model (presets)")):
        overall = summary[column]["overall"]
        if not overall:
            continue
        lines.append(
            f"{title}: max |dev| {overall['max_abs']:.3f}, mean |dev| {overall['mean_abs']:.3f}"
        )
        for strategy, stats in summary[column]["per_strategy"].items():
            if stats:
                lines.append(
                    f"  {strategy:<10} max |dev| {stats['max_abs']:.3f}, "
                    f"mean |dev| {stats['mean_abs']:.3f}, mean dev {stats['mean']:+.3f}"
                )
    lines.extend(ranking_lines(comparison.ranking_summary()))
    return "\n".join(lines)


def ranking_lines(summary: Mapping[str, Any], bullet: str = "") -> List[str]:
    """Lines describing :meth:`PaperComparison.ranking_summary` (also as read back from the
    JSON): per column, how often the order agrees with the paper's, and each disagreement.

    Args:
        summary: The ranking summary.
        bullet: Prefix of every line (``"* "`` for a Markdown list).
    """
    lines = []
    for column in ("fed", "model"):
        info = summary.get(column)
        if not info:
            continue
        rows = summary["rows"]
        lines.append(
            f"{bullet}ranking, {column}: order as the paper's in {info['order_agrees']}/{rows}, "
            f"MoEvement first in {info['moevement_first']}/{rows}"
        )
        for d in info["disagreements"]:
            lines.append(
                f"  {bullet}{d['config']} {d['mtbf_label']}: {' > '.join(d['order'])} "
                f"(paper: {' > '.join(d['paper_order'])}; MoEvement margin "
                f"{d['moevement_margin']:+.4f})"
            )
    return lines
