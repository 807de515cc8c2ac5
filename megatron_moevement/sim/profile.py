"""Per-stage timing profile: the measured (or estimated) costs the simulator works from.

A :class:`StageProfile` holds, for every pipeline stage, the time of one micro-batch's
forward, input-gradient backward and weight-gradient computation, plus the per-iteration
optimizer step and data-parallel gradient synchronization. It is what the paper's profiler
produces (Appendix C, "Profiler") and it is stored as JSON so that a profiler running the real
Megatron model can hand its measurements to the simulator.

JSON layout (``schema`` and ``version`` are required; see :data:`PROFILE_JSON_SCHEMA`)::

    {
      "schema": "moevement-sim/stage-profile",
      "version": 1,
      "source": "measured",              # "measured" | "analytic" | "given"
      "micro_batch_size": 32,            # samples per micro-batch the times refer to
      "seq_length": 2048,
      "stages": [                        # one entry per pipeline stage, first stage first
        {"forward_s": 0.021, "backward_s": 0.021, "weight_grad_s": 0.021,
         "optimizer_s": 0.004, "grad_sync_s": 0.05, "p2p_s": 0.001},
        ...
      ],
      "metadata": {"device": "A100-80GB", "tool": "..."}   # free-form, optional
    }

``forward_s``, ``backward_s`` and ``weight_grad_s`` are per micro-batch; ``optimizer_s`` and
``grad_sync_s`` per iteration; ``p2p_s`` is the per-micro-batch send/receive time of the stage
boundary (added once to the forward and once to the backward step).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Sequence, Tuple, Union

from megatron_moevement.logging_utils import get_logger
from megatron_moevement.sim._validation import SimSpecError, check_int, check_real, from_mapping

__all__ = [
    "PROFILE_JSON_SCHEMA",
    "PROFILE_SCHEMA_NAME",
    "PROFILE_SCHEMA_VERSION",
    "StageProfile",
    "StageTimes",
    "load_profile",
    "save_profile",
    "uniform_profile",
]

logger = get_logger(__name__)

PROFILE_SCHEMA_NAME = "moevement-sim/stage-profile"
"""Value of the ``schema`` key of a profile JSON file."""

PROFILE_SCHEMA_VERSION = 1
"""Current profile format version."""

PROFILE_SOURCES = ("measured", "analytic", "given")
"""Allowed values of ``StageProfile.source``."""


@dataclass(frozen=True)
class StageTimes:
    """Costs of one pipeline stage (one GPU of the stage's expert-parallel group)."""

    forward_s: float
    """Forward time of one micro-batch (s)."""

    backward_s: float
    """Input-gradient part of the backward pass of one micro-batch (s). Frozen operators
    still do this during sparse-to-dense replay."""

    weight_grad_s: float
    """Weight-gradient part of the backward pass of one micro-batch (s). Frozen operators skip
    it during replay."""

    optimizer_s: float = 0.0
    """Optimizer step of the stage, once per iteration (s)."""

    grad_sync_s: float = 0.0
    """Data-parallel gradient all-reduce/reduce-scatter time left exposed after overlap, once
    per iteration (s)."""

    p2p_s: float = 0.0
    """Send/receive time at the stage boundary per micro-batch and direction (s)."""

    def __post_init__(self) -> None:
        for name in ("forward_s", "backward_s", "weight_grad_s"):
            check_real("StageTimes", name, getattr(self, name), strict=False)
        for name in ("optimizer_s", "grad_sync_s", "p2p_s"):
            check_real("StageTimes", name, getattr(self, name), strict=False)

    @property
    def microbatch_s(self) -> float:
        """Forward plus full backward of one micro-batch including boundary communication."""
        return self.forward_s + self.backward_s + self.weight_grad_s + 2.0 * self.p2p_s

    @property
    def step_s(self) -> float:
        """Per-iteration tail of the stage: optimizer step plus exposed gradient sync."""
        return self.optimizer_s + self.grad_sync_s

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StageTimes":
        """Builds stage times from a dict."""
        return from_mapping(cls, data)


@dataclass(frozen=True)
class StageProfile:
    """Per-stage costs of a model under one parallel plan (loadable from JSON)."""

    stages: Tuple[StageTimes, ...]
    """Costs of each pipeline stage, first stage first; its length is the pipeline depth."""

    micro_batch_size: int = 1
    """Samples per micro-batch the times were taken with."""

    seq_length: int = 1
    """Sequence length the times were taken with."""

    source: str = "given"
    """Where the numbers come from: ``"measured"``, ``"analytic"`` or ``"given"``."""

    metadata: Dict[str, Any] = dataclasses.field(default_factory=dict)
    """Free-form provenance (device, tool, date, model name ...)."""

    def __post_init__(self) -> None:
        stages = tuple(
            s if isinstance(s, StageTimes) else StageTimes.from_dict(s) for s in self.stages
        )
        object.__setattr__(self, "stages", stages)
        if not stages:
            raise SimSpecError("StageProfile.stages is empty. Fix: give one entry per stage.")
        check_int("StageProfile", "micro_batch_size", self.micro_batch_size)
        check_int("StageProfile", "seq_length", self.seq_length)
        if self.source not in PROFILE_SOURCES:
            raise SimSpecError(
                f"StageProfile.source={self.source!r} is invalid. Fix: use one of "
                f"{list(PROFILE_SOURCES)}."
            )

    @property
    def num_stages(self) -> int:
        """Pipeline depth."""
        return len(self.stages)

    def to_dict(self) -> Dict[str, Any]:
        """Returns the JSON document (with ``schema`` and ``version``)."""
        return {
            "schema": PROFILE_SCHEMA_NAME,
            "version": PROFILE_SCHEMA_VERSION,
            "source": self.source,
            "micro_batch_size": self.micro_batch_size,
            "seq_length": self.seq_length,
            "stages": [dataclasses.asdict(s) for s in self.stages],
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StageProfile":
        """Parses a profile JSON document.

        Raises:
            SimSpecError: If the schema name/version is wrong or a field is invalid.
        """
        if not isinstance(data, Mapping):
            raise SimSpecError(f"profile must be a JSON object, got {type(data).__name__}")
        if data.get("schema") != PROFILE_SCHEMA_NAME:
            raise SimSpecError(
                f"profile schema is {data.get('schema')!r}, expected {PROFILE_SCHEMA_NAME!r}"
            )
        version = data.get("version")
        if version != PROFILE_SCHEMA_VERSION:
            raise SimSpecError(
                f"profile version {version!r} is not supported (this simulator reads version "
                f"{PROFILE_SCHEMA_VERSION})"
            )
        body = {k: v for k, v in data.items() if k not in ("schema", "version")}
        if not isinstance(body.get("stages"), Sequence) or isinstance(body.get("stages"), str):
            raise SimSpecError("profile 'stages' must be a list of stage objects")
        body["stages"] = tuple(StageTimes.from_dict(s) for s in body["stages"])
        return from_mapping(cls, body)


PROFILE_JSON_SCHEMA: Dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "MoEvement simulator stage profile",
    "type": "object",
    "required": ["schema", "version", "stages"],
    "additionalProperties": False,
    "properties": {
        "schema": {"const": PROFILE_SCHEMA_NAME},
        "version": {"const": PROFILE_SCHEMA_VERSION},
        "source": {"enum": list(PROFILE_SOURCES)},
        "micro_batch_size": {"type": "integer", "minimum": 1},
        "seq_length": {"type": "integer", "minimum": 1},
        "metadata": {"type": "object"},
        "stages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["forward_s", "backward_s", "weight_grad_s"],
                "additionalProperties": False,
                "properties": {
                    name: {"type": "number", "minimum": 0}
                    for name in (
                        "forward_s",
                        "backward_s",
                        "weight_grad_s",
                        "optimizer_s",
                        "grad_sync_s",
                        "p2p_s",
                    )
                },
            },
        },
    },
}
"""JSON Schema (draft 2020-12) of a profile file, for external tools and profilers."""


