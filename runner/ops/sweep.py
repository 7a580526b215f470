"""The ``sweep`` operation: a parameter sweep, the parent of ``sweep_chunk`` child ops.

A sweep never runs in a container: the dispatcher that takes its job runs the sweep's
coordinator (:mod:`dispatcher.sweep`), which splits the combinations into chunks, submits
each as a ``sweep_chunk`` child op, and ranks what they return. This module declares the
params and checks them, so a bad space, constraint or metric is a clear error before any
container starts; it imports only msgspec and the standard library at module level, like
every op module the dispatcher imports.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from msgspec import Meta

from runner.backtest import check_date_range
from runner.errors import InvalidParams, KtrdrRunnerError
from runner.ops.backtest import BacktestParams, check_bars_for, check_settings, model_reads, strategy_for
from runner.ops.sweep_chunk import MAX_CHUNK
from runner.registry import operation
from runner.sweep.constraint import Constraint, ConstraintError, parse_constraint
from runner.sweep.objective import DEFAULT_MAXIMIZE, Objective, ObjectiveError, parse_maximize
from runner.sweep.space import Dimension, ParamSpace, Random, SpaceError

if TYPE_CHECKING:
    from runner.backtest.strategies import Strategy
    from runner.sdk import OpContext
    from runner.sweep.plan import GridPlan

KIND = "sweep"
#: The most trials a random or TPE sweep may ask for.
MAX_TRIES = 100_000
#: The most leaderboard entries a sweep's result holds.
MAX_TOP_K = 1_000

Method = Literal["grid", "random", "tpe"]


class SweepParams(BacktestParams, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Params of a ``sweep`` job: the ``backtest`` settings plus the search.

    ``space`` maps each swept strategy parameter to a dimension (``range``, ``values`` or
    ``random``; see :mod:`runner.sweep.space`); ``strategy_params`` are the values every
    combination shares. ``method`` ``grid`` runs every combination of the space (capped by
    ``max_tries`` when given); ``random`` and ``tpe`` ask ``max_tries`` trials of Optuna's
    random or TPE sampler (seeded by ``random_state``), TPE in rounds of ``round_size`` so
    later rounds learn from earlier ones. ``constraint`` is an expression over parameter
    names (``fast < slow``) a combination must satisfy; ``maximize`` names the metric to
    rank by (``-name`` minimises). ``chunk_size`` fixes how many combinations each child
    op runs (default: the combinations spread over the free capacity). With
    ``validate_start``/``validate_end`` the ``top_k`` best are run again on that range.
    """

    space: ParamSpace
    method: Method = "grid"
    max_tries: Annotated[int, Meta(ge=1, le=MAX_TRIES)] | None = None
    constraint: str = ""
    maximize: str = DEFAULT_MAXIMIZE
    random_state: Annotated[int, Meta(ge=0, le=2**32 - 1)] | None = None
    top_k: Annotated[int, Meta(ge=1, le=MAX_TOP_K)] = 10
    chunk_size: Annotated[int, Meta(ge=1, le=MAX_CHUNK)] | None = None
    round_size: Annotated[int, Meta(ge=1, le=MAX_TRIES)] | None = None
    validate_start: str | None = None
    validate_end: str | None = None


def resolve_strategy(params: SweepParams) -> Strategy:
    """The sweep's strategy; InvalidParams lists the known ones when it is unknown."""
    return strategy_for(KIND, params.strategy)


def objective_of(params: SweepParams) -> Objective:
    """The sweep's objective; InvalidParams names ``maximize`` when it is unknown."""
    try:
        return parse_maximize(params.maximize)
    except ObjectiveError as exc:
        raise InvalidParams(KIND, "maximize", str(exc)) from None


def constraint_of(params: SweepParams) -> Constraint | None:
    """The parsed constraint (None when there is none); InvalidParams names ``constraint``."""
    if not params.constraint.strip():
        return None
    names = list(params.space)
    try:
        return parse_constraint(params.constraint, names)
    except ConstraintError as exc:
        raise InvalidParams(KIND, "constraint", str(exc)) from None


