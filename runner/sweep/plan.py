"""A parameter space checked against a strategy's params struct, and the grid it yields.

Names must be fields of the strategy's params; each value must fit its field on its own
(type and bounds), so a float step on an integer window is an error before anything runs.
Cross-field rules live in the strategy's params struct (``sma_cross`` needs
``fast < slow``): a combination breaking one is *invalid*. :func:`plan_grid` drops
invalid combinations and counts them, the way it counts those the constraint excludes,
so a grid over ``fast`` and ``slow`` needs no constraint to be runnable.

The strategy registry imports numpy; it is imported inside the functions.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from runner.errors import describe_validation_error
from runner.sweep.constraint import Constraint
from runner.sweep.space import (
    Dimension,
    Random,
    Scalar,
    SpaceError,
    check_grid_size,
    grid_values,
    iter_grid,
    over_cap,
)

if TYPE_CHECKING:
    from runner.backtest.strategies import Strategy

#: How many reasons for invalid combinations a plan keeps, as examples.
EXAMPLES = 3


def strategy_fields(strategy: Strategy) -> dict[str, Any]:
    """The strategy's params fields: name to annotated type."""
    return {f.name: f.type for f in msgspec.structs.fields(strategy.params_type)}


def check_names(names: Iterable[str], strategy: Strategy) -> None:
    """SpaceError for the first name that is not a field of the strategy's params."""
    fields = strategy_fields(strategy)
    for name in names:
        if name not in fields:
            raise SpaceError(
                name,
                f"is not a parameter of strategy {strategy.name}; its parameters are: {', '.join(fields)}",
            )


def _base_type(annotation: Any) -> Any:
    if typing.get_origin(annotation) is typing.Annotated:
        return typing.get_args(annotation)[0]
    return annotation


def _check_value(name: str, annotation: Any, value: Scalar, strategy: Strategy) -> None:
    try:
        msgspec.convert(value, annotation, strict=False)
    except msgspec.ValidationError as exc:
        _, problem = describe_validation_error(exc)
        raise SpaceError(
            name, f"the value {value!r} does not fit strategy {strategy.name}: {problem}"
        ) from None


def check_space(
    space: Mapping[str, Dimension], strategy_name: str, base: Mapping[str, Any] | None = None
) -> Strategy:
    """Check ``space`` against the strategy ``strategy_name`` and return the strategy.

    Raises UnknownStrategy, or SpaceError naming the parameter: not a field of the
    strategy's params, also fixed in ``base`` (the strategy params every combination
    shares), a value that does not fit the field, or a random distribution over a field
    that is not a number (or an integer field sampled as floats).
    """
    from runner.backtest.strategies import get_strategy

    strategy = get_strategy(strategy_name)
    check_names(space, strategy)
    fields = strategy_fields(strategy)
    for name, dimension in space.items():
        if base and name in base:
            raise SpaceError(name, "is both swept and fixed in strategy_params; drop one")
        annotation = fields[name]
        if isinstance(dimension, Random):
            kind = _base_type(annotation)
            if kind not in (int, float):
                raise SpaceError(name, f"a random distribution needs a numeric parameter, {name} is {kind}")
            if kind is int and dimension.kind != "int":
                raise SpaceError(name, f"{name} is an integer: sample it with kind 'int'")
            values: list[Scalar] = [dimension.low, dimension.high]
        else:
            values = grid_values(name, dimension)
        for value in values:
            _check_value(name, annotation, value, strategy)
    return strategy


def invalid_reason(
    strategy: Strategy, combination: Mapping[str, Any], base: Mapping[str, Any] | None = None
) -> str | None:
    """Why the strategy rejects ``combination`` (over ``base``), or None when it accepts it."""
    try:
        strategy.parse_params({**(base or {}), **combination}, strict=False)
    except msgspec.ValidationError as exc:
        where, problem = describe_validation_error(exc)
        return f"{where}: {problem}" if where else problem
    return None


@dataclass(frozen=True, slots=True)
class GridPlan:
    """The combinations a grid sweep runs, and what it left out."""

    combinations: list[dict[str, Scalar]]
    #: The size of the cartesian product.
    total: int
    #: Combinations the constraint excluded.
    excluded: int = 0
    #: Combinations the strategy's own validation rejects (``fast >= slow``).
    invalid: int = 0
    #: The first few reasons for invalid combinations, with their params.
    invalid_examples: list[str] = field(default_factory=list)


def plan_grid(
    space: Mapping[str, Dimension],
    strategy_name: str,
    *,
    base: Mapping[str, Any] | None = None,
    constraint: Constraint | None = None,
    cap: int | None = None,
) -> GridPlan:
    """Enumerate the grid of ``space`` for a strategy: checked, filtered, counted.

    Runs :func:`check_space`, then walks the cartesian product in order, dropping (and
    counting) the combinations ``constraint`` excludes and those the strategy rejects.
    SpaceError when more than ``cap`` combinations are left or none is.
    """
    strategy = check_space(space, strategy_name, base)
    total = check_grid_size(space)
    kept: list[dict[str, Scalar]] = []
    excluded = invalid = 0
    examples: list[str] = []
    for combo in iter_grid(space):
        if constraint is not None and not constraint.holds(combo):
            excluded += 1
            continue
        reason = invalid_reason(strategy, combo, base)
        if reason is not None:
            invalid += 1
            if len(examples) < EXAMPLES:
                examples.append(f"{combo}: {reason}")
            continue
        if cap is not None and len(kept) >= cap:
            raise over_cap(cap)
        kept.append(combo)
    if not kept:
        parts = [f"{total} in the grid"]
        if excluded:
            parts.append(f"{excluded} excluded by the constraint")
        if invalid:
            parts.append(f"{invalid} rejected by {strategy.name} (e.g. {examples[0]})")
        raise SpaceError("", f"no combination is left to run: {', '.join(parts)}")
    return GridPlan(kept, total, excluded, invalid, examples)
