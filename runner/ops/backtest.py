"""The ``backtest`` operation: one strategy on one symbol's bars, in the vectorized engine.

The dispatcher imports this module to validate params before any container starts, so it
imports only msgspec and the standard library at module level; numpy, pandas and pyarrow
are imported inside the functions that need them.

Data come from ``ctx.data_dir`` (the host data directory, mounted read-only), laid out as
KTRDR lays it out: ``{symbol}_{timeframe}.csv`` (or ``.parquet``). The symbol ``DEMO``
needs no data: when no ``DEMO_{timeframe}`` file is there (or no directory is mounted) a
deterministic synthetic data set is generated into the scratch directory, and the result
says so in ``data_source``.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from msgspec import Meta

from runner.backtest import SYMBOL_PATTERN, TIMEFRAME_PATTERN, check_date_range
from runner.errors import DataError, InvalidParams
from runner.registry import operation

if TYPE_CHECKING:
    from runner.backtest.data import Bars
    from runner.backtest.engine import BacktestResult, EngineConfig
    from runner.backtest.strategies import Strategy
    from runner.sdk import OpContext

KIND = "backtest"
PARQUET = "application/vnd.apache.parquet"
PREVIEW_TRADES = 5
DEMO_SYMBOL = "DEMO"  # runner.backtest.demo.DEMO_SYMBOL, repeated to keep imports cheap


class BacktestParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Params of a ``backtest`` job.

    Rates are fractions (``commission=0.001`` is 0.1 % of traded notional per fill,
    ``slippage=0.0005`` moves each fill price 0.05 % against the trade); the defaults are
    KTRDR's. ``start``/``end`` are ISO 8601 dates or date-times, both inclusive (a
    date-only ``end`` includes that day). ``strategy_params`` are checked against the
    strategy's own params struct; fields left out take the strategy's defaults.
    ``sizing="fraction"`` invests ``fraction`` of equity per entry; ``all_in`` invests all
    of it. ``periods_per_year`` overrides the annualisation factor inferred from the bars.
    """

    strategy: Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    symbol: Annotated[str, Meta(pattern=SYMBOL_PATTERN)]
    timeframe: Annotated[str, Meta(pattern=TIMEFRAME_PATTERN)] = "1d"
    start: str | None = None
    end: str | None = None
    strategy_params: dict[str, float | int | bool | str] = {}
    initial_capital: Annotated[float, Meta(gt=0, le=1e15)] = 100_000.0
    commission: Annotated[float, Meta(ge=0, lt=0.1)] = 0.001
    slippage: Annotated[float, Meta(ge=0, lt=0.1)] = 0.0005
    long_only: bool = False
    sizing: Literal["all_in", "fraction"] = "all_in"
    fraction: Annotated[float, Meta(gt=0, le=1)] = 1.0
    close_at_end: bool = False
    periods_per_year: Annotated[float, Meta(gt=0, le=1e7)] | None = None


def strategy_for(kind: str, name: str) -> Strategy:
    """The strategy ``name`` for an op of ``kind``; InvalidParams lists the known ones."""
    from runner.backtest.strategies import UnknownStrategy, get_strategy

    try:
        return get_strategy(name)
    except UnknownStrategy as exc:
        raise InvalidParams(kind, "strategy", str(exc)) from None


def resolve_strategy(params: BacktestParams) -> tuple[Strategy, Any]:
    """The strategy and its validated params struct; InvalidParams names the bad field."""
    strategy = strategy_for(KIND, params.strategy)
    try:
        parsed = strategy.parse_params(params.strategy_params, strict=False)
    except msgspec.ValidationError as exc:
        inner = InvalidParams.from_validation(KIND, exc)
        field = f"strategy_params.{inner.field}" if inner.field else "strategy_params"
        raise InvalidParams(KIND, field, f"{inner.problem} (strategy {strategy.name})") from None
    return strategy, parsed


