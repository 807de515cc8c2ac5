"""Published results of the MoEvement paper, transcribed for comparison with the simulator.

Source: "Sparse Checkpointing for Fast and Reliable MoE Training" (MoEvement), §5.2 Table 3
(four models on 96 A100s, MTBF 2 h to 10 min, 12-hour runs) and §5.7 Table 7 (DeepSeek-MoE
under five low-precision recipes on 128 H100s, MTBF 1 h to 10 min). Values are copied as
printed: checkpoint interval (iterations), average per-iteration checkpoint overhead in seconds
and in percent, total recovery time over the run (s) and ETTR. Merged table cells (values that
do not change with the MTBF: CheckFreq's interval and overhead, MoEvement's overhead, and the
intervals of MoC and MoEvement, always 1) are repeated on every row.

Nothing here is used to build the simulator's models; the data only feeds the comparison in
:mod:`megatron_moevement.sim.paper_compare`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = [
    "PAPER_RUN_S",
    "TABLE3",
    "TABLE3_PRESETS",
    "TABLE3_WINDOWS",
    "TABLE7",
    "TABLE7_PRESETS",
    "PaperRow",
    "paper_rows",
]

PAPER_RUN_S = 12 * 3600.0
"""Length of the paper's controlled-failure runs (§5.2: 12-hour training runs). Table 7's run
length is not stated; the same 12 hours are assumed."""

_STRATEGIES = ("checkfreq", "gemini", "moc", "moevement")
_MTBF_S = {"2H": 7200.0, "1H": 3600.0, "30M": 1800.0, "20M": 1200.0, "10M": 600.0}


@dataclass(frozen=True)
class PaperRow:
    """One cell group of Table 3 or Table 7: a strategy at one MTBF for one configuration."""

    table: str
    """``"3"`` or ``"7"``."""

    config: str
    """Model (Table 3) or precision recipe (Table 7) as printed."""

    mtbf_label: str
    """MTBF as printed (``"2H"``, ``"30M"`` ...)."""

    mtbf_s: float
    """MTBF in seconds."""

    strategy: str
    """``checkfreq``, ``gemini``, ``moc`` or ``moevement``."""

    interval_iterations: int
    """Checkpoint interval (iterations)."""

    window_iterations: Optional[int]
    """MoEvement's sparse window W where printed, else ``None``."""

    overhead_s: float
    """Average per-iteration checkpoint overhead (s)."""

    overhead_percent: float
    """The same overhead in percent of the iteration time."""

    total_recovery_s: float
    """Total recovery time over the run (s)."""

    ettr: float
    """Published ETTR."""


# Per configuration: CheckFreq interval, Gemini intervals per MTBF, MoEvement W, constant
# overheads (CheckFreq, MoEvement) as (s, %), per-MTBF (Gemini, MoC) overheads, per-MTBF
# recovery totals and ETTRs in strategy order.
_Cell = Tuple[float, float]
_Spec = Dict[str, object]

