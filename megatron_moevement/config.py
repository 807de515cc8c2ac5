"""User-facing configuration of MoEvement sparse checkpointing.

:class:`MoEvementConfig` gathers every knob of the sparse-checkpointing policy (window size and
operator ordering, paper §3.5 and Appendix B), of the two-tier in-memory storage (snapshot,
peer replication, optional durable tier) and of upstream logging. It is validated when it is
built: a bad value raises :class:`MoEvementConfigError` naming the field, the value and the fix,
so a misconfigured job fails at startup instead of hours into training.

Example::

    cfg = MoEvementConfig(window_size="auto", ordering="ema", ema_decay=0.95)
    cfg2 = MoEvementConfig.from_dict(cfg.to_dict())
    assert cfg == cfg2
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, NoReturn, Optional, Union

from megatron_moevement.constants import (
    CHECKSUM_ALGORITHMS,
    DEFAULT_CHECKSUM,
    ORDERING_POLICIES,
)

__all__ = [
    "MoEvementConfig",
    "MoEvementConfigError",
]


class MoEvementConfigError(ValueError):
    """Raised for an invalid :class:`MoEvementConfig` value; the message names field and fix."""


def _fail(field_name: str, value: Any, problem: str, fix: str) -> NoReturn:
    raise MoEvementConfigError(
        f"MoEvementConfig.{field_name}={value!r} is invalid: {problem}. Fix: {fix}."
    )


_REGISTERED_ORDERINGS: list = []
"""Names of ordering policies registered at runtime
(:func:`megatron_moevement.schedule.popularity.register_ordering_policy` adds them here)."""


def register_ordering_name(name: str) -> None:
    """Makes ``ordering=name`` valid (called when a custom ordering policy is registered)."""
    if name not in _REGISTERED_ORDERINGS:
        _REGISTERED_ORDERINGS.append(name)


def _known_ordering_policies() -> tuple:
    """Built-in policy names plus every registered one."""
    return tuple(dict.fromkeys((*ORDERING_POLICIES, *_REGISTERED_ORDERINGS)))


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class MoEvementConfig:
    """Configuration of MoEvement sparse checkpointing, replication and upstream logging.

    All fields are validated in ``__post_init__`` (call :meth:`validate` again after mutating
    a field in place, or build a new object with ``dataclasses.replace``).
    """

    ####################
    # sparse checkpointing window and order (paper §3.5, Algorithm 1)
    ####################

    window_size: Union[int, str] = "auto"
    """Sparse checkpointing window W. ``"auto"`` picks the smallest W whose per-iteration
    snapshot fits inside one iteration at the device-to-host bandwidth (paper Algorithm 1);
    an int >= 1 fixes W (a window that does not fit then stalls training, which is logged)."""

    ordering: str = "hard_count"
    """Operator-ordering policy: ``"hard_count"`` (ascending tokens routed, the paper's
    default), ``"soft_count"`` (summed gate probabilities), ``"ema"`` (time-decayed counts) or
    ``"capacity_normalized"`` (tokens / expert capacity). Less popular experts are captured
    first, so popular ones stay frozen longest during sparse-to-dense replay."""

    ema_decay: float = 0.9
    """Decay of the ``"ema"`` policy, in (0, 1): ``ema = decay * ema + (1 - decay) * count``
    per iteration. Larger values remember longer."""

    reorder_threshold: float = 0.10
    """Relative change of an expert's popularity share (``|new - old| / old``) above which the
    expert counts as drifted for the reorder trigger. Must be > 0."""

    reorder_fraction: float = 0.25
    """Fraction of experts, in (0, 1], that must drift past ``reorder_threshold`` before the
    order is recomputed (at the next window boundary)."""

    ####################
    # storage tiers
    ####################

    replication_factor: int = 1
    """Number r >= 0 of peers whose host memory receives a copy of every snapshot slot. 0 keeps
    snapshots only locally (a lost node then needs the durable tier or a global rollback)."""

    ranks_per_node: Optional[int] = None
    """Ranks per node, used to choose replication peers on other nodes. ``None`` reads
    ``LOCAL_WORLD_SIZE`` from the launcher's environment at runtime."""

    host_memory_budget_bytes: Optional[int] = None
    """Host memory (bytes) this rank may use for its own sparse checkpoints (one persisted plus
    one in flight) and the replicas it holds for peers. ``None`` disables the check."""

    d2h_bandwidth_bytes_per_s: Optional[float] = None
    """Assumed device-to-host copy bandwidth (bytes/s) for choosing W. ``None`` measures it on
    the first iterations."""

    iteration_time_s: Optional[float] = None
    """Assumed training iteration time (s) for choosing W. ``None`` measures it."""

    snapshot_budget_fraction: Optional[float] = None
    """Fraction of one iteration that a slot's snapshot may take at the measured bandwidth when
    choosing W. ``None`` picks 1.0 on CUDA (copies run on the copy engine and overlap fully with
    compute) and 0.05 on CPU (copies and checksums run on the same cores that train)."""

    durable_dir: Optional[str] = None
    """Directory for the optional third tier (periodic ``dist_checkpointing`` save). ``None``
    disables the durable tier."""

    durable_interval: Optional[int] = None
    """Iterations between durable saves; required (>= 1) when ``durable_dir`` is set."""

    ####################
    # recovery and integrity
    ####################

    upstream_logging: bool = True
    """Log activations sent downstream and gradients sent upstream at pipeline-stage
    boundaries so that only the failed stage's data-parallel group rolls back (paper §3.4)."""

    recovery_scope: str = "auto"
    """``"auto"``: after a failure only the failed stages' ranks roll back (scoped recovery, fed
    by upstream logs) when the cut allows it, else every rank does; ``"global"``: always roll
    back every rank (the fallback tier; useful to compare)."""

    heartbeat_interval_s: float = 1.0
    """Seconds between two heartbeats of a rank in an elastic job (one driven by
    :class:`~megatron_moevement.recovery.driver.RecoveryDriver`): a background thread of every rank
    writes its key in the job's rendezvous store this often. Must be > 0."""

    heartbeat_timeout_s: float = 10.0
    """Seconds without a heartbeat after which the job's agent declares a rank failed (a hung or
    stopped process, a frozen node) although its process still exists: the agent tells the
    survivors to abort the current iteration and kills the silent process by pid, and recovery
    proceeds as after a crash. Crashes themselves are noticed within milliseconds without it.
    Must be more than twice ``heartbeat_interval_s`` so that one late beat is not a failure."""

    checksum: str = DEFAULT_CHECKSUM
    """Checksum over the raw bytes of every snapshot tensor: ``"crc32c"`` (default, hardware
    CRC32C through the ``crc32c`` package, which releases the GIL: ~15 GB/s, 3.5x zlib's CRC32 on
    the development machine), ``"crc32"`` (zlib, no extra package) or ``"sha256"``
    (cryptographic strength)."""

    snapshot_async: bool = True
    """Overlap the device-to-host snapshot copy with the next iteration's forward/backward.
    ``False`` copies synchronously (simpler to debug, slower)."""

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Checks every field; raises :class:`MoEvementConfigError` on the first bad one."""
        self._validate_window_and_order()
        self._validate_storage()
        self._validate_flags()

    def _validate_window_and_order(self) -> None:
        ws = self.window_size
        if isinstance(ws, str):
            if ws != "auto":
                _fail(
                    "window_size",
                    ws,
                    "the only string accepted is 'auto'",
                    "use window_size='auto' or an integer >= 1",
                )
        elif _is_int(ws):
            if ws < 1:
                _fail(
                    "window_size",
                    ws,
                    "a window must span at least one iteration",
                    "use an integer >= 1 or 'auto'",
                )
            self.window_size = int(ws)
        else:
            _fail(
                "window_size",
                ws,
                f"expected 'auto' or an int, got {type(ws).__name__}",
                "use window_size='auto' or an integer >= 1",
            )

        policies = _known_ordering_policies()
        if not isinstance(self.ordering, str) or self.ordering not in policies:
            _fail(
                "ordering",
                self.ordering,
                "unknown ordering policy",
                f"use one of {', '.join(repr(p) for p in policies)} (or register a custom "
                "policy with megatron_moevement.schedule.popularity.register_ordering_policy)",
            )

        self.ema_decay = self._real_in_range(
            "ema_decay",
            self.ema_decay,
            0.0,
            1.0,
            low_open=True,
            high_open=True,
            fix="use a decay in (0, 1), e.g. 0.9",
        )
        if (
            not _is_real(self.reorder_threshold)
            or not math.isfinite(self.reorder_threshold)
            or self.reorder_threshold <= 0
        ):
            _fail(
                "reorder_threshold",
                self.reorder_threshold,
                "must be a finite number > 0 (a relative change, 0.10 = 10%)",
                "use e.g. reorder_threshold=0.10",
            )
        self.reorder_threshold = float(self.reorder_threshold)
        if self.snapshot_budget_fraction is not None:
            self.snapshot_budget_fraction = self._real_in_range(
                "snapshot_budget_fraction",
                self.snapshot_budget_fraction,
                0.0,
                1.0,
                low_open=True,
                high_open=False,
                fix="use a fraction in (0, 1], or None for the device default",
            )
        self.reorder_fraction = self._real_in_range(
            "reorder_fraction",
            self.reorder_fraction,
            0.0,
            1.0,
            low_open=True,
            high_open=False,
            fix="use a fraction in (0, 1], e.g. 0.25 (25% of experts)",
        )

    def _validate_storage(self) -> None:
        if not _is_int(self.replication_factor) or self.replication_factor < 0:
            _fail(
                "replication_factor",
                self.replication_factor,
                "must be an integer >= 0 (number of peer replicas)",
                "use replication_factor=1 (default) or another integer >= 0",
            )
        self.replication_factor = int(self.replication_factor)

        if self.ranks_per_node is not None:
            if not _is_int(self.ranks_per_node) or self.ranks_per_node < 1:
                _fail(
                    "ranks_per_node",
                    self.ranks_per_node,
                    "must be an integer >= 1 or None",
                    "set it to the number of GPUs per node, or None to read LOCAL_WORLD_SIZE",
                )
            self.ranks_per_node = int(self.ranks_per_node)

        if self.host_memory_budget_bytes is not None:
            if not _is_int(self.host_memory_budget_bytes) or self.host_memory_budget_bytes <= 0:
                _fail(
                    "host_memory_budget_bytes",
                    self.host_memory_budget_bytes,
                    "must be a positive integer number of bytes or None",
                    "pass e.g. 64 * 2**30 for 64 GiB, or None to disable the check",
                )
            self.host_memory_budget_bytes = int(self.host_memory_budget_bytes)

        for name in ("d2h_bandwidth_bytes_per_s", "iteration_time_s"):
            value = getattr(self, name)
            if value is None:
                continue
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                _fail(
                    name,
                    value,
                    "must be a finite number > 0 or None",
                    "pass the assumed value (e.g. 10e9 bytes/s, 1.5 s) or None to measure it",
                )
            setattr(self, name, float(value))

        if self.durable_dir is not None:
            if isinstance(self.durable_dir, os.PathLike):
                self.durable_dir = os.fspath(self.durable_dir)
            if not isinstance(self.durable_dir, str) or not self.durable_dir.strip():
                _fail(
                    "durable_dir",
                    self.durable_dir,
                    "must be a non-empty path or None",
                    "pass a directory path on shared storage, or None to disable the tier",
                )
            if self.durable_interval is None:
                _fail(
                    "durable_interval",
                    None,
                    "durable_dir is set but no interval is given",
                    "set durable_interval to the number of iterations between durable saves "
                    "(>= 1), or set durable_dir=None",
                )
        if self.durable_interval is not None:
            if not _is_int(self.durable_interval) or self.durable_interval < 1:
                _fail(
                    "durable_interval",
                    self.durable_interval,
                    "must be an integer >= 1",
                    "use e.g. durable_interval=1000",
                )
            if self.durable_dir is None:
                _fail(
                    "durable_interval",
                    self.durable_interval,
                    "an interval is set but durable_dir is None, so nothing would be saved",
                    "set durable_dir to a directory, or durable_interval=None",
                )
            self.durable_interval = int(self.durable_interval)

    def _validate_flags(self) -> None:
        if self.recovery_scope not in ("auto", "global"):
            _fail(
                "recovery_scope",
                self.recovery_scope,
                'must be "auto" or "global"',
                'use "auto" (scoped when possible) or "global"',
            )
        for name in ("upstream_logging", "snapshot_async"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                _fail(
                    name,
                    value,
                    f"expected a bool, got {type(value).__name__}",
                    f"use {name}=True or {name}=False",
                )
        for name in ("heartbeat_interval_s", "heartbeat_timeout_s"):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                _fail(
                    name,
                    value,
                    "must be a finite number of seconds > 0",
                    "use e.g. heartbeat_interval_s=1.0 and heartbeat_timeout_s=10.0",
                )
            setattr(self, name, float(value))
        if self.heartbeat_timeout_s <= 2 * self.heartbeat_interval_s:
            _fail(
                "heartbeat_timeout_s",
                self.heartbeat_timeout_s,
                f"must exceed twice heartbeat_interval_s ({self.heartbeat_interval_s:g} s), or a "
                "single late heartbeat would make a healthy rank count as failed",
                f"raise heartbeat_timeout_s above {2 * self.heartbeat_interval_s:g} s or lower "
                "heartbeat_interval_s",
            )
        if not isinstance(self.checksum, str) or self.checksum not in CHECKSUM_ALGORITHMS:
            _fail(
                "checksum",
                self.checksum,
                "unknown checksum algorithm",
                f"use one of {', '.join(repr(a) for a in CHECKSUM_ALGORITHMS)}",
            )

    @staticmethod
    def _real_in_range(
        name: str,
        value: Any,
        low: float,
        high: float,
        *,
        low_open: bool,
        high_open: bool,
        fix: str,
    ) -> float:
        if not _is_real(value) or not math.isfinite(value):
            _fail(name, value, "must be a finite number", fix)
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            _fail(name, value, f"must lie in {interval}", fix)
        return float(value)

    # ------------------------------------------------------------------ (de)serialization

    @property
    def auto_window(self) -> bool:
        """True when the window size is chosen by Algorithm 1 (``window_size == "auto"``)."""
        return self.window_size == "auto"

    def to_dict(self) -> Dict[str, Any]:
        """Returns a JSON-serializable dict of every field (inverse of :meth:`from_dict`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MoEvementConfig":
        """Builds a validated config from a mapping; missing keys take their defaults.

        Raises:
            MoEvementConfigError: on unknown keys (typos) or invalid values.
        """
        if not isinstance(data, Mapping):
            raise MoEvementConfigError(
                f"MoEvementConfig.from_dict expects a mapping, got {type(data).__name__}. "
                "Fix: pass a dict such as the one returned by MoEvementConfig.to_dict()."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise MoEvementConfigError(
                f"MoEvementConfig.from_dict got unknown key(s) {unknown}. Fix: remove or rename "
                f"them; valid keys are {sorted(known)}."
            )
        return cls(**dict(data))
