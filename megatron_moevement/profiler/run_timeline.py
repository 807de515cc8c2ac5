"""Measured ETTR of a real resilient harness run, defined exactly as the simulator defines it.

The simulator (:mod:`megatron_moevement.sim.timeline`) counts a run of ``H`` wall-clock seconds
that committed ``P`` iterations as ``ETTR = P * T / H``, with ``T`` the fault-free,
checkpoint-free iteration time. For a real run of the ``resilient`` harness job (every rank
writes when training started and when each iteration committed, victims log their kill instant)
this module takes the interval from the commit of iteration ``warmup - 1`` to the commit of the
last iteration (so start-up and the first, slower iterations are excluded), counts the iterations
committed in it, and places the failures on the same clock. With ``warmup`` a multiple of the
sparse window the simulator's checkpoint cycles line up with the real windows.

``T`` can come from a separate fault-free, checkpoint-free run (the profiler's), or from the run
itself: the mean time between consecutive commits that no failure interrupted
(:attr:`RealRun.iteration_s`). The second is measured under the same machine load as the
failures (on a shared machine the load drifts between runs); it contains the snapshot overhead,
which must then be negligible (the simulator and the overhead benchmark say how much it is).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List

from megatron_moevement.harness.faults import fired_faults

__all__ = ["RealRun", "load_real_run"]


@dataclass
class RealRun:
    """Timeline of one real run, on the run's own clock (s since ``start``)."""

    start: float
    """Absolute time (``time.time()``) of the measurement start: the commit of iteration
    ``warmup - 1`` on the last rank to commit it."""
    wall_s: float
    """Seconds from ``start`` to the last rank's commit of the last iteration (the horizon)."""
    iterations: int
    """Iterations committed in that interval."""
    failures_s: List[float]
    """Kill instants, seconds after ``start``."""
    recoveries: List[Dict[str, Any]] = field(default_factory=list)
    """Per recovery (generation): failed ranks, scope, iterations replayed and the slowest
    rank's phase times."""
    lost_partial_s: List[float] = field(default_factory=list)
    """Per failure: time the interrupted iteration had run (since the last commit) when killed."""
    iteration_s: float = 0.0
    """Mean time between consecutive commits that no failure interrupted (s)."""
    interrupted_gaps_s: List[float] = field(default_factory=list)
    """Per failure: time between the last commit before it and the next commit (s)."""

    def ettr(self, iteration_s: float | None = None) -> float:
        """``iterations * T / wall``: useful time over wall time (``T`` defaults to
        :attr:`iteration_s`)."""
        return self.iterations * (iteration_s or self.iteration_s) / self.wall_s

    @property
    def lost_per_failure_s(self) -> List[float]:
        """Per failure: wall time it cost, its interrupted gap minus one normal iteration (s)."""
        return [gap - self.iteration_s for gap in self.interrupted_gaps_s]

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _commit_time(files: List[dict], iteration: int, latest: bool = True) -> float:
    times = [t for d in files for it, t in d["timeline"]["commits"] if it == iteration]
    if not times:
        raise ValueError(f"no rank recorded the commit of iteration {iteration}")
    return max(times) if latest else min(times)


def load_real_run(output_dir: Path, world_size: int, iterations: int, warmup: int) -> RealRun:
    """Reads the ``recovery_rank<r>.json`` files and ``faults.jsonl`` of a finished run.

    Args:
        output_dir: The run's output folder.
        world_size: Ranks of the job.
        iterations: Iterations the job trained (numbered from 0).
        warmup: Leading iterations excluded from the measurement (>= 1).
    """
    if not 1 <= warmup < iterations:
        raise ValueError(f"warmup={warmup} must lie in [1, iterations={iterations})")
    output_dir = Path(output_dir)
    files = [
        json.loads((output_dir / f"recovery_rank{r}.json").read_text()) for r in range(world_size)
    ]
    start = _commit_time(files, warmup - 1)
    end = _commit_time(files, iterations - 1)
    # Failures only: a corruption fault is recorded too, but its rank lives on.
    faults = [f for f in fired_faults(output_dir) if "corrupt" not in f]
    commits = sorted({t for d in files for _, t in d["timeline"]["commits"]})
    lost_partial = []
    for f in faults:
        before = [t for t in commits if t <= f["time"]]
        lost_partial.append(f["time"] - before[-1] if before else 0.0)
    # Job-wide commit time of each iteration: the last rank to commit it.
    job_commit: Dict[int, float] = {}
    for d in files:
        for it, t in d["timeline"]["commits"]:
            job_commit[it] = max(job_commit.get(it, t), t)
    normal, interrupted = [], []
    for it in range(warmup, iterations):
        a, b = job_commit.get(it - 1), job_commit.get(it)
        if a is None or b is None:
            continue
        (interrupted if any(a < f["time"] <= b for f in faults) else normal).append(b - a)
    by_generation: Dict[int, Dict[str, Any]] = {}
    for d in files:
        for rep in d["reports"]:
            entry = by_generation.setdefault(
                rep["generation"],
                dict(
                    generation=rep["generation"],
                    failed_ranks=rep["failed_ranks"],
                    scope=rep["scope"],
                    iterations_replayed=[],
                    phases_s={},
                ),
            )
            if rep["iterations_replayed"]:
                entry["iterations_replayed"] = rep["iterations_replayed"]
            for phase, seconds in rep["times_s"].items():
                entry["phases_s"][phase] = max(entry["phases_s"].get(phase, 0.0), seconds)
    recoveries = [by_generation[g] for g in sorted(by_generation)]
    for rec in recoveries:
        rec["total_s"] = sum(rec["phases_s"].values())
    return RealRun(
        start=start,
        wall_s=end - start,
        iterations=iterations - warmup,
        failures_s=[f["time"] - start for f in faults],
        recoveries=recoveries,
        lost_partial_s=lost_partial,
        iteration_s=sum(normal) / len(normal) if normal else 0.0,
        interrupted_gaps_s=interrupted,
    )
