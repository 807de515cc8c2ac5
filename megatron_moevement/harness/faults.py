"""Fault specs of the harness's ``resilient`` job: validated before anything starts, and checked
afterwards to have happened (a run asked to inject a fault that never fired must not pass as a
recovery).

A fault is ``{"rank": r, "iteration": i, "phase": p, "generation": g, "signal": s}``; see
:mod:`megatron_moevement.harness.resilient` for where each phase is. With ``"corrupt": what``
instead of a signal, the rank lives on and flips bytes, at random offsets, of one kind of its
in-memory recovery state (:data:`CORRUPTIBLE`): the recovery must detect it and take the next
tier, never replay from it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

FIXED_PHASES = (
    "before",
    "model",
    "build",
    "optimizer_step",
    "after_step",
    "after_snapshot",
    "fetch",
    "replay",
    "recovery_wait",
)
"""Phases without a microbatch index (``microbatch<k>`` and ``backward<k>`` are the others)."""

BUILD_PHASES = ("model", "build")
"""Phases of a generation's build, not of an iteration (they take ``iteration`` 0)."""

SIGNALS = ("SIGKILL", "SIGSTOP")

CORRUPTIBLE = ("local_slot", "replica", "upstream_log")
"""What a ``corrupt`` fault damages: the rank's own newest persisted slot, every complete
replica it keeps for its peers, or its newest upstream-log entry."""

_MICROBATCH = re.compile(r"^microbatch(\d+)$")


class FaultSpecError(ValueError):
    """A fault spec that does not name a point of the job."""


def valid_phases(num_microbatches: int) -> list[str]:
    """Every phase a fault may name in a job with ``num_microbatches`` per iteration."""
    microbatches = [
        f"{kind}{k}" for kind in ("microbatch", "backward") for k in range(num_microbatches)
    ]
    return [*FIXED_PHASES[:3], *microbatches, *FIXED_PHASES[3:]]


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
        known = {"rank", "iteration", "phase", "generation", "signal", "corrupt", "with"}
        unknown = set(fault) - known
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
        if phase in BUILD_PHASES and fault.get("iteration") != 0:
            raise FaultSpecError(
                f"{where}: phase {phase!r} (during a generation's build) "
                f"takes iteration=0, got {fault.get('iteration')!r}"
            )
        generation = fault.get("generation", 0)
        if not isinstance(generation, int) or generation < 0:
            raise FaultSpecError(f"{where}: generation={generation!r} is invalid; use an int >= 0")
        if fault.get("signal", "SIGKILL") not in SIGNALS:
            raise FaultSpecError(
                f"{where}: signal={fault['signal']!r} is unknown; valid: {', '.join(SIGNALS)}"
            )
        others = fault.get("with", [])
        if not isinstance(others, list) or any(
            not isinstance(r, int) or not 0 <= r < world_size or r == fault["rank"] for r in others
        ):
            raise FaultSpecError(
                f"{where}: with={others!r} is invalid; valid: a list of other ranks in "
                f"0..{world_size - 1}"
            )
        if "corrupt" in fault and fault["corrupt"] not in CORRUPTIBLE:
            raise FaultSpecError(
                f"{where}: corrupt={fault['corrupt']!r} is unknown; valid: {', '.join(CORRUPTIBLE)}"
            )
        if "corrupt" in fault and "signal" in fault:
            raise FaultSpecError(f"{where}: a fault either corrupts or signals, not both")
        out.append(fault)
    return out


def flip_bytes(buffer, seed: int, count: int = 3) -> list[int]:
    """Flips one bit in each of ``count`` random bytes of uint8 ``buffer``; returns the offsets."""
    import random

    rng = random.Random(seed)
    offsets = sorted(rng.sample(range(buffer.numel()), min(count, buffer.numel())))
    for off in offsets:
        buffer[off] ^= 1 << rng.randrange(8)
    return offsets


def flip_record_bytes(buffer, records: Mapping[str, Any], seed: int) -> str:
    """Flips bytes of one record's tensor data in ``buffer`` (a slot's, or a file's bytes with
    the slot layout), never the alignment padding between records, which no checksum covers.

    Returns:
        The record and offsets damaged, for the log.
    """
    import random

    rec = random.Random(seed).choice(sorted(records.values(), key=lambda r: r.key))
    offsets = flip_bytes(buffer[rec.offset : rec.offset + rec.nbytes], seed)
    return f"{rec.key} at bytes {offsets}"


def corrupt_state(strategy, what: str, seed: int) -> str:
    """Damages one kind of ``strategy``'s in-memory recovery state (:data:`CORRUPTIBLE`).

    Returns:
        What was damaged, for the log.

    Raises:
        FaultSpecError: the rank holds nothing of that kind yet.
    """
    if what == "local_slot":
        ckpt = strategy.persisted_checkpoint
        if ckpt is None:
            raise FaultSpecError("corrupt=local_slot: no persisted checkpoint yet")
        slot = ckpt.slots[-1]
        slot.wait()
        damaged = flip_record_bytes(slot.buffer, slot.records, seed)
        return f"own window {ckpt.window} slot {slot.slot}: {damaged}"
    if what == "replica":
        strategy.replicator.drain()  # replicas in flight land first: all of them are damaged
        damaged = []
        for source, store in sorted(strategy.replicator.replicas.items()):
            for window, slots in sorted(store.windows.items()):
                if all(slots):
                    slot = slots[0]
                    where = flip_record_bytes(slot.buffer, slot.records, seed)
                    damaged.append(f"replica of rank {source} window {window}: {where}")
        if not damaged:
            raise FaultSpecError("corrupt=replica: this rank holds no complete replica yet")
        return "; ".join(damaged)
    log = strategy.upstream_log
    keys = [] if log is None else log.keys()
    if not keys:
        raise FaultSpecError("corrupt=upstream_log: this rank's upstream log is empty")
    key = keys[-1]
    tensor = log._entries[key].wait()
    offsets = flip_bytes(tensor.reshape(-1).view(torch.uint8), seed)
    return f"upstream log entry {key} at bytes {offsets}"


FIRED_LOG = "faults.jsonl"
"""Where victims record a fault just before it happens (in the job's output folder)."""


def record_fired(output_dir: str | Path | None, fault: Mapping[str, Any], **extra: Any) -> None:
    """Appends ``fault`` (with the time and ``extra``) to the job's record of fired faults."""
    if output_dir:
        import time

        with open(Path(output_dir) / FIRED_LOG, "a") as log:
            log.write(json.dumps(dict(fault, time=time.time(), **extra)) + "\n")


def fired_faults(output_dir: Path) -> list[dict]:
    """The faults the victims recorded just before signalling themselves."""
    path = Path(output_dir) / FIRED_LOG
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
        if "corrupt" in fault:
            if not any(all(f.get(k) == v for k, v in key.items()) for f in fired):
                raise AssertionError(f"corruption {key} ({fault['corrupt']}) never happened")
            continue
        if not any(all(f.get(k) == v for k, v in key.items()) for f in fired):
            raise AssertionError(
                f"fault {key} never fired: the run did not reach that point, so nothing was "
                "recovered (check the phase and iteration against the job)"
            )
        if fault.get("signal", "SIGKILL") != "SIGKILL":
            continue
        for victim in [fault["rank"], *fault.get("with", [])]:
            if not any(f.get("rank") == victim and f.get("code") == -9 for f in died):
                raise AssertionError(
                    f"fault {key} fired but no death of rank {victim} by SIGKILL was seen "
                    f"(failures: {died})"
                )
