"""Numbers read from text: command-line options, MLflow params, stored files. One parser for
integers and one for floats, so a number gptx reads back is checked the way a typed one is.

Python's own ``int()`` and ``float()`` take more than anyone types on purpose (``'²'.isdigit()``
is true but ``int('²')`` fails; ``int('٣')`` is 3; ``int('1_0')`` is 10; ``float('nan')``), and
take no range: a step beyond int64 or a float that overflows to infinity breaks later, far from
the file or option that held it. Here: ASCII digits only, one optional sign, a range, and one
line naming the option or file when anything is off.
"""
from __future__ import annotations

import math
import re
from typing import Optional

from gptx.errors import GptxError

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
MAX_TEXT = 100  # longer text is no number anyone typed; and int() of 5,000 digits is refused anyway
_INT = re.compile(r"[+-]?[0-9]+", re.ASCII)
_FLOAT = re.compile(r"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|nan|inf|infinity)", re.ASCII | re.IGNORECASE)


class NumberError(GptxError):
    """A number that did not parse or is out of range: ``what: problem``; ``problem`` alone for
    callers (Click types) that name the option themselves."""

    def __init__(self, what: str, problem: str):
        self.what, self.problem = what, problem
        super().__init__(f"{what}: {problem}" if what else problem)


def shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_int(value, what: str = "", low: Optional[int] = INT64_MIN, high: Optional[int] = INT64_MAX) -> int:
    """An integer in [low, high] from an int or from text (ASCII digits, one optional sign,
    surrounding blanks ignored); NumberError otherwise. A bool or a float is not an integer.
    ``low``/``high`` None: no bound here (the caller checks the range and names it its way)."""
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and len(value) <= MAX_TEXT and _INT.fullmatch(value.strip()):
        number = int(value.strip())
    else:
        raise NumberError(what, f"expected an integer, got {shown(value)}")
    if (low is not None and number < low) or (high is not None and number > high):
        raise NumberError(what, f"must be from {low} to {high}, got {number}")
    return number


def parse_float(value, what: str = "", low: float = -math.inf, high: float = math.inf,
                low_open: bool = False, high_open: bool = False) -> float:
    """A finite number in [low, high] (``low_open``/``high_open``: the bound excluded) from an
    int, a float or ASCII decimal text; NaN, infinity and anything that overflows to it are
    NumberErrors, and text is only what a person types ('1_0' and '١' are refused)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond the float range
            number = math.inf
    elif isinstance(value, str) and len(value) <= MAX_TEXT and _FLOAT.fullmatch(value.strip()):
        number = float(value.strip())
    else:
        raise NumberError(what, f"expected a number, got {shown(value)}")
    above = number > low if low_open else number >= low
    below = number < high if high_open else number <= high
    if not (math.isfinite(number) and above and below):
        if math.isinf(low) and math.isinf(high):
            raise NumberError(what, f"must be a finite number, got {value}")
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise NumberError(what, f"must be a finite number in {left}{low:g}, {high:g}{right}, got {value}")
    return number


def int_or_none(value, low: int = INT64_MIN, high: int = INT64_MAX) -> Optional[int]:
    """``parse_int(value)``, or None where it would refuse: for a value read back that may be
    missing or foreign (a run's seed param) and whose absence the caller handles."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)  # MLflow keeps every metric as a float: num_params 12345.0
    try:
        return parse_int(value, "", low, high)
    except NumberError:
        return None


def number_or_none(value) -> Optional[float]:
    """A stored result as a float (NaN and infinity kept: a diverged run says so), or None when it
    is no number (text, a bool) or an integer beyond the float range."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def float_or_none(value) -> Optional[float]:
    """``parse_float(value)``, or None where it would refuse (NaN, infinity, text, a bool)."""
    try:
        return parse_float(value)
    except NumberError:
        return None


def env_int(name: str, default: int, low: int = 0, high: int = 1 << 20) -> int:
    """An integer environment variable (torchrun's RANK, WORLD_SIZE, LOCAL_RANK): unset is
    ``default``; anything else must parse, or it is one line naming the variable."""
    import os

    raw = os.environ.get(name)
    return default if raw is None else parse_int(raw, f"${name}", low, high)
