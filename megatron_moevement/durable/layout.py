"""What a durable checkpoint records about the job that wrote it, and the comparison on load.

A sparse checkpoint is only meaningful on the layout that wrote it: each rank's files hold the
operators (and the data-parallel shards of their optimizer state) that this rank captured. The
:class:`RankLayout` of every rank is stored with its files and compared with the loading job's;
any difference is a :class:`~megatron_moevement.durable.errors.LayoutMismatchError` that names
the differences and the fix.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields

from megatron_moevement.durable.errors import LayoutMismatchError

_SIZES = ("tp", "pp", "dp", "ep")


@dataclass(frozen=True)
class RankLayout:
    """One rank's place in the job and the operators it checkpoints."""

    world_size: int
    rank: int
    tp: int
    """Tensor-parallel size."""
    pp: int
    """Pipeline-parallel size."""
    dp: int
    """Data-parallel size (non-expert parameters)."""
    ep: int
    """Expert-parallel size."""
    pp_rank: int
    dp_rank: int
    ep_rank: int
    expert_dp_size: int
    expert_dp_rank: int
    distributed_optimizer: bool
    operators: tuple[str, ...]
    """Names of this rank's operators (see :mod:`megatron_moevement.state.operators`)."""
    param_signature: str
    """SHA-256 over (operator, parameter, shape, dtype) of every operator parameter: differs when
    the model configuration (sizes, experts, precision) differs."""

    def to_dict(self) -> dict:
        data = asdict(self)
        data["operators"] = list(self.operators)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RankLayout":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["operators"] = tuple(values.get("operators", ()))
        return cls(**values)

    def describe(self) -> str:
        """``world size 4 (tp1 pp2 dp2 ep2)``."""
        sizes = " ".join(f"{name}{getattr(self, name)}" for name in _SIZES)
        return f"world size {self.world_size} ({sizes})"

    def mismatches(self, current: "RankLayout") -> list[str]:
        """Human-readable differences between this (saved) layout and ``current``."""
        out = []
        if self.world_size != current.world_size:
            out.append(f"world size {self.world_size} != {current.world_size}")
        for name in _SIZES:
            saved, now = getattr(self, name), getattr(current, name)
            if saved != now:
                out.append(f"{name} size {saved} != {now}")
        for name in ("rank", "pp_rank", "dp_rank", "ep_rank", "expert_dp_size", "expert_dp_rank"):
            saved, now = getattr(self, name), getattr(current, name)
            if saved != now and not out:
                out.append(f"{name} {saved} != {now}")
        if self.distributed_optimizer != current.distributed_optimizer:
            out.append(
                f"distributed optimizer {'on' if self.distributed_optimizer else 'off'} in the "
                f"checkpoint, {'on' if current.distributed_optimizer else 'off'} in this job"
            )
        if set(self.operators) != set(current.operators):
            missing = sorted(set(self.operators) - set(current.operators))
            extra = sorted(set(current.operators) - set(self.operators))
            out.append(
                f"operator set differs (only in the checkpoint: {_short(missing)}; only in this "
                f"job: {_short(extra)})"
            )
        elif self.param_signature != current.param_signature:
            out.append(
                "parameter shapes or dtypes differ (another model configuration or precision)"
            )
        return out


def _short(names: list[str], limit: int = 6) -> str:
    if not names:
        return "none"
    head = ", ".join(names[:limit])
    return head + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def param_signature(registry) -> str:
    """SHA-256 over the (operator, parameter, shape, dtype) of every parameter of ``registry``."""
    digest = hashlib.sha256()
    for op in registry.operators:
        for p in op.params:
            digest.update(f"{op.name}|{p.name}|{tuple(p.param.shape)}|{p.param.dtype};".encode())
    return digest.hexdigest()


def current_layout(strategy) -> RankLayout:
    """The :class:`RankLayout` of this rank of ``strategy``'s job (needs Megatron's
    ``parallel_state`` initialized, as ``MoEvementStrategy`` does)."""
    from megatron.core import parallel_state as ps

    sharding = strategy.sharding
    return RankLayout(
        world_size=strategy.world_size,
        rank=strategy.rank,
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        dp=sharding.dp_size,
        ep=ps.get_expert_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=sharding.dp_rank,
        ep_rank=ps.get_expert_model_parallel_rank(),
        expert_dp_size=sharding.expert_dp_size,
        expert_dp_rank=sharding.expert_dp_rank,
        distributed_optimizer=bool(sharding.distributed_optimizer),
        operators=tuple(op.name for op in strategy.registry.operators),
        param_signature=param_signature(strategy.registry),
    )


def check_layout(saved: RankLayout, current: RankLayout, path: str) -> None:
    """Raises :class:`LayoutMismatchError` when ``saved`` and ``current`` differ."""
    problems = saved.mismatches(current)
    if not problems:
        return
    raise LayoutMismatchError(
        f"durable MoEvement checkpoint {path} was written by a job with {saved.describe()}, "
        f"this job has {current.describe()}; rank {current.rank}: {'; '.join(problems)}. "
        f"Fix: load it on the layout and model configuration that wrote it "
        f"({saved.describe()}), or convert it to a dense torch_dist checkpoint with "
        f"`moevement-convert {path} OUTPUT_DIR`, which plain Megatron-Core can reshard."
    )


def check_world_size(saved_world_size: int, saved_sizes: dict, world_size: int, path: str) -> None:
    """Raises :class:`LayoutMismatchError` when the loading job's world size differs."""
    if saved_world_size == world_size:
        return
    sizes = " ".join(f"{k}{saved_sizes[k]}" for k in _SIZES if k in saved_sizes)
    raise LayoutMismatchError(
        f"durable MoEvement checkpoint {path} was written by a job with world size "
        f"{saved_world_size} ({sizes}), this job has world size {world_size}. Fix: load it with "
        f"{saved_world_size} ranks on the layout that wrote it, or convert it to a dense "
        f"torch_dist checkpoint with `moevement-convert {path} OUTPUT_DIR`, which plain "
        "Megatron-Core can reshard."
    )
