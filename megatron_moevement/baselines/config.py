"""Configuration of the baseline checkpointing policies (:class:`BaselineConfig`).

The baselines run on MoEvement's own machinery (operator registry, snapshot engine, peer
replication, recovery driver); only the policy differs. Storage knobs shared with MoEvement
(replication factor, checksum, ranks per node, bandwidth) stay in
:class:`~megatron_moevement.config.MoEvementConfig`; :class:`BaselineConfig` holds what is
specific to a baseline, and :meth:`BaselineConfig.moevement_config` derives the shared config a
baseline runs with (window of one slot, no upstream logging, global rollback).

Example::

    cfg = BaselineConfig(strategy="gemini", interval=4)
    shared = cfg.moevement_config(MoEvementConfig(replication_factor=1))
    assert shared.window_size == 1 and shared.recovery_scope == "global"
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Dict, Mapping, NoReturn, Tuple

from megatron_moevement.config import MoEvementConfig
from megatron_moevement.constants import BASELINE_STRATEGIES

__all__ = [
    "BASELINE_OVERRIDES",
    "POLICY_FIELDS",
    "BaselineConfig",
    "BaselineConfigError",
]

BASELINE_OVERRIDES: Dict[str, Any] = dict(
    window_size=1, upstream_logging=False, recovery_scope="global"
)
"""The :class:`MoEvementConfig` fields every baseline overrides, and their values: a one-slot
window, no upstream logging, global rollback (see :meth:`BaselineConfig.moevement_config`)."""

POLICY_FIELDS: Dict[str, Tuple[str, ...]] = {"gemini": ("interval",), "moc": ("expert_fraction",)}
"""The :class:`BaselineConfig` policy fields each baseline reads (the others it ignores)."""


class BaselineConfigError(ValueError):
    """An invalid :class:`BaselineConfig` value; the message names the field and the fix."""


def _fail(name: str, value: Any, problem: str, fix: str) -> NoReturn:
    raise BaselineConfigError(f"BaselineConfig.{name}={value!r} is invalid: {problem}. Fix: {fix}.")


@dataclass
class BaselineConfig:
    """Policy of a baseline checkpointing strategy (validated on construction)."""

    strategy: str = "gemini"
    """``"gemini"``: a dense in-memory snapshot (full state of every operator) every
    ``interval`` iterations, replicated to peers; recovery rolls every rank back to it and
    retrains. ``"moc"``: every iteration snapshots all non-expert operators plus a rotating
    subset of each layer's experts (MoC-System); recovery restores each expert from its latest
    snapshot, so the updates since then are lost (lost tokens)."""

    interval: int = 1
    """Gemini: iterations between dense snapshots (>= 1). A snapshot is taken after the
    optimizer step of every iteration ``i`` with ``i % interval == 0`` (so the first one follows
    iteration 0)."""

    expert_fraction: float = 0.25
    """MoC: fraction of each layer's experts captured per checkpoint, in (0, 1]. It is rounded to
    a whole number ``k >= 1`` of experts; expert ``e`` belongs to group ``e % n`` with
    ``n = ceil(num_experts / k)`` groups, and checkpoint ``g`` captures group ``g % n``, so every
    expert is captured once every ``n`` checkpoints. 1.0 captures every expert every time."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks every field; raises :class:`BaselineConfigError` on the first bad one."""
        if self.strategy not in BASELINE_STRATEGIES:
            _fail(
                "strategy",
                self.strategy,
                "unknown baseline",
                f"use one of {', '.join(repr(s) for s in BASELINE_STRATEGIES)}",
            )
        if (
            not isinstance(self.interval, numbers.Integral)
            or isinstance(self.interval, bool)
            or self.interval < 1
        ):
            _fail(
                "interval",
                self.interval,
                "must be an integer >= 1",
                "use e.g. interval=4 (a dense snapshot every 4 iterations)",
            )
        self.interval = int(self.interval)
        value = self.expert_fraction
        if (
            not isinstance(value, numbers.Real)
            or isinstance(value, bool)
            or not math.isfinite(value)
            or not 0.0 < value <= 1.0
        ):
            _fail(
                "expert_fraction",
                value,
                "must be a number in (0, 1]",
                "use e.g. 0.25 (a quarter of each layer's experts per checkpoint)",
            )
        self.expert_fraction = float(value)

    def moevement_config(self, base: MoEvementConfig | None = None) -> MoEvementConfig:
        """The shared config a baseline runs with: ``base``'s storage knobs, a one-slot window,
        no upstream logging and global rollback (baselines roll every rank back)."""
        base = base or MoEvementConfig()
        return dataclasses.replace(base, **BASELINE_OVERRIDES)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict of every field (inverse of :meth:`from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "BaselineConfig":
        """Builds a validated config; unknown keys are rejected with the list of valid ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise BaselineConfigError(
                f"BaselineConfig.from_dict got unknown key(s) {unknown}. Fix: use only "
                f"{sorted(known)}."
            )
        return cls(**dict(data))
