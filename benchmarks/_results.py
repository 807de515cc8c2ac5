"""What every benchmark script does with its results: one JSON file, and a line saying where."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Mapping


def write_results(path: Path, payload: Mapping[str, Any], indent: int = 1) -> None:
    """Writes ``payload`` as JSON to ``path`` (parents created) and prints where it went.

    Args:
        path: Output file.
        payload: JSON-serializable results; numpy scalars are written as floats. A
            ``written_at`` field (local time, ISO 8601) is added so the report can say when the
            numbers were measured: a file's mtime says only when it was checked out.
        indent: JSON indentation.
    """
    stamped = {**payload, "written_at": datetime.datetime.now().isoformat(timespec="seconds")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamped, indent=indent, default=float) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")


def median_runs(runs: Mapping[str, list], key: str = "recovery_s") -> dict:
    """The median run of each mode (by ``key``; the lower one of two middles), with every round's
    ``key`` beside it as ``<key>_per_round``: how the interleaved-rounds benchmarks report a mode.

    Args:
        runs: Mode -> its runs (dicts holding ``key``), in round order.
        key: The figure the runs are ordered by.
    """
    out = {}
    for mode, mode_runs in runs.items():
        ordered = sorted(mode_runs, key=lambda r: r[key])
        out[mode] = dict(
            ordered[(len(ordered) - 1) // 2], **{f"{key}_per_round": [r[key] for r in mode_runs]}
        )
    return out
