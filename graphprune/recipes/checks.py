"""The value checks the recipe configs share: numbers in a range, optional counts, named choices.

Example:
    >>> number_in("FinetuneConfig.lr", 1e-3, low=0.0, low_open=True)
    0.001
    >>> number_in("FinetuneConfig.lr", 0, low=0.0, low_open=True)
    Traceback (most recent call last):
    ...
    graphprune.errors.InvalidArgumentError: FinetuneConfig.lr must be a number in (0.0, inf], got 0
"""

from __future__ import annotations

import math

from ..errors import InvalidArgumentError

RECALIBRATIONS = ("shift", "reset")  # BatchNorm statistics after a removal (recipes.norms)


def number_in(name: str, value: object, *, low: float, high: float = math.inf, low_open: bool = False,
              high_open: bool = False) -> float:
    """``value`` as a float once it is a finite number in the range (open or closed at each end)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise InvalidArgumentError(f"{name} must be a number in {left}{low}, {high}{right}, got {value!r}")
    return float(value)


def optional_positive_int(name: str, value: object) -> None:
    """``None`` or an int >= 1 (not a bool)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise InvalidArgumentError(f"{name} must be a positive int or None, got {value!r}")


def check_recalibration(owner: str, value: object) -> None:
    """One of :data:`RECALIBRATIONS`."""
    if value not in RECALIBRATIONS:
        raise InvalidArgumentError(f"{owner}.recalibration must be one of {RECALIBRATIONS}, got {value!r}")