def check_params(params: BacktestParams) -> None:
    """Cross-field checks: known strategy, its params, the dates, the sizing fraction."""
    resolve_strategy(params)
    check_settings(KIND, params)


def check_settings(kind: str, params: BacktestParams) -> None:
    """The dates are in order and the sizing fraction is only given with fraction sizing
    (for every op kind with the backtest settings); InvalidParams names the field."""
    check_date_range(kind, params.start, params.end)
    if params.sizing == "all_in" and params.fraction != 1.0:
        raise InvalidParams(
            kind,
            "fraction",
            "only used with sizing='fraction'; set sizing to 'fraction' or leave fraction at 1.0",
        )


def find_data_file_for(params: BacktestParams, data_dir: Path | None) -> Path | None:
    """The data file to use; None when the DEMO data set must be generated."""
    from runner.backtest.data import find_data_file

    if data_dir is not None:
        try:
            return find_data_file(Path(data_dir), params.symbol, params.timeframe)
        except DataError:
            if params.symbol != DEMO_SYMBOL:
                raise
    if params.symbol == DEMO_SYMBOL:
        return None
    raise DataError(
        f"no data directory is mounted for this op, so {params.symbol}_{params.timeframe}.csv "
        f"cannot be read; mount a data directory or use the symbol {DEMO_SYMBOL} "
        "(generated demo data)"
    )


def demo_frame(timeframe: str) -> Any:
    """The generated DEMO bars of ``timeframe``; DataError for an unsupported one."""
    from runner.backtest.demo import generate_demo_bars

    try:
        return generate_demo_bars(timeframe)
    except ValueError as exc:
        raise DataError(f"{DEMO_SYMBOL}_{timeframe}: {exc}") from None


def preflight(params: BacktestParams, data_dir: Path | None) -> None:
    """Validate the data of a backtest without running it; raises DataError or InvalidParams.

    Runs the same checks the op runs before simulating: the strategy and its params, the
    file exists and reads, timestamps are sorted and unique, the date range overlaps the
    data, the prices in range are finite and positive, and there are enough bars for the
    strategy's warm-up. ``data_dir`` is the host data directory (None: none mounted).
    """
    check_params(params)
    strategy, parsed = resolve_strategy(params)
    check_bars_for(params, data_dir, strategy.warmup(parsed), strategy.label(parsed))


def check_bars_for(params: BacktestParams, data_dir: Path | None, warmup: int, label: str) -> None:
    """The bars ``params`` ask for exist, read, and cover ``warmup``; DataError otherwise."""
    from runner.backtest.data import bars_from_frame, load_bars_file
    from runner.backtest.demo import demo_file_name

    path = find_data_file_for(params, data_dir)
    if path is None:
        frame = demo_frame(params.timeframe)
        name = f"{demo_file_name(params.timeframe)} (generated)"
        bars_from_frame(frame, name, start=params.start, end=params.end, warmup=warmup, strategy=label)
        return
    load_bars_file(path, start=params.start, end=params.end, warmup=warmup, strategy=label)


def load_bars_for(params: BacktestParams, ctx: OpContext, warmup: int, label: str) -> tuple[Bars, str]:
    """The bars ``params`` ask for (the mounted file, or generated DEMO bars), validated
    for ``warmup``, and where they came from (for the result)."""
    from runner.backtest.data import load_bars_file
    from runner.backtest.demo import DEMO_DATA_SOURCE, write_demo_data

    path = find_data_file_for(params, ctx.data_dir)
    source = f"data file {path.name}" if path is not None else DEMO_DATA_SOURCE
    if path is None:
        demo_frame(params.timeframe)  # a clear DataError for an unsupported timeframe
        path = write_demo_data(Path(ctx.scratch_dir) / "demo-data", params.timeframe)
        ctx.log(
            f"{DEMO_SYMBOL}: no {path.name} data file is mounted; using {DEMO_DATA_SOURCE}",
            level="warning",
        )
    bars = load_bars_file(path, start=params.start, end=params.end, warmup=warmup, strategy=label)
    return bars, source