def validation_params(params: SweepParams) -> BacktestParams | None:
    """The backtest settings on the validation range, or None without one."""
    if params.validate_start is None and params.validate_end is None:
        return None
    fields = {f: getattr(params, f) for f in BacktestParams.__struct_fields__}
    fields.update(start=params.validate_start, end=params.validate_end)
    return BacktestParams(**fields)


def _space_error(exc: SpaceError) -> InvalidParams:
    field = f"space.{exc.param}" if exc.param else "space"
    return InvalidParams(KIND, field, exc.problem)


def plan(params: SweepParams) -> GridPlan:
    """The grid a ``grid`` sweep runs (checked, constraint applied, invalid dropped)."""
    from runner.sweep.plan import plan_grid

    try:
        return plan_grid(
            params.space,
            params.strategy,
            base=params.strategy_params,
            constraint=constraint_of(params),
            cap=params.max_tries,
        )
    except SpaceError as exc:
        raise _space_error(exc) from None


def check_params(params: SweepParams) -> None:
    """Everything that can be checked without the data, so a sweep that cannot run never
    starts a container: the strategy, every swept name and value, the constraint, the
    metric, the dates of both ranges, and (for a grid) that combinations are left to run.
    """
    from runner.sweep.plan import check_space

    resolve_strategy(params)
    check_settings(KIND, params)
    objective_of(params)
    constraint_of(params)
    if params.method == "grid":
        for name, dimension in params.space.items():
            if isinstance(dimension, Random):
                raise InvalidParams(
                    KIND, f"space.{name}", "a random distribution needs method 'random' or 'tpe', not 'grid'"
                )
        plan(params)
    else:
        if params.max_tries is None:
            raise InvalidParams(
                KIND, "max_tries", f"method {params.method!r} needs max_tries (how many trials)"
            )
        try:
            check_space(params.space, params.strategy, params.strategy_params)
        except SpaceError as exc:
            raise _space_error(exc) from None
    if (params.validate_start is None) != (params.validate_end is None):
        missing = "validate_end" if params.validate_end is None else "validate_start"
        raise InvalidParams(KIND, missing, "validation needs both validate_start and validate_end")
    if params.validate_start is not None:
        check_date_range(KIND, params.validate_start, params.validate_end, prefix="validate_")


def preflight(params: SweepParams, data_dir: Path | None) -> None:
    """The bars of both ranges exist and read; DataError otherwise."""
    label = f"a {params.strategy} sweep"
    check_bars_for(params, data_dir, 0, label)
    validation = validation_params(params)
    if validation is not None:
        check_bars_for(validation, data_dir, 0, f"{label} (validation range)")


def artifact_reads(params: SweepParams) -> dict[str, str]:
    """The model artifacts a ``model`` sweep reads: the dispatcher checks each exists."""
    dimension: Dimension | None = params.space.get("model")
    values: list[Any] = getattr(dimension, "values", []) if dimension is not None else []
    return model_reads(params, ((f"space.model.values[{i}]", v) for i, v in enumerate(values)))


@operation(
    KIND,
    params=SweepParams,
    gpu="never",
    check=check_params,
    preflight=preflight,
    reads=artifact_reads,
    coordinated=True,
)
def sweep(ctx: OpContext, params: SweepParams) -> dict[str, Any]:
    """Sweep a strategy's parameters over child ops and rank the combinations."""
    # The dispatcher runs a sweep's coordinator itself; a container is never given one.
    raise KtrdrRunnerError("a sweep is coordinated by the dispatcher; it never runs in a container")


def encode_space(params: SweepParams) -> dict[str, Any]:
    """The space as JSON-ready builtins (for a child's record and the result)."""
    return {name: msgspec.to_builtins(dim) for name, dim in params.space.items()}