_TABLE3_SPEC: Dict[str, _Spec] = {
    "MoE-LLaVa": {
        "checkfreq_interval": 57,
        "gemini_intervals": (46, 38, 27, 21, 17),
        "window": 3,
        "checkfreq_overhead": (0.03, 2),
        "moevement_overhead": (0.01, 1),
        "gemini_overhead": ((0.02, 1), (0.07, 4), (0.13, 7), (0.21, 11), (0.31, 15)),
        "moc_overhead": ((0.14, 8), (2.14, 124), (3.41, 201), (5.39, 318), (5.88, 347)),
        "recovery": (
            (1265, 938, 10, 11),
            (2530, 1551, 20, 24),
            (5059, 2203, 41, 57),
            (7589, 2570, 61, 74),
            (11178, 4161, 98, 117),
        ),
        "ettr": (
            (0.945, 0.959, 0.922, 0.981),
            (0.914, 0.939, 0.375, 0.979),
            (0.853, 0.897, 0.328, 0.975),
            (0.792, 0.852, 0.231, 0.971),
            (0.712, 0.764, 0.184, 0.964),
        ),
    },
    "GPT-MoE": {
        "checkfreq_interval": 78,
        "gemini_intervals": (64, 49, 36, 31, 22),
        "window": 3,
        "checkfreq_overhead": (0.03, 1),
        "moevement_overhead": (0.03, 1),
        "gemini_overhead": ((0.03, 1), (0.06, 2), (0.15, 5), (0.22, 7), (0.33, 11)),
        "moc_overhead": ((0.18, 9), (3.32, 158), (4.54, 216), (7.90, 376), (8.36, 397)),
        "recovery": (
            (1424, 1121, 13, 18),
            (2848, 1718, 25, 28),
            (4486, 2160, 50, 78),
            (8543, 3259, 76, 105),
            (13086, 4627, 132, 161),
        ),
        "ettr": (
            (0.937, 0.947, 0.919, 0.979),
            (0.903, 0.923, 0.384, 0.976),
            (0.834, 0.868, 0.326, 0.971),
            (0.765, 0.815, 0.220, 0.966),
            (0.687, 0.722, 0.179, 0.959),
        ),
    },
    "QWen-MoE": {
        "checkfreq_interval": 113,
        "gemini_intervals": (89, 65, 48, 36, 27),
        "window": 5,
        "checkfreq_overhead": (0.05, 2),
        "moevement_overhead": (0.04, 2),
        "gemini_overhead": ((0.04, 2), (0.05, 3), (0.11, 6), (0.19, 9), (0.25, 13)),
        "moc_overhead": ((0.19, 9), (4.25, 170), (7.10, 284), (9.23, 369), (9.68, 386)),
        "recovery": (
            (1170, 961, 15, 17),
            (2340, 1402, 30, 33),
            (4680, 2114, 60, 83),
            (7020, 2331, 90, 140),
            (10040, 3495, 146, 207),
        ),
        "ettr": (
            (0.927, 0.934, 0.927, 0.981),
            (0.898, 0.915, 0.380, 0.977),
            (0.841, 0.868, 0.325, 0.970),
            (0.783, 0.819, 0.205, 0.963),
            (0.703, 0.717, 0.162, 0.957),
        ),
    },
    "DeepSeek-MoE": {
        "checkfreq_interval": 124,
        "gemini_intervals": (92, 70, 54, 38, 31),
        "window": 6,
        "checkfreq_overhead": (0.08, 3),
        "moevement_overhead": (0.06, 2),
        "gemini_overhead": ((0.07, 2), (0.09, 3), (0.19, 6), (0.25, 8), (0.38, 11)),
        "moc_overhead": ((0.22, 8), (5.75, 198), (8.58, 293), (12.87, 444), (13.65, 470)),
        "recovery": (
            (992, 800, 17, 22),
            (1984, 1218, 35, 43),
            (3967, 1879, 70, 104),
            (5951, 1983, 104, 167),
            (9402, 3236, 176, 241),
        ),
        "ettr": (
            (0.902, 0.910, 0.933, 0.975),
            (0.877, 0.894, 0.349, 0.970),
            (0.827, 0.853, 0.324, 0.965),
            (0.777, 0.814, 0.168, 0.956),
            (0.672, 0.728, 0.134, 0.951),
        ),
    },
}

_TABLE7_SPEC: Dict[str, _Spec] = {
    "FP16/FP16/FP16+FP16": {
        "checkfreq_interval": 77,
        "gemini_intervals": (71, 48, 27),
        "window": None,
        "checkfreq_overhead": (0.10, 3),
        "moevement_overhead": (0.06, 2),
        "gemini_overhead": ((0.11, 3), (0.16, 6), (0.29, 10)),
        "moc_overhead": ((1.16, 39), (2.91, 97), (3.51, 117)),
        "recovery": ((2036, 1854, 79, 86), (3549, 2471, 102, 113), (10648, 4324, 246, 268)),
        "ettr": (
            (0.918, 0.925, 0.613, 0.984),
            (0.876, 0.886, 0.459, 0.979),
            (0.706, 0.795, 0.425, 0.973),
        ),
    },
    "FP8/FP32/FP32+FP32": {
        "checkfreq_interval": 227,
        "gemini_intervals": (182, 94, 46),
        "window": None,
        "checkfreq_overhead": (0.06, 3),
        "moevement_overhead": (0.05, 2),
        "gemini_overhead": ((0.09, 4), (0.17, 8), (0.34, 15)),
        "moc_overhead": ((3.53, 154), (8.89, 386), (10.70, 465)),
        "recovery": ((5162, 3591, 48, 59), (9524, 3709, 75, 96), (28574, 5446, 185, 232)),
        "ettr": (
            (0.853, 0.878, 0.357, 0.952),
            (0.748, 0.839, 0.196, 0.946),
            (0.302, 0.718, 0.115, 0.941),
        ),
    },
    "FP8/FP16/FP32+FP32": {
        "checkfreq_interval": 205,
        "gemini_intervals": (157, 79, 43),
        "window": None,
        "checkfreq_overhead": (0.06, 3),
        "moevement_overhead": (0.04, 2),
        "gemini_overhead": ((0.08, 4), (0.16, 8), (0.30, 14)),
        "moc_overhead": ((2.88, 137), (7.25, 345), (8.73, 416)),
        "recovery": ((3763, 2846, 45, 53), (7527, 2882, 71, 83), (22581, 4756, 151, 172)),
        "ettr": (
            (0.881, 0.893, 0.368, 0.966),
            (0.793, 0.852, 0.226, 0.958),
            (0.439, 0.738, 0.163, 0.953),
        ),
    },
    "FP8/FP16/FP8+FP16": {
        "checkfreq_interval": 94,
        "gemini_intervals": (68, 61, 29),
        "window": None,
        "checkfreq_overhead": (0.07, 3),
        "moevement_overhead": (0.04, 2),
        "gemini_overhead": ((0.10, 5), (0.11, 6), (0.22, 12)),
        "moc_overhead": ((1.16, 61), (2.92, 154), (3.52, 185)),
        "recovery": ((1554, 1108, 52, 57), (3107, 2022, 85, 94), (9322, 2934, 196, 213)),
        "ettr": (
            (0.916, 0.923, 0.557, 0.976),
            (0.889, 0.894, 0.349, 0.968),
            (0.739, 0.806, 0.321, 0.965),
        ),
    },
    "FP8/FP8/FP8+FP16": {
        "checkfreq_interval": 78,
        "gemini_intervals": (59, 52, 24),
        "window": None,
        "checkfreq_overhead": (0.07, 3),
        "moevement_overhead": (0.03, 1),
        "gemini_overhead": ((0.09, 5), (0.18, 10), (0.31, 17)),
        "moc_overhead": ((0.87, 51), (2.19, 129), (2.63, 155)),
        "recovery": ((1153, 876, 40, 44), (2307, 1516, 79, 85), (6921, 2100, 162, 178)),
        "ettr": (
            (0.937, 0.943, 0.584, 0.979),
            (0.905, 0.907, 0.381, 0.976),
            (0.752, 0.816, 0.326, 0.971),
        ),
    },
}


