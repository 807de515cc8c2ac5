"""Validation helpers shared by the simulator's dataclasses.

Every spec dataclass of :mod:`megatron_moevement.sim` validates itself in ``__post_init__``
and raises :class:`SimSpecError` naming the class, the field, the bad value and the fix, so a
malformed JSON spec fails with a message that says what to change.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Dict, Mapping, Type, TypeVar

__all__ = ["SimSpecError", "check_int", "check_real", "check_fraction", "from_mapping"]

T = TypeVar("T")


class SimSpecError(ValueError):
    """Raised for an invalid simulator input; the message names the field and the fix."""


def fail(owner: str, field_name: str, value: Any, problem: str, fix: str) -> None:
    """Raises :class:`SimSpecError` with a uniform message."""
    raise SimSpecError(f"{owner}.{field_name}={value!r} is invalid: {problem}. Fix: {fix}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(owner: str, field_name: str, value: Any, minimum: int = 1) -> None:
    """Checks that ``value`` is an int >= ``minimum``."""
    if not _is_int(value):
        fail(owner, field_name, value, "must be an integer", f"use an int >= {minimum}")
    if value < minimum:
        fail(owner, field_name, value, f"must be >= {minimum}", f"use an int >= {minimum}")


def check_real(
    owner: str,
    field_name: str,
    value: Any,
    minimum: float = 0.0,
    strict: bool = True,
    allow_inf: bool = False,
) -> None:
    """Checks that ``value`` is a finite real number > ``minimum`` (>= when not strict)."""
    if not _is_real(value) or math.isnan(value) or (math.isinf(value) and not allow_inf):
        fail(owner, field_name, value, "must be a finite number", "use a number")
    if (strict and value <= minimum) or (not strict and value < minimum):
        relation = ">" if strict else ">="
        fail(
            owner,
            field_name,
            value,
            f"must be {relation} {minimum}",
            f"use a value {relation} {minimum}",
        )


def check_fraction(
    owner: str, field_name: str, value: Any, low_open: bool = False, high_open: bool = False
) -> None:
    """Checks that ``value`` lies in the interval [0, 1] (open ends as requested)."""
    if not _is_real(value) or math.isnan(value):
        fail(owner, field_name, value, "must be a number in [0, 1]", "use a fraction")
    if value < 0 or value > 1 or (low_open and value == 0) or (high_open and value == 1):
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        fail(
            owner, field_name, value, f"must lie in {lo}0, 1{hi}", f"use a fraction in {lo}0, 1{hi}"
        )


def from_mapping(cls: Type[T], data: Mapping[str, Any], nested: Dict[str, Any] | None = None) -> T:
    """Builds dataclass ``cls`` from a mapping, rejecting unknown keys.

    Args:
        cls: The dataclass type to build.
        data: Field values by name (e.g. parsed JSON).
        nested: Optional ``{field_name: builder}``; the builder converts that field's raw value.

    Returns:
        The validated instance.

    Raises:
        SimSpecError: On unknown keys or invalid values.
    """
    if not isinstance(data, Mapping):
        raise SimSpecError(f"{cls.__name__} must be a JSON object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise SimSpecError(
            f"{cls.__name__} got unknown field(s) {unknown}; known fields: {sorted(names)}"
        )
    kwargs = dict(data)
    for key, builder in (nested or {}).items():
        if key in kwargs and kwargs[key] is not None:
            kwargs[key] = builder(kwargs[key])
    try:
        return cls(**kwargs)
    except TypeError as exc:  # missing required fields
        raise SimSpecError(f"{cls.__name__}: {exc}") from exc
