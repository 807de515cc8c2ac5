"""Parsing and formatting of durations and bandwidths used by the simulator's CLI and specs."""

from __future__ import annotations

import re
from typing import Union

from megatron_moevement.sim._validation import SimSpecError

__all__ = ["GB", "GBPS", "GIB", "parse_duration", "format_duration", "parse_bandwidth"]

GB = 1e9
"""Bytes in a (decimal) gigabyte."""

GIB = 2**30
"""Bytes in a gibibyte."""

GBPS = 1e9 / 8
"""Bytes per second in one gigabit per second."""

_DURATION_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0}
_DURATION_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")

_BANDWIDTH_UNITS = {
    "": 1.0,
    "b/s": 1.0,
    "kb/s": 1e3,
    "mb/s": 1e6,
    "gb/s": 1e9,
    "tb/s": 1e12,
    "gbps": GBPS,
    "mbps": 1e6 / 8,
    "tbps": 1e12 / 8,
}


def parse_duration(text: Union[str, float, int]) -> float:
    """Parses ``"2h"``, ``"30m"``, ``"90s"``, ``"600"`` (seconds) or a number into seconds.

    Raises:
        SimSpecError: If the text is not a positive duration.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = _DURATION_RE.match(str(text))
        if not match:
            raise SimSpecError(f"cannot parse duration {text!r}; use e.g. 2h, 30m, 600s or 600")
        unit = match.group(2).lower() or "s"
        if unit not in _DURATION_UNITS:
            raise SimSpecError(
                f"unknown duration unit {unit!r} in {text!r}; use one of {sorted(_DURATION_UNITS)}"
            )
        value = float(match.group(1)) * _DURATION_UNITS[unit]
    if not value > 0:
        raise SimSpecError(f"duration {text!r} must be > 0")
    return value


def format_duration(seconds: float) -> str:
    """Formats seconds compactly: ``7200 -> "2h"``, ``1800 -> "30m"``, ``45 -> "45s"``."""
    if seconds >= 3600 and abs(seconds / 3600 - round(seconds / 3600)) < 1e-9:
        return f"{round(seconds / 3600)}h"
    if seconds >= 60 and abs(seconds / 60 - round(seconds / 60)) < 1e-9:
        return f"{round(seconds / 60)}m"
    return f"{seconds:g}s"


def parse_bandwidth(text: Union[str, float, int]) -> float:
    """Parses ``"80Gbps"``, ``"12.5GB/s"`` or a number (bytes/s) into bytes per second.

    Units are case-insensitive; ``Gbps`` means gigabits per second, ``GB/s`` gigabytes per second.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = re.match(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([a-zA-Z/]*)\s*$", str(text))
        if not match:
            raise SimSpecError(f"cannot parse bandwidth {text!r}; use e.g. 80Gbps or 12.5GB/s")
        unit = match.group(2).lower()
        if unit not in _BANDWIDTH_UNITS:
            raise SimSpecError(
                f"unknown bandwidth unit {match.group(2)!r}; use one of Gbps, Mbps, GB/s, MB/s"
            )
        value = float(match.group(1)) * _BANDWIDTH_UNITS[unit]
    if not value > 0:
        raise SimSpecError(f"bandwidth {text!r} must be > 0")
    return value
