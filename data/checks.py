"""Checks of a dataset reader's arguments, shared by every reader.

A reader is configured as the `data` config group, so a bad argument fails when the reader
is built (before any training) with a message that names its config key `data.<argument>`,
what was expected and what was found: `data.image_noise_std: expected a finite number >= 0,
found inf`. Nothing is silently rounded, clipped or coerced (`seed=1.5` is not seed 1, the
string "false" is not True).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, NoReturn


def fail(name: str, expected: str, found: Any) -> NoReturn:
    """Raise the ValueError every check raises: the key, what was expected, what was found."""
    raise ValueError(f"data.{name}: expected {expected}, found {found!r}")


def is_real(value: Any) -> bool:
    """A finite real number (a bool is not one, though Python counts it as an int)."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def bounds_text(low: float | None, high: float | None, above: bool) -> str:
    """`>= 0`, `> 0` or `in [0, 1]`: the range a number must lie in, as words."""
    if low is not None and high is not None:
        return f" in {'(' if above else '['}{low:g}, {high:g}]"
    if low is not None:
        return f" {'>' if above else '>='} {low:g}"
    return f" <= {high:g}" if high is not None else ""


def real(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    above: bool = False,
) -> float:
    """A finite number in [low, high] (or (low, high] with `above`)."""
    fits = is_real(value)
    fits = fits and (low is None or (value > low if above else value >= low))
    fits = fits and (high is None or value <= high)
    if not fits:
        fail(name, f"a finite number{bounds_text(low, high, above)}", value)
    return float(value)


def probability(name: str, value: Any) -> float:
    """A probability: a number in [0, 1]."""
    return real(name, value, 0.0, 1.0)


def integer(name: str, value: Any, low: int | None = 0) -> int:
    """A whole number >= `low` (counts, sizes, seeds, indices); 2.5 or True is refused."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        fail(name, f"an integer{bounds_text(low, None, False)}", value)
    if low is not None and value < low:
        fail(name, f"an integer{bounds_text(low, None, False)}", value)
    return int(value)


def max_samples(value: Any) -> int | None:
    """`data.max_samples`: null (every sample) or a positive count."""
    return None if value is None else integer("max_samples", value, 1)


def flag(name: str, value: Any, optional: bool = False) -> bool | None:
    """true or false (or null when `optional`): a string such as "false" is refused."""
    if (value is None and optional) or isinstance(value, bool):
        return value
    fail(name, "true or false" + (" or null" if optional else ""), value)


def choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """One of `choices`, of the same type (True is not 1, 1.0 is not 1)."""
    if not any(c == value and type(c) is type(value) for c in choices):
        fail(name, f"one of {list(choices)}", value)
    return value


def numbers_list(name: str, value: Any, length: int, expected: str) -> list[Any]:
    """A list of `length` values (a string is not one)."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or len(value) != length:
        fail(name, expected, value if not isinstance(value, Sequence) else list(value))
    return list(value)


def interval(name: str, value: Any, low: float, high: float) -> tuple[float, float]:
    """[min, max] with low <= min <= max <= high: a range values are drawn from."""
    expected = f"[min, max] with {low:g} <= min <= max <= {high:g}"
    pair = numbers_list(name, value, 2, expected)
    if not all(is_real(v) for v in pair) or not low <= pair[0] <= pair[1] <= high:
        fail(name, expected, pair)
    return float(pair[0]), float(pair[1])


def fractions(value: Any) -> tuple[float, float, float]:
    """`data.fractions`: three positive shares (train, val, test) summing to 1."""
    expected = "3 positive numbers (train, val, test) summing to 1"
    shares = numbers_list("fractions", value, 3, expected)
    if not all(is_real(f) and f > 0 for f in shares) or not math.isclose(sum(shares), 1.0):
        fail("fractions", expected, shares)
    return tuple(float(f) for f in shares)  # type: ignore[return-value]


def image_size(value: Any, optional: bool = False) -> tuple[int, int] | None:
    """`data.image_size`: [height, width] in pixels, or one int for a square (null when
    `optional`)."""
    if value is None and optional:
        return None
    expected = "[height, width] (or one int) of positive integers" + (" or null" * optional)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = [value, value]
    pair = numbers_list("image_size", value, 2, expected)
    if not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in pair
    ):
        fail("image_size", expected, pair)
    return int(pair[0]), int(pair[1])
