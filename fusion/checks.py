"""Argument checks shared by fusers and heads: fail at construction, naming the argument."""

from __future__ import annotations

import math
import numbers


def positive_int(name: str, value: object, allow_none: bool = False) -> int | None:
    """Integers from configs or numpy counts are fine; bools, floats and values < 1 are not."""
    if value is None and allow_none:
        return None
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        allowed = "a positive integer or None" if allow_none else "a positive integer"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return int(value)


def dropout_rate(value: float, name: str = "dropout") -> float:
    """A dropout probability in [0, 1); a string or bool from a config is not one."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def finite_number(name: str, value: object, minimum: float = 0.0, inclusive: bool = False) -> float:
    """A finite real number > `minimum` (>= with `inclusive`): a learning rate, a weight
    decay. Bools, strings from a config, NaN and Inf are not."""
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < minimum
        or (value == minimum and not inclusive)
    ):
        bound = f"{'>=' if inclusive else '>'} {minimum:g}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)
