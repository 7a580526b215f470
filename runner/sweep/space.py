"""A sweep's parameter space: grid ranges, value lists and random distributions.

In JSON a space maps each parameter name to one dimension, tagged by ``type``::

    {"fast": {"type": "range", "start": 5, "stop": 30, "step": 5},
     "ma":   {"type": "values", "values": ["sma", "ema"]},
     "lr":   {"type": "random", "low": 0.001, "high": 0.1, "kind": "log"}}

A ``range`` follows Python's ``range``: ``stop`` is excluded, ``step`` may be negative,
floats are allowed. A ``random`` dimension is sampled by the coordinator (both ends
included for ``kind="int"``). On the command line the same forms are
``name=start:stop[:step]``, ``name=v1,v2,...`` and ``name=low:high[:kind]``.

A grid is the cartesian product of the dimensions in the order they are given, the last
one varying fastest (as :func:`itertools.product`).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Iterator, Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from runner.errors import KtrdrRunnerError, describe_validation_error
from runner.sweep.constraint import Constraint

PARAM_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
MAX_PARAMS = 16
#: The most values one grid dimension may hold.
MAX_VALUES = 100_000
#: The largest cartesian product a grid may have before a constraint filters it.
MAX_COMBINATIONS = 1_000_000
# Float ranges are rounded to this many significant digits of the range's own scale, so
# 0.1 steps give 0.3, not 0.30000000000000004, and -0.3 + 3 * 0.1 gives 0.0.
_DIGITS = 12

Number = int | float
Scalar = bool | int | float | str
ParamName = Annotated[str, Meta(pattern=PARAM_PATTERN)]


class SpaceError(KtrdrRunnerError, ValueError):
    """A parameter space, or one of its command-line forms, is wrong; ``param`` names it."""

    def __init__(self, param: str, problem: str) -> None:
        self.param = param
        self.problem = problem
        super().__init__(f"parameter {param!r}: {problem}" if param else problem)


def _finite(value: Number, what: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")


def _tidy(value: float, scale: float) -> float:
    digits = _DIGITS - 1 - math.floor(math.log10(scale)) if scale > 0 else _DIGITS
    return round(value, digits) + 0.0  # + 0.0 turns -0.0 into 0.0


class Range(msgspec.Struct, tag="range", tag_field="type", frozen=True, forbid_unknown_fields=True):
    """``start, start + step, ...`` up to ``stop`` excluded, as Python's ``range``.

    Integers give integers (exactly ``range(start, stop, step)``); any float makes the
    values floats ``start + i * step``, rounded to 12 significant digits of the range's
    scale. ``step`` may be negative, never zero; the range must hold at least one value.
    """

    start: Number
    stop: Number
    step: Number = 1

    def __post_init__(self) -> None:
        for what in ("start", "stop", "step"):
            _finite(getattr(self, what), what)
        if self.step == 0:
            raise ValueError("step must not be zero")
        count = self.count()
        if count < 1:
            direction = "below" if self.step > 0 else "above"
            raise ValueError(
                f"range {self.start}:{self.stop}:{self.step} is empty (start must be {direction} "
                "stop; stop is excluded)"
            )
        if count > MAX_VALUES:
            raise ValueError(f"range {self.start}:{self.stop}:{self.step} has more than {MAX_VALUES} values")

    def _integral(self) -> bool:
        return all(isinstance(v, int) for v in (self.start, self.stop, self.step))

    def count(self) -> int:
        """How many values the range holds."""
        if self._integral():
            return len(range(int(self.start), int(self.stop), int(self.step)))
        ratio = (self.stop - self.start) / self.step
        if not math.isfinite(ratio) or ratio > MAX_VALUES:
            return MAX_VALUES + 1
        # A ratio a rounding error above an integer must not add a value at the stop.
        return max(0, math.ceil(ratio - 1e-9))

    def values(self) -> list[Number]:
        """The values, in order."""
        if self._integral():
            return list(range(int(self.start), int(self.stop), int(self.step)))
        start, step = float(self.start), float(self.step)
        scale = max(abs(start), abs(float(self.stop)), abs(step))
        return [_tidy(start + i * step, scale) for i in range(self.count())]


class Values(msgspec.Struct, tag="values", tag_field="type", frozen=True, forbid_unknown_fields=True):
    """An explicit list of values (numbers, booleans or strings), each at most once."""

    values: Annotated[list[Scalar], Meta(min_length=1, max_length=MAX_VALUES)]

    def __post_init__(self) -> None:
        seen: set[tuple[str, Scalar]] = set()
        for value in self.values:
            if isinstance(value, float):
                _finite(value, "a value")
            key = (type(value).__name__, value)
            if key in seen:
                raise ValueError(f"the value {value!r} is listed twice")
            seen.add(key)

    def count(self) -> int:
        """How many values the list holds."""
        return len(self.values)


class Random(msgspec.Struct, tag="random", tag_field="type", frozen=True, forbid_unknown_fields=True):
    """A distribution the coordinator samples: uniform over ``[low, high]`` (``int``:
    integers, both ends included; ``float``), or log-uniform (``log``, ``low > 0``)."""

    low: Number
    high: Number
    kind: Literal["int", "float", "log"] = "float"

    def __post_init__(self) -> None:
        _finite(self.low, "low")
        _finite(self.high, "high")
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.kind == "int" and not (isinstance(self.low, int) and isinstance(self.high, int)):
            raise ValueError(f"kind 'int' needs integer bounds, got {self.low}:{self.high}")
        if self.kind == "log" and self.low <= 0:
            raise ValueError(f"kind 'log' needs low > 0, got {self.low}")


Dimension = Range | Values | Random
ParamSpace = Annotated[dict[ParamName, Dimension], Meta(min_length=1, max_length=MAX_PARAMS)]
GridDimension = Range | Values


def parse_space(raw: Mapping[str, Any]) -> dict[str, Dimension]:
    """Validate a JSON-shaped space (name to tagged dimension); SpaceError names the param."""
    if not 1 <= len(raw) <= MAX_PARAMS:
        raise SpaceError("", f"a space needs 1 to {MAX_PARAMS} parameters, got {len(raw)}")
    space: dict[str, Dimension] = {}
    for name, value in raw.items():
        if not (isinstance(name, str) and re.fullmatch(PARAM_PATTERN, name)):
            raise SpaceError(
                str(name), "is not a valid parameter name (letters, digits and _, not first a digit)"
            )
        try:
            space[name] = msgspec.convert(value, Dimension)
        except msgspec.ValidationError as exc:
            field, problem = describe_validation_error(exc)
            raise SpaceError(name, f"{field}: {problem}" if field else problem) from None
    return space


# --- command-line forms ------------------------------------------------------------------


def _assignment(text: str, form: str) -> tuple[str, str]:
    name, sep, rest = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise SpaceError("", f"{text!r}: expected {form}")
    if not re.fullmatch(PARAM_PATTERN, name):
        raise SpaceError(name, "is not a valid parameter name (letters, digits and _, not first a digit)")
    if not rest.strip():
        raise SpaceError(name, f"{text!r} has nothing after '='; expected {form}")
    return name, rest.strip()


def _number(token: str, param: str, what: str) -> Number:
    token = token.strip()
    try:
        return int(token)
    except ValueError:
        pass
    try:
        number = float(token)
    except ValueError:
        raise SpaceError(param, f"{what} {token!r} is not a number") from None
    if not math.isfinite(number):
        raise SpaceError(param, f"{what} {token!r} is not a finite number")
    return number


def _scalar(token: str, param: str) -> Scalar:
    token = token.strip()
    if not token:
        raise SpaceError(param, "a value in the list is empty (two commas in a row, or a trailing comma)")
    try:
        value = json.loads(token)
    except ValueError:
        return token  # a bare word: a string
    return _plain(value, token, param)


def _plain(value: Any, token: str, param: str) -> Scalar:
    if not isinstance(value, bool | int | float | str):
        raise SpaceError(param, f"the value {token} is not a number, boolean or string")
    return value


def _values(rest: str, param: str) -> Values:
    try:
        parsed = json.loads(f"[{rest}]")
    except ValueError:  # bare words: split on commas, read each on its own
        items = [_scalar(token, param) for token in rest.split(",")]
    else:
        items = [_plain(v, json.dumps(v), param) for v in parsed]
    try:
        return Values(items)
    except ValueError as exc:
        raise SpaceError(param, str(exc)) from None


GRID_FORM = "name=start:stop[:step] or name=v1,v2,..."
RANDOM_FORM = "name=low:high[:int|float|log]"


def parse_grid_arg(text: str) -> tuple[str, GridDimension]:
    """Parse ``name=start:stop[:step]`` (a :class:`Range`) or ``name=v1,v2,...`` (a
    :class:`Values` list; each value read as JSON, a bare word as a string)."""
    name, rest = _assignment(text, GRID_FORM)
    if ":" in rest and "," not in rest and not rest.startswith('"'):
        parts = rest.split(":")
        if len(parts) not in (2, 3):
            raise SpaceError(name, f"{rest!r}: expected start:stop or start:stop:step")
        labels = ("start", "stop", "step")
        numbers = [_number(p, name, label) for p, label in zip(parts, labels, strict=False)]
        try:
            return name, Range(*numbers)
        except ValueError as exc:
            raise SpaceError(name, str(exc)) from None
    return name, _values(rest, name)


def parse_random_arg(text: str) -> tuple[str, Random]:
    """Parse ``name=low:high[:kind]``; without a kind, integer bounds mean ``int``."""
    name, rest = _assignment(text, RANDOM_FORM)
    parts = rest.split(":")
    if len(parts) not in (2, 3):
        raise SpaceError(name, f"{rest!r}: expected {RANDOM_FORM.partition('=')[2]}")
    low, high = _number(parts[0], name, "low"), _number(parts[1], name, "high")
    kind = parts[2].strip() if len(parts) == 3 else None
    if kind is None:
        kind = "int" if isinstance(low, int) and isinstance(high, int) else "float"
    kinds: dict[str, Literal["int", "float", "log"]] = {"int": "int", "float": "float", "log": "log"}
    if kind not in kinds:
        raise SpaceError(name, f"kind {kind!r} is not one of int, float, log")
    if kind in ("float", "log"):
        low, high = float(low), float(high)
    try:
        return name, Random(low, high, kinds[kind])
    except ValueError as exc:
        raise SpaceError(name, str(exc)) from None


# --- grids -------------------------------------------------------------------------------


def grid_values(name: str, dimension: Dimension) -> list[Scalar]:
    """The values a grid takes for one dimension; SpaceError for a random one."""
    if isinstance(dimension, Random):
        raise SpaceError(
            name, "is a random distribution; a grid needs a range (start:stop:step) or a list of values"
        )
    return list(dimension.values) if isinstance(dimension, Values) else list(dimension.values())


def grid_size(space: Mapping[str, Dimension]) -> int:
    """The size of the cartesian product, before any constraint."""
    return math.prod(len(grid_values(name, d)) for name, d in space.items())


def iter_grid(space: Mapping[str, Dimension]) -> Iterator[dict[str, Scalar]]:
    """Every combination of the grid, in order (the last parameter varies fastest)."""
    names = list(space)
    axes = [grid_values(name, space[name]) for name in names]
    for combo in itertools.product(*axes):
        yield dict(zip(names, combo, strict=True))


def check_grid_size(space: Mapping[str, Dimension]) -> int:
    """The grid's size; SpaceError when it is over :data:`MAX_COMBINATIONS`."""
    size = grid_size(space)
    if size > MAX_COMBINATIONS:
        shape = " x ".join(f"{len(grid_values(n, d))} {n}" for n, d in space.items())
        raise SpaceError("", f"the grid has {size:,} combinations ({shape}), more than {MAX_COMBINATIONS:,}")
    return size


def over_cap(cap: int) -> SpaceError:
    """The error for a grid with more than ``cap`` combinations left to run."""
    return SpaceError(
        "", f"the grid has more than {cap:,} combinations to run (the cap); narrow it or raise the cap"
    )


def grid(
    space: Mapping[str, Dimension], *, constraint: Constraint | None = None, cap: int | None = None
) -> list[dict[str, Scalar]]:
    """Every combination of the grid that satisfies ``constraint``, in order.

    The grid is enumerated exactly, never sampled: when more than ``cap`` combinations
    would be left, SpaceError says so instead of running a part of it. The product
    itself may not exceed :data:`MAX_COMBINATIONS`.
    """
    check_grid_size(space)
    out: list[dict[str, Scalar]] = []
    for combo in iter_grid(space):
        if constraint is not None and not constraint.holds(combo):
            continue
        if cap is not None and len(out) >= cap:
            raise over_cap(cap)
        out.append(combo)
    return out