def engine_config(params: BacktestParams) -> EngineConfig:
    """The engine's settings from the params."""
    from runner.backtest.engine import EngineConfig

    return EngineConfig(
        initial_capital=params.initial_capital,
        commission=params.commission,
        slippage=params.slippage,
        sizing=params.sizing,
        fraction=params.fraction,
        close_at_end=params.close_at_end,
    )


def settings_of(params: BacktestParams) -> dict[str, Any]:
    """The engine settings of a run, as its result records them."""
    return {
        "initial_capital": params.initial_capital,
        "commission": params.commission,
        "slippage": params.slippage,
        "sizing": params.sizing,
        "fraction": params.fraction,
        "long_only": params.long_only,
        "close_at_end": params.close_at_end,
    }


def iso_time(stamp: Any) -> str:
    """A bar time as ISO 8601 UTC."""
    from runner.backtest.data import format_timestamp

    return format_timestamp(stamp)


def _parquet(columns: dict[str, Any]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns)
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _utc(values: Any) -> Any:
    import pyarrow as pa

    return pa.array(values.astype("datetime64[ns]"), type=pa.timestamp("ns", tz="UTC"))


def trades_table(result: BacktestResult) -> bytes:
    """The trade list as Parquet: one row per trade, the open position last if any."""
    import numpy as np

    trades = result.trades
    stamps = result.bars.timestamps
    cols = trades.columns()
    return _parquet(
        {
            "entry_time": _utc(stamps[trades.entry_bar]),
            "exit_time": _utc(stamps[trades.exit_bar]),
            "side": np.where(trades.direction > 0, "long", "short").astype(object),
            **cols,
            "holding_bars": trades.exit_bar - trades.entry_bar,
        }
    )


def equity_table(result: BacktestResult) -> bytes:
    """The equity curve as Parquet: one row per bar."""
    import numpy as np

    equity = result.equity
    peak = np.maximum.accumulate(equity)
    return _parquet(
        {
            "timestamp": _utc(result.bars.timestamps),
            "close": result.bars.close,
            "target": result.target,
            "position": result.position,
            "units": result.units,
            "cash": result.cash,
            "equity": equity,
            "drawdown_pct": np.where(peak > 0, (peak - equity) / peak, 0.0),
        }
    )


def _trade_rows(result: BacktestResult, picks: range) -> list[dict[str, Any]]:
    from runner.backtest.metrics import clean

    t = result.trades
    stamps = result.bars.timestamps
    rows = []
    for i in picks:
        rows.append(
            clean(
                {
                    "entry_time": iso_time(stamps[t.entry_bar[i]]),
                    "exit_time": iso_time(stamps[t.exit_bar[i]]),
                    "side": "long" if t.direction[i] > 0 else "short",
                    "units": t.units[i],
                    "entry_price": t.entry_price[i],
                    "exit_price": t.exit_price[i],
                    "pnl": t.pnl[i],
                    "return_pct": t.return_pct[i],
                    "commission": t.entry_commission[i] + t.exit_commission[i],
                    "holding_bars": t.exit_bar[i] - t.entry_bar[i],
                    "is_open": t.is_open[i],
                }
            )
        )
    return rows


def _summary(result: BacktestResult) -> dict[str, Any]:
    k = len(result.trades)
    first = range(min(PREVIEW_TRADES, k))
    last = range(max(PREVIEW_TRADES, k - PREVIEW_TRADES), k)
    open_rows = _trade_rows(result, range(k - 1, k)) if k and result.trades.is_open[-1] else []
    return {
        "trades_preview": {
            "first": _trade_rows(result, first),
            "last": _trade_rows(result, last),
            "total": k,
        },
        "open_position": open_rows[0] if open_rows else None,
    }


def artifact_reads(params: BacktestParams) -> dict[str, str]:
    """The artifact a ``model`` backtest reads: the dispatcher checks it exists first."""
    model = params.strategy_params.get("model") if params.strategy == "model" else None
    return {"strategy_params.model": model} if isinstance(model, str) else {}


