"""A complete simulator input: model, cluster, parallel plan and a source of stage timings.

Timings come from exactly one of three sources:

* ``profile``: a :class:`~megatron_moevement.sim.profile.StageProfile` (measured, e.g. by the
  profiler running the real Megatron model, or written by hand);
* ``iteration_time_s``: a known iteration time, spread over identical stages
  (:func:`~megatron_moevement.sim.profile.uniform_profile`);
* ``compute``: achieved TFLOP/s for the analytic estimator
  (:func:`~megatron_moevement.sim.estimator.estimate_profile`), for configurations too large to
  profile.

JSON spec file layout (``sim`` is optional and overrides :class:`SimulationConfig` fields)::

    {
      "name": "my-job",
      "model":   {...ModelSpec fields..., "precision": "bf16-fp32"},
      "cluster": {...ClusterSpec fields, bandwidths as numbers (B/s) or "80Gbps"...},
      "plan":    {...ParallelPlan fields...},
      "compute": {"tflops_per_gpu": 140}          # or "profile": {...} / "profile_path": "p.json"
                                                  # or "iteration_time_s": 2.9
      "sim":     {"restart_s": 10}
    }
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

from megatron_moevement.sim._validation import SimSpecError, check_real
from megatron_moevement.sim.config import SimulationConfig
from megatron_moevement.sim.estimator import ComputeSpec, estimate_profile
from megatron_moevement.sim.profile import StageProfile, load_profile, uniform_profile
from megatron_moevement.sim.specs import ClusterSpec, ModelSpec, ParallelPlan

__all__ = ["Scenario", "load_scenario_file"]

_KNOWN_KEYS = {
    "name",
    "model",
    "cluster",
    "plan",
    "profile",
    "profile_path",
    "compute",
    "iteration_time_s",
    "description",
    "reference",
    "sim",
}


@dataclass(frozen=True)
class Scenario:
    """One training job to simulate."""

    name: str
    """Label used in reports and file names."""

    model: ModelSpec
    """Architecture and precision."""

    cluster: ClusterSpec
    """Hardware."""

    plan: ParallelPlan
    """Parallelization; ``plan.num_gpus`` must equal ``cluster.num_gpus``."""

    profile: Optional[StageProfile] = None
    """Per-stage timings (measured or given); one of the three timing sources."""

    compute: Optional[ComputeSpec] = None
    """Achieved TFLOP/s for the analytic estimator; one of the three timing sources."""

    iteration_time_s: Optional[float] = None
    """Known fault-free iteration time (s); one of the three timing sources."""

    description: str = ""
    """Free text shown in reports."""

    reference: str = ""
    """Where the configuration comes from (e.g. a section of the paper)."""

    def __post_init__(self) -> None:
        sources = [
            x is not None for x in (self.profile, self.compute, self.iteration_time_s)
        ].count(True)
        if sources != 1:
            raise SimSpecError(
                f"Scenario {self.name!r} needs exactly one timing source (profile, compute or "
                f"iteration_time_s), got {sources}. Fix: give one of them."
            )
        if self.iteration_time_s is not None:
            check_real("Scenario", "iteration_time_s", self.iteration_time_s)
        if self.plan.num_gpus != self.cluster.num_gpus:
            raise SimSpecError(
                f"Scenario {self.name!r}: the plan uses tp*pp*dp*ep = {self.plan.num_gpus} GPUs "
                f"but the cluster has {self.cluster.num_gpus}. Fix: make them equal."
            )
        if self.profile is not None and self.profile.num_stages != self.plan.pp:
            raise SimSpecError(
                f"Scenario {self.name!r}: the profile has {self.profile.num_stages} stages but "
                f"the plan has pp={self.plan.pp}. Fix: profile the same pipeline depth."
            )
        self.plan.stage_layer_counts(self.model.num_layers)  # validates explicit splits

    def stage_profile(self, popularity_skew: float = 0.0) -> StageProfile:
        """The stage timings from whichever source the scenario has."""
        if self.profile is not None:
            return self.profile
        if self.iteration_time_s is not None:
            return uniform_profile(
                self.plan.pp,
                self.plan.num_microbatches,
                self.iteration_time_s,
                micro_batch_size=self.plan.micro_batch_size,
                seq_length=self.model.seq_length,
            )
        assert self.compute is not None
        return estimate_profile(
            self.model, self.cluster, self.plan, self.compute, popularity_skew=popularity_skew
        )

    def to_dict(self) -> Dict[str, Any]:
        """Returns the JSON spec of the scenario."""
        out: Dict[str, Any] = {
            "name": self.name,
            "model": self.model.to_dict(),
            "cluster": self.cluster.to_dict(),
            "plan": self.plan.to_dict(),
            "description": self.description,
            "reference": self.reference,
        }
        if self.profile is not None:
            out["profile"] = self.profile.to_dict()
        if self.compute is not None:
            out["compute"] = self.compute.to_dict()
        if self.iteration_time_s is not None:
            out["iteration_time_s"] = self.iteration_time_s
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base_dir: Optional[Path] = None) -> "Scenario":
        """Builds a scenario from a JSON spec (see the module docstring).

        Args:
            data: Parsed JSON.
            base_dir: Directory that a relative ``profile_path`` is resolved against.
        """
        if not isinstance(data, Mapping):
            raise SimSpecError("scenario spec must be a JSON object")
        unknown = sorted(set(data) - _KNOWN_KEYS)
        if unknown:
            raise SimSpecError(f"scenario spec has unknown key(s) {unknown}")
        for key in ("model", "cluster", "plan"):
            if key not in data:
                raise SimSpecError(f"scenario spec lacks the {key!r} section")
        profile = None
        if data.get("profile") is not None:
            profile = StageProfile.from_dict(data["profile"])
        if data.get("profile_path") is not None:
            if profile is not None:
                raise SimSpecError("give either 'profile' or 'profile_path', not both")
            path = Path(data["profile_path"])
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            profile = load_profile(path)
        compute = ComputeSpec.from_dict(data["compute"]) if data.get("compute") else None
        return cls(
            name=str(data.get("name", "scenario")),
            model=ModelSpec.from_dict(data["model"]),
            cluster=ClusterSpec.from_dict(data["cluster"]),
            plan=ParallelPlan.from_dict(data["plan"]),
            profile=profile,
            compute=compute,
            iteration_time_s=data.get("iteration_time_s"),
            description=str(data.get("description", "")),
            reference=str(data.get("reference", "")),
        )

    def replace(self, **changes: Any) -> "Scenario":
        """Returns a copy with fields replaced (validated again)."""
        return dataclasses.replace(self, **changes)


def load_scenario_file(
    path: Union[str, Path],
) -> Tuple[Scenario, Optional[SimulationConfig]]:
    """Reads a JSON spec file.

    Returns:
        The scenario and, when the file has a ``sim`` section, a :class:`SimulationConfig`
        built from it (else ``None``).

    Raises:
        SimSpecError: If the file is not valid JSON or not a valid spec.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SimSpecError(f"spec file {path} is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise SimSpecError(f"cannot read spec file {path}: {exc}") from exc
    scenario = Scenario.from_dict(data, base_dir=path.parent)
    config = SimulationConfig.from_dict(data["sim"]) if data.get("sim") else None
    return scenario, config