def _expand(table: str, specs: Dict[str, _Spec], mtbfs: Sequence[str]) -> List[PaperRow]:
    rows: List[PaperRow] = []
    for config, spec in specs.items():
        for i, label in enumerate(mtbfs):
            overheads: Dict[str, _Cell] = {
                "checkfreq": spec["checkfreq_overhead"],  # type: ignore[dict-item]
                "gemini": spec["gemini_overhead"][i],  # type: ignore[index]
                "moc": spec["moc_overhead"][i],  # type: ignore[index]
                "moevement": spec["moevement_overhead"],  # type: ignore[dict-item]
            }
            intervals = {
                "checkfreq": spec["checkfreq_interval"],
                "gemini": spec["gemini_intervals"][i],  # type: ignore[index]
                "moc": 1,
                "moevement": 1,
            }
            for k, strategy in enumerate(_STRATEGIES):
                seconds, percent = overheads[strategy]
                rows.append(
                    PaperRow(
                        table=table,
                        config=config,
                        mtbf_label=label,
                        mtbf_s=_MTBF_S[label],
                        strategy=strategy,
                        interval_iterations=int(intervals[strategy]),  # type: ignore[arg-type]
                        window_iterations=(
                            spec["window"] if strategy == "moevement" else None  # type: ignore
                        ),
                        overhead_s=float(seconds),
                        overhead_percent=float(percent),
                        total_recovery_s=float(spec["recovery"][i][k]),  # type: ignore[index]
                        ettr=float(spec["ettr"][i][k]),  # type: ignore[index]
                    )
                )
    return rows


TABLE3: List[PaperRow] = _expand("3", _TABLE3_SPEC, ("2H", "1H", "30M", "20M", "10M"))
"""Table 3: 4 models x 5 MTBFs x 4 strategies = 80 rows."""

TABLE7: List[PaperRow] = _expand("7", _TABLE7_SPEC, ("1H", "30M", "10M"))
"""Table 7: 5 precision recipes x 3 MTBFs x 4 strategies = 60 rows."""

TABLE3_WINDOWS: Dict[str, int] = {
    name: int(spec["window"]) for name, spec in _TABLE3_SPEC.items()  # type: ignore[arg-type]
}
"""MoEvement's sparse window W per model as printed in Table 3."""

TABLE3_PRESETS: Dict[str, str] = {
    "MoE-LLaVa": "moe-llava",
    "GPT-MoE": "gpt-moe",
    "QWen-MoE": "qwen-moe",
    "DeepSeek-MoE": "deepseek-moe",
}
"""Simulator preset of each Table 3 model."""

TABLE7_PRESETS: Dict[str, str] = {
    "FP16/FP16/FP16+FP16": "deepseek-moe-h100-fp16-fp16-fp16x2",
    "FP8/FP32/FP32+FP32": "deepseek-moe-h100-fp8-fp32-fp32x2",
    "FP8/FP16/FP32+FP32": "deepseek-moe-h100-fp8-fp16-fp32x2",
    "FP8/FP16/FP8+FP16": "deepseek-moe-h100-fp8-fp16-fp8+fp16",
    "FP8/FP8/FP8+FP16": "deepseek-moe-h100-fp8-fp8-fp8+fp16",
}
"""Simulator preset of each Table 7 recipe."""


def paper_rows(table: str = "3") -> List[PaperRow]:
    """Rows of Table ``"3"`` or ``"7"``."""
    if table == "3":
        return list(TABLE3)
    if table == "7":
        return list(TABLE7)
    raise ValueError(f"unknown paper table {table!r}; use '3' or '7'")
