"""Run a sweep chunk: many parameter combinations on one symbol's bars, loaded once.

Each combination goes through the same steps as the ``backtest`` op (strategy params,
positions, :func:`~runner.backtest.engine.simulate`,
:func:`~runner.backtest.metrics.compute_metrics`) without its artifacts. A combination
that fails on its own terms (the strategy rejects its params, too few bars for its
warm-up, an artifact it names is missing) gets an error entry; the others still run. The
cancel token is checked between combinations.

This module imports numpy (through the engine): only the op function imports it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from runner.backtest.data import Bars, check_warmup
from runner.backtest.engine import simulate
from runner.backtest.metrics import compute_metrics, periods_per_year
from runner.backtest.strategies import Strategy, get_strategy
from runner.errors import Cancelled, KtrdrRunnerError, describe_validation_error
from runner.ops.backtest import engine_config, iso_time, load_bars_for, settings_of
from runner.sweep.objective import Objective, parse_maximize

if TYPE_CHECKING:
    from runner.ops.sweep_chunk import SweepChunkParams
    from runner.sdk import OpContext

#: Seconds between progress reports while combinations run.
PROGRESS_EVERY_S = 0.25
# The share of the progress bar loading the data takes.
_LOAD_PERCENT = 5.0


class _Runner:
    """What every combination of a chunk shares."""

    def __init__(self, ctx: OpContext, params: SweepChunkParams, strategy: Strategy, bars: Bars) -> None:
        self.strategy = strategy
        self.bars = bars
        self.base = dict(params.strategy_params)
        self.long_only = params.long_only
        self.periods = params.periods_per_year or periods_per_year(bars.timestamps)
        self.config = engine_config(params)
        self.first_bar = iso_time(bars.timestamps[0])
        self.last_bar = iso_time(bars.timestamps[-1])
        self.warnings: list[str] = []
        self._fetched: dict[str, bytes] = {}
        self._ctx = ctx

    def _load_artifact(self, name: str) -> bytes:
        # Combinations that differ only in other params share one fetch of the artifact.
        if name not in self._fetched:
            self._fetched[name] = self._ctx.load_artifact(name)
        return self._fetched[name]

    def metrics(self, combination: Mapping[str, Any]) -> dict[str, Any]:
        """The 24 metrics of one combination; raises what the backtest op would raise."""
        strategy = self.strategy
        parsed = strategy.parse_params({**self.base, **combination}, strict=False)
        label = strategy.label(parsed)
        if strategy.bind is not None:
            parsed = strategy.bind(parsed, self._load_artifact)
        check_warmup(len(self.bars), strategy.warmup(parsed), self.bars.source or "the bars", label)
        target = strategy.positions(self.bars, parsed, self.long_only)
        result = simulate(self.bars, target, self.config)
        if strategy.caveats is not None:
            for warning in strategy.caveats(parsed, self.first_bar, self.last_bar):
                if warning not in self.warnings:
                    self.warnings.append(warning)
        return compute_metrics(result, periods=self.periods)


def _error_text(exc: Exception) -> str:
    if isinstance(exc, msgspec.ValidationError):
        field, problem = describe_validation_error(exc)
        return f"{field}: {problem}" if field else problem
    return str(exc) or type(exc).__name__


def _describe(combination: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in combination.items())


class _Progress:
    """Throttled progress: done/total, combinations per second, the best so far."""

    def __init__(self, ctx: OpContext, total: int, objective: Objective) -> None:
        self.ctx = ctx
        self.total = total
        self.objective = objective
        self.started = time.perf_counter()
        self.last = self.started
        self.best: dict[str, Any] | None = None

    def offer(self, entry: dict[str, Any]) -> None:
        if entry["metrics"] is None or self.objective.value(entry["metrics"]) is None:
            return
        if self.best is None or self.objective.better(entry["metrics"], self.best["metrics"]):
            self.best = entry

    def rate(self, done: int) -> float:
        elapsed = time.perf_counter() - self.started
        return done / elapsed if elapsed > 0 else 0.0

    def report(self, done: int, failed: int, *, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        rate = self.rate(done)
        message = f"{done}/{self.total} combinations, {rate:.0f}/s"
        numbers: dict[str, float] = {
            "done": done,
            "total": self.total,
            "combos_per_s": rate,
            "failed": failed,
        }
        best = self.objective.value(self.best["metrics"]) if self.best is not None else None
        if self.best is not None and best is not None:
            message += f", best {self.objective.text}={best:.6g} ({_describe(self.best['params'])})"
            numbers["best"] = best
        percent = _LOAD_PERCENT + (100.0 - _LOAD_PERCENT) * done / self.total
        self.ctx.progress(percent, message, step="combinations", **numbers)


def run_chunk(ctx: OpContext, params: SweepChunkParams) -> dict[str, Any]:
    """Backtest every combination of ``params`` and return one entry per combination.

    The result: ``results`` (in the order given: ``index``, ``params`` as given,
    ``metrics`` with the 24 backtest metrics or None, ``error`` or None), the counts
    (``count``, ``succeeded``, ``failed``, ``zero_trade``), ``best`` (the best entry by
    ``maximize``, None when no combination has a defined value), and what every
    combination shared (bars, period, data source, settings).
    """
    ctx.checkpoint()
    ctx.progress(0, f"loading {params.symbol} {params.timeframe}", step="load")
    objective = parse_maximize(params.maximize)
    strategy = get_strategy(params.strategy)
    bars, source = load_bars_for(params, ctx, 0, strategy.name)
    runner = _Runner(ctx, params, strategy, bars)
    total = len(params.combinations)
    ctx.progress(_LOAD_PERCENT, f"loaded {len(bars)} bars ({source}); {total} combinations", step="load")

    progress = _Progress(ctx, total, objective)
    results: list[dict[str, Any]] = []
    failed = zero_trade = 0
    for i, combination in enumerate(params.combinations):
        ctx.checkpoint()
        entry: dict[str, Any] = {
            "index": params.first_index + i,
            "params": dict(combination),
            "metrics": None,
            "error": None,
        }
        try:
            entry["metrics"] = runner.metrics(combination)
        except Cancelled:
            raise
        # A combination's own failure is its entry's error; anything else is a bug and
        # fails the op.
        except (msgspec.ValidationError, ValueError, ArithmeticError, KtrdrRunnerError) as exc:
            entry["error"] = _error_text(exc)
            failed += 1
        else:
            if entry["metrics"]["total_trades"] == 0:
                zero_trade += 1
            progress.offer(entry)
        results.append(entry)
        progress.report(i + 1, failed)
    progress.report(total, failed, force=True)
    elapsed = time.perf_counter() - progress.started
    rate = progress.rate(total)
    summary = f"{total} combinations in {elapsed:.3f} s ({rate:.0f}/s)"
    ctx.log(f"{summary}; {failed} failed, {zero_trade} without trades")
    for warning in runner.warnings:
        ctx.log(warning, level="warning")

    return {
        "results": results,
        "count": total,
        "succeeded": total - failed,
        "failed": failed,
        "zero_trade": zero_trade,
        "best": progress.best,
        "maximize": objective.text,
        "elapsed_s": elapsed,
        "combos_per_s": rate,
        "bars": len(bars),
        "data_source": source,
        "synthetic_data": source.startswith("synthetic"),
        "symbol": params.symbol,
        "timeframe": params.timeframe,
        "period": {"first_bar": runner.first_bar, "last_bar": runner.last_bar},
        "periods_per_year": runner.periods,
        "warnings": runner.warnings,
        "strategy": {"name": strategy.name, "shared_params": runner.base},
        "settings": settings_of(params),
    }
