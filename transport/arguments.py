"""Checks of the public API's arguments (create_transport, Sampler's methods), before anything is built: a
wrong type is a TypeError, a value out of range a ValueError, each naming the argument."""
from __future__ import annotations

import math
import numbers
from typing import Any, Iterable, Optional


def check_integer(name: str, value: Any, minimum: int) -> int:
    """An integer (not a bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def check_real(name: str, value: Any, *, minimum: Optional[float] = None, positive: bool = False) -> float:
    """A finite real number (not a bool, not a string): >= minimum, > 0 with positive."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def check_flag(name: str, value: Any) -> bool:
    """A bool (True or False)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """One of choices: another type than theirs is a TypeError, an unknown value a ValueError."""
    choices = list(choices)
    allowed = tuple({type(choice) for choice in choices})
    if not isinstance(value, allowed):
        raise TypeError(f"{name} must be one of {', '.join(map(repr, choices))}, got "
                        f"{type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(str, choices))}")
    return value
