"""Typed options: plain TOML tables checked against small dataclasses.

Every config section and every component's options are a ``@dataclass``. ``parse`` turns a
dict from TOML into one, rejecting unknown keys (with a "did you mean"), wrong types and
values that the dataclass's ``__post_init__`` refuses (raise ``ValueError("problem")`` or
``ValueError(("field", "problem"))`` there). Errors carry the dotted key path.

Ranges: a number option declares the values training survives where it is defined, with
``option(default, low=..., high=...)`` (metadata ``"range"``), and ``parse`` refuses anything
outside, before a run creates anything. A float option that declares no range is held to
``|value| <= FLOAT_LIMIT``: finite but absurd values (a weight decay of 1e300) overflow or
diverge only after training has started.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from gptx.errors import ConfigError


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def type_name(tp) -> str:
    if get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in get_args(tp))
    if get_origin(tp) in (list, tuple):
        return f"array of {type_name(get_args(tp)[0])}"
    return {int: "integer", float: "number", bool: "boolean", str: "string", type(None): "none", dict: "table"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


INT64 = 2**63
FLOAT_LIMIT = 1e6  # the largest magnitude a float option may take unless it declares its own range


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a number option accepts: low <= value <= high (``low_open``: low < value,
    ``high_open``: value < high); None leaves a side unbounded."""

    low: float | int | None = None
    high: float | int | None = None
    low_open: bool = False
    high_open: bool = False

    def __str__(self) -> str:
        left = "(-inf" if self.low is None else f"{'(' if self.low_open else '['}{self.low:g}"
        right = "inf)" if self.high is None else f"{self.high:g}{')' if self.high_open else ']'}"
        return f"{left}, {right}"

    def problem(self, value) -> str | None:
        """Why ``value`` is outside, or None."""
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return f"must be in {self} , got {value:g}".replace(" ,", ",") if too_low or too_high else None


def option(default=dataclasses.MISSING, *, low=None, high=None, low_open: bool = False, high_open: bool = False, **metadata):
    """A dataclass field for a number option with the range training survives (see ``Range``)."""
    return dataclasses.field(default=default, metadata=metadata | {"range": Range(low, high, low_open, high_open)})


def range_of(f: dataclasses.Field, tp) -> Range | None:
    """The values option field ``f`` of type ``tp`` accepts: its declared range, else FLOAT_LIMIT
    for a float option; None for other types."""
    declared = f.metadata.get("range")
    if declared is None and (tp is float or float in get_args(tp)):
        return Range(-FLOAT_LIMIT, FLOAT_LIMIT)
    return declared


def _check_range(value, f: dataclasses.Field, tp, key: str) -> None:
    """Raise a ConfigError naming ``key`` when a number lies outside the field's range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    accepted = range_of(f, tp)
    problem = accepted.problem(value) if accepted else None
    if problem:
        raise ConfigError(problem, key)


def _check(value: Any, tp, key: str):
    """Return ``value`` converted to ``tp`` or raise ConfigError naming ``key``. Whatever the
    type, a float must be finite and an integer must fit 64 bits: nothing downstream can run on
    NaN, infinity or 2**70."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"must be a finite number, got {value}", key)
    if isinstance(value, int) and not isinstance(value, bool) and not -INT64 <= value < INT64:
        raise ConfigError(f"{value} is beyond the 64-bit integer range", key)
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in get_args(tp):
            try:
                return _check(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"expected {type_name(tp)}, got {value!r}", key)
    if origin is Literal:
        if value in get_args(tp):
            return value
        choices = ", ".join(repr(a) for a in get_args(tp))
        hint = did_you_mean(value, get_args(tp)) if isinstance(value, str) else ""
        raise ConfigError(f"must be one of {choices}, got {value!r}{hint}", key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected {type_name(tp)}, got {value!r}", key)
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"expected {len(args)} values, got {len(value)}", key)
            return tuple(_check(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        return origin(_check(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return parse(tp, value, key)
        if isinstance(value, tp):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"expected {type_name(tp)}, got {value!r}", key)


def fields_of(cls) -> dict[str, dataclasses.Field]:
    """The settable fields of an options dataclass, by name."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def parse(cls, data: dict | None, prefix: str = ""):
    """Build dataclass ``cls`` from ``data``; every problem is a ConfigError naming its key path."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = fields_of(cls)
    join = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
    for k in data:
        if k not in fields or fields[k].metadata.get("component"):
            raise ConfigError(f"unknown key{did_you_mean(k, fields)}", join(k))
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _check(data[name], hints[name], join(name))
            _check_range(kwargs[name], f, hints[name], join(name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError("required key is missing", join(name))
    try:
        return cls(**kwargs)
    except (TypeError, ArithmeticError) as err:  # a component's own check that did not expect this value
        raise ConfigError(f"invalid value ({type(err).__name__}: {err})", prefix or None) from None
    except ValueError as err:
        detail = err.args[0] if err.args else "invalid value"
        if isinstance(detail, tuple):
            field, problem = detail
            raise ConfigError(problem, join(field)) from None
        raise ConfigError(str(detail), prefix or None) from None


def to_dict(obj) -> dict:
    """Plain-data form of an options dataclass (tuples become lists, for TOML/JSON)."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return {k: plain(v) for k, v in dataclasses.asdict(obj).items()}


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options of a component that takes none."""
