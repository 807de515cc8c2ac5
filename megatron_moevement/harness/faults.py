"""Fault specs of the harness's ``resilient`` job: validated before anything starts, and checked
afterwards to have happened (a run asked to inject a fault that never fired must not pass as a
recovery).

A fault is ``{"rank": r, "iteration": i, "phase": p, "generation": g, "signal": s}``; see
:mod:`megatron_moevement.harness.resilient` for where each phase is.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

FIXED_PHASES = (
    "before",
    "optimizer_step",
    "after_step",
    "after_snapshot",
    "fetch",
    "replay",
    "recovery_wait",
)
"""Phases without a microbatch index (``microbatch<k>`` and ``backward<k>`` are the others)."""

SIGNALS = ("SIGKILL", "SIGSTOP")

_MICROBATCH = re.compile(r"^microbatch(\d+)$")


class FaultSpecError(ValueError):
    """A fault spec that does not name a point of the job."""


def valid_phases(num_microbatches: int) -> list[str]:
    """Every phase a fault may name in a job with ``num_microbatches`` per iteration."""
    microbatches = [
        f"{kind}{k}" for kind in ("microbatch", "backward") for k in range(num_microbatches)
    ]
    return ["before", *microbatches, *FIXED_PHASES[1:]]


def validate_faults(
    faults: Iterable[Mapping[str, Any]], world_size: int, iterations: int, num_microbatches: int
) -> list[dict]:
    """Checks every fault against the job; returns them as plain dicts.

    Raises:
        FaultSpecError: naming the fault, the bad field and the valid values.
    """
    out = []
    phases = valid_phases(num_microbatches)
    for n, fault in enumerate(faults):
        fault = dict(fault)
        where = f"fault {n} {fault}"
        unknown = set(fault) - {"rank", "iteration", "phase", "generation", "signal"}
        if unknown:
            raise FaultSpecError(f"{where}: unknown field(s) {sorted(unknown)}")
        for name, bound in (("rank", world_size), ("iteration", iterations)):
            value = fault.get(name)
            if name == "iteration" and value == "*":
                continue  # the first time the phase is reached
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < bound:
                wildcard = ' or "*"' if name == "iteration" else ""
                raise FaultSpecError(
                    f"{where}: {name}={value!r} is invalid; valid: an int in 0..{bound - 1}"
                    f"{wildcard}"
                )
        phase = fault.get("phase")
        if phase not in phases:
            raise FaultSpecError(f"{where}: phase={phase!r} is unknown; valid: {', '.join(phases)}")
        generation = fault.get("generation", 0)
        if not isinstance(generation, int) or generation < 0:
            raise FaultSpecError(f"{where}: generation={generation!r} is invalid; use an int >= 0")
        if fault.get("signal", "SIGKILL") not in SIGNALS:
            raise FaultSpecError(
                f"{where}: signal={fault['signal']!r} is unknown; valid: {', '.join(SIGNALS)}"
            )
        out.append(fault)
    return out


def fired_faults(output_dir: Path) -> list[dict]:
    """The faults the victims recorded just before signalling themselves."""
    path = Path(output_dir) / "faults.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_faults_fired(
    faults: Iterable[Mapping[str, Any]], output_dir: Path, failures: Iterable[Mapping[str, Any]]
) -> None:
    """Raises ``AssertionError`` unless every requested fault fired and its victim died.

    Args:
        faults: The requested faults.
        output_dir: The job's output folder (the victims append to ``faults.jsonl`` there).
        failures: The agent's failure records (``rank``, ``code``: ``-9`` for a SIGKILL).
    """
    fired = fired_faults(output_dir)
    died = [f for f in failures]
    for fault in faults:
        key = {k: fault[k] for k in ("rank", "iteration", "phase")}
        if not any(all(f.get(k) == v for k, v in key.items()) for f in fired):
            raise AssertionError(
                f"fault {key} never fired: the run did not reach that point, so nothing was "
                "recovered (check the phase and iteration against the job)"
            )
        if fault.get("signal", "SIGKILL") == "SIGKILL" and not any(
            f.get("rank") == fault["rank"] and f.get("code") == -9 for f in died
        ):
            raise AssertionError(
                f"fault {key} fired but no death of rank {fault['rank']} by SIGKILL was seen "
                f"(failures: {died})"
            )