def model_reads(params: BacktestParams, swept: Iterable[tuple[str, Any]]) -> dict[str, str]:
    """The model artifacts a sweep or a chunk of ``model`` backtests reads: the shared
    one, then each distinct swept one (``swept``: params field and value)."""
    if params.strategy != "model":
        return {}
    reads = artifact_reads(params)
    for field, value in swept:
        if isinstance(value, str) and value not in reads.values():
            reads[field] = value
    return reads


#: What a backtest imports before its first bar: a warm pool container does it ahead.
PRELOAD = (
    "pandas",
    "pyarrow.parquet",
    "runner.backtest.data",
    "runner.backtest.engine",
    "runner.backtest.metrics",
)


@operation(
    KIND,
    params=BacktestParams,
    gpu="never",
    check=check_params,
    preflight=preflight,
    reads=artifact_reads,
    preload=PRELOAD,
)
def backtest(ctx: OpContext, params: BacktestParams) -> dict[str, Any]:
    """Backtest one strategy on one symbol's bars with the vectorized engine."""
    from runner.backtest.engine import simulate
    from runner.backtest.metrics import clean, compute_metrics, periods_per_year

    ctx.checkpoint()
    ctx.progress(0, f"loading {params.symbol} {params.timeframe}", step="load")
    strategy, parsed = resolve_strategy(params)
    label = strategy.label(parsed)
    declared = parsed
    if strategy.bind is not None:
        ctx.progress(5, "fetching what the strategy needs", step="load")
        parsed = strategy.bind(parsed, ctx.load_artifact)
    warmup = strategy.warmup(parsed)
    bars, source = load_bars_for(params, ctx, warmup, label)
    n = len(bars)
    ctx.progress(20, f"loaded {n} bars ({source})", step="load", bars=n)
    ctx.checkpoint()

    target = strategy.positions(bars, parsed, params.long_only)
    changes = int((target[1:] != target[:-1]).sum())
    ctx.progress(40, f"{label}: {changes} signal changes", step="signals", signal_changes=changes)
    ctx.checkpoint()

    result = simulate(bars, target, engine_config(params))
    ctx.progress(60, f"simulated {len(result.trades)} trades", step="simulate", trades=len(result.trades))
    ctx.checkpoint()

    period = {"first_bar": iso_time(bars.timestamps[0]), "last_bar": iso_time(bars.timestamps[-1])}
    warnings = strategy.caveats(parsed, period["first_bar"], period["last_bar"]) if strategy.caveats else []
    for warning in warnings:
        ctx.log(warning, level="warning")
    periods = params.periods_per_year or periods_per_year(bars.timestamps)
    metrics = compute_metrics(result, periods=periods)
    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
    ctx.progress(
        75,
        "metrics computed",
        step="metrics",
        **{k: numeric[k] for k in ("total_return_pct", "sharpe_ratio") if k in numeric},
    )
    ctx.checkpoint()

    trades_bytes = trades_table(result)
    equity_bytes = equity_table(result)
    ctx.progress(85, "storing trades and equity curve", step="artifacts")
    artifacts = {
        "trades": ctx.artifact("trades", trades_bytes, PARQUET),
        "equity_curve": ctx.artifact("equity_curve", equity_bytes, PARQUET),
    }
    ctx.progress(100, "backtest complete", step="done")

    return clean(
        {
            "metrics": metrics,
            **_summary(result),
            "bars": n,
            "data_source": source,
            "synthetic_data": source.startswith("synthetic"),
            "symbol": params.symbol,
            "timeframe": params.timeframe,
            "period": period,
            "warnings": warnings,
            "periods_per_year": periods,
            "strategy": {
                "name": strategy.name,
                "params": msgspec.to_builtins(declared),
                "warmup": warmup,
                "label": label,
            },
            "settings": settings_of(params),
            "artifacts": artifacts,
        }
    )
