"""Argument checks shared by every public function: a wrong value fails at once, naming itself and the fix.

Pure (no model): numbers are checked for type and range, so a NaN, an infinity, a float step count or a negative
batch size never reaches a loop where it would silently disable or reverse the method.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from .errors import EdgePruneError


def integer(name: str, value: Any, minimum: int | None = None) -> int:
    """An int (bools and floats refused: ``steps=2.5`` is a typo, not 2 steps)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise EdgePruneError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise EdgePruneError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def real(name: str, value: Any, *, low: float | None = None, high: float | None = None,
         low_open: bool = False, hint: str = "") -> float:
    """A finite real number in [low, high] (``low_open``: (low, high])."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise EdgePruneError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise EdgePruneError(f"{name} must be finite, got {value}{hint}")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        left = "(" if low_open else "["
        low_s = "-inf" if low is None else f"{low:g}"
        high_s = "inf)" if high is None else f"{high:g}]"
        raise EdgePruneError(f"{name} must lie in {left}{low_s}, {high_s}, got {value:g}{hint}")
    return value


def positive(name: str, value: Any, hint: str = "") -> float:
    return real(name, value, low=0.0, low_open=True, hint=hint)


def choice(name: str, value: Any, options: tuple[str, ...]) -> str:
    if value not in options:
        raise EdgePruneError(f"{name} must be one of {options}, got {value!r}")
    return value