def load_profile(path: Union[str, Path]) -> StageProfile:
    """Reads a :class:`StageProfile` from a JSON file.

    Args:
        path: File written by :func:`save_profile` or by a profiler following
            :data:`PROFILE_JSON_SCHEMA`.

    Raises:
        SimSpecError: If the file is not valid JSON or not a valid profile.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SimSpecError(f"profile {path} is not valid JSON: {exc}") from exc
    profile = StageProfile.from_dict(data)
    logger.debug("loaded %d-stage %s profile from %s", profile.num_stages, profile.source, path)
    return profile


def save_profile(profile: StageProfile, path: Union[str, Path]) -> Path:
    """Writes ``profile`` as JSON to ``path`` (parents created) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def uniform_profile(
    num_stages: int,
    num_microbatches: int,
    iteration_time_s: float,
    optimizer_fraction: float = 0.02,
    micro_batch_size: int = 1,
    seq_length: int = 1,
) -> StageProfile:
    """Builds a profile of identical stages whose 1F1B iteration takes ``iteration_time_s``.

    Used when only an iteration time is known (the paper reports overheads in seconds and in
    percent of the iteration, which gives the iteration time). Forward, input-gradient and
    weight-gradient times are taken equal (backward = 2x forward).

    Args:
        num_stages: Pipeline depth p.
        num_microbatches: Micro-batches per iteration m.
        iteration_time_s: Target iteration time (s).
        optimizer_fraction: Share of the iteration spent in the optimizer step.
        micro_batch_size: Recorded in the profile.
        seq_length: Recorded in the profile.
    """
    check_real("uniform_profile", "iteration_time_s", iteration_time_s)
    pipe = iteration_time_s * (1.0 - optimizer_fraction)
    per_mb = pipe / (num_microbatches + num_stages - 1)
    stage = StageTimes(
        forward_s=per_mb / 3,
        backward_s=per_mb / 3,
        weight_grad_s=per_mb / 3,
        optimizer_s=iteration_time_s * optimizer_fraction,
    )
    return StageProfile(
        stages=(stage,) * num_stages,
        micro_batch_size=micro_batch_size,
        seq_length=seq_length,
        source="given",
        metadata={"iteration_time_s": iteration_time_s},
    )
