"""Validated number types for the command lines (argparse ``type=``).

A bare ``type=int`` accepts 0 and negatives, which a tool then either trips over much later or,
worse, replaces by a default. These refuse them at parse time, in argparse's own error format
(``argument --iterations: 0 is invalid; use an integer >= 1``), so the message names the option.
"""

from __future__ import annotations

import argparse
from typing import Callable

__all__ = ["NON_NEGATIVE_INT", "POSITIVE_FLOAT", "POSITIVE_INT", "number"]


def number(kind: type, minimum: float, inclusive: bool = True) -> Callable[[str], float]:
    """An argparse type: a ``kind`` >= ``minimum`` (> when not ``inclusive``); NaN, words and
    out-of-range values are errors that say what is valid."""
    bound = f">= {minimum}" if inclusive else f"> {minimum}"
    what = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is invalid: not a number; use {what} {bound}"
            ) from None
        if value != value or (value < minimum if inclusive else value <= minimum):
            raise argparse.ArgumentTypeError(f"{text} is invalid; use {what} {bound}")
        return value

    parse.__name__ = f"{kind.__name__} {bound}"
    return parse


POSITIVE_INT = number(int, 1)
NON_NEGATIVE_INT = number(int, 0)
POSITIVE_FLOAT = number(float, 0.0, inclusive=False)
