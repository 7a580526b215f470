"""The ``sweep_chunk`` operation: one chunk of a parameter sweep, run in one container.

A sweep's coordinator splits its combinations into chunks so container start-up is paid
per chunk, not per combination. A chunk takes the ``backtest`` op's settings (strategy,
symbol, timeframe, dates, capital, costs, sizing), loads the bars once, and backtests
each combination in-process with the vectorized engine (see :mod:`runner.sweep.chunk`).

Like :mod:`runner.ops.backtest`, this module imports only msgspec and the standard
library at module level: the dispatcher imports it to validate params.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from msgspec import Meta

from runner.errors import InvalidParams
from runner.ops.backtest import PRELOAD, BacktestParams, check_settings, model_reads, strategy_for
from runner.registry import operation
from runner.sweep.objective import DEFAULT_MAXIMIZE, ObjectiveError, parse_maximize

if TYPE_CHECKING:
    from runner.backtest.strategies import Strategy
    from runner.sdk import OpContext

KIND = "sweep_chunk"
#: The most combinations one chunk may hold: its result (about 0.9 kB of metrics per
#: combination) must fit one NATS message (1 MB by default).
MAX_CHUNK = 1_000

Combination = dict[str, float | int | bool | str]


class SweepChunkParams(BacktestParams, kw_only=True, forbid_unknown_fields=True, frozen=True):
    """Params of a ``sweep_chunk`` job: the ``backtest`` params plus the combinations.

    ``strategy_params`` are the values every combination shares; each entry of
    ``combinations`` sets the swept ones on top (a name in both takes the combination's
    value). Results are numbered from ``first_index`` (the chunk's offset in the sweep).
    ``maximize`` (a metric name, ``-name`` to minimise) picks the best so far that
    progress reports.
    """

    combinations: Annotated[list[Combination], Meta(min_length=1, max_length=MAX_CHUNK)]
    first_index: Annotated[int, Meta(ge=0)] = 0
    maximize: str = DEFAULT_MAXIMIZE


def resolve_strategy(params: SweepChunkParams) -> Strategy:
    """The chunk's strategy; InvalidParams lists the known ones when it is unknown."""
    return strategy_for(KIND, params.strategy)


def check_params(params: SweepChunkParams) -> None:
    """Cross-field checks that hold for the whole chunk.

    The strategy, the dates, the sizing fraction and ``maximize`` are checked here, and
    every parameter name (shared or swept) must be a field of the strategy's params.
    Values are not: a combination the strategy rejects gets an error entry in the result
    and the others still run.
    """
    from runner.sweep.plan import strategy_fields

    strategy = resolve_strategy(params)
    check_settings(KIND, params)
    try:
        parse_maximize(params.maximize)
    except ObjectiveError as exc:
        raise InvalidParams(KIND, "maximize", str(exc)) from None
    fields = strategy_fields(strategy)
    known = ", ".join(fields)
    for name in params.strategy_params:
        if name not in fields:
            problem = f"unknown field (strategy {strategy.name} has: {known})"
            raise InvalidParams(KIND, f"strategy_params.{name}", problem)
    checked: set[frozenset[str]] = set()
    for i, combination in enumerate(params.combinations):
        names = frozenset(combination)
        if names in checked:
            continue
        for name in combination:
            if name not in fields:
                problem = f"unknown field (strategy {strategy.name} has: {known})"
                raise InvalidParams(KIND, f"combinations[{i}].{name}", problem)
        checked.add(names)


def preflight(params: SweepChunkParams, data_dir: Path | None) -> None:
    """Validate the chunk's data without running it; raises DataError or InvalidParams.

    The same checks as the ``backtest`` preflight, with the warm-up of the combination
    that needs the fewest bars: a chunk fails up front only when no combination can run.
    """
    from runner.ops.backtest import check_bars_for

    check_params(params)
    strategy = resolve_strategy(params)
    warmups = []
    if strategy.bind is None:  # a bound strategy's warm-up needs its artifact: the op checks it
        for combination in params.combinations:
            try:
                parsed = strategy.parse_params({**params.strategy_params, **combination}, strict=False)
            except msgspec.ValidationError:
                continue
            warmups.append(strategy.warmup(parsed))
    warmup = min(warmups, default=0)
    label = f"every combination of {strategy.name}"
    check_bars_for(params, data_dir, warmup, label)


def artifact_reads(params: SweepChunkParams) -> dict[str, str]:
    """The model artifacts a ``model`` chunk reads: the dispatcher checks each exists."""
    swept = ((f"combinations[{i}].model", c.get("model")) for i, c in enumerate(params.combinations))
    return model_reads(params, swept)


@operation(
    KIND,
    params=SweepChunkParams,
    gpu="never",
    check=check_params,
    preflight=preflight,
    reads=artifact_reads,
    preload=PRELOAD,
)
def sweep_chunk(ctx: OpContext, params: SweepChunkParams) -> dict[str, Any]:
    """Backtest a chunk of a sweep's parameter combinations on bars loaded once."""
    from runner.sweep.chunk import run_chunk

    return run_chunk(ctx, params)
