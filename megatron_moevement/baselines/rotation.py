"""MoC-System's round-robin rotation of experts over checkpoints (pure functions).

Each checkpoint captures the non-expert state and one *group* of experts of every layer. With
``k`` experts per group (the configured fraction of a layer's experts, at least one) there are
``n = ceil(E / k)`` groups; expert ``e`` belongs to group ``e % n`` (strided, so that the experts
of one group are spread over the expert-parallel ranks, which hold contiguous expert ranges), and
checkpoint (window) ``w`` captures group ``w % n``.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, Optional

__all__ = [
    "experts_per_group",
    "group_of_expert",
    "group_of_window",
    "latest_capture",
    "num_groups",
]


def experts_per_group(num_experts: int, fraction: float) -> int:
    """Experts of a layer captured per checkpoint: ``round(fraction * E)``, at least 1."""
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts} must be >= 1")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must lie in (0, 1]")
    return min(num_experts, max(1, round(fraction * num_experts)))


def num_groups(num_experts: int, fraction: float) -> int:
    """Checkpoints needed to capture every expert once: ``ceil(E / k)``."""
    return math.ceil(num_experts / experts_per_group(num_experts, fraction))


def group_of_expert(expert: int, groups: int) -> int:
    """Group of global expert id ``expert`` (strided assignment)."""
    return expert % groups


def group_of_window(window: int, groups: int) -> int:
    """Group of experts that checkpoint (window) number ``window`` captures."""
    return window % groups


def latest_capture(
    group: int, window: int, groups: int, available: Optional[Iterable[int]] = None
) -> Optional[int]:
    """Number of the newest checkpoint at or before ``window`` that captured ``group``.

    Args:
        group: Expert group.
        window: Checkpoint recovery restores from (the newest persisted one).
        groups: Number of groups ``n``.
        available: Checkpoints still held; ``None`` assumes every number ``>= 0``.

    Returns:
        The checkpoint number, or ``None`` when no held checkpoint captured the group yet (its
        experts then keep their initial state).
    """
    held = None if available is None else set(available)
    g = window - ((window - group) % groups)
    while g >= 0:
        if held is None or g in held:
            return g
        if held is not None and g < min(held, default=0):
            return None
        g -= groups
    return None


def captures_by_group(
    window: int, groups: int, available: Optional[Iterable[int]] = None
) -> Dict[int, Optional[int]]:
    """:func:`latest_capture` of every group."""
    held = None if available is None else sorted(set(available))
    return {j: latest_capture(j, window, groups, held) for j in range(groups)}
