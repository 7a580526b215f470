"""``ktrdr-run backtest``: a one-shot backtest in a fresh container, with live progress,
then the metrics, the first and last trades, the equity curve and drawdown drawn in the
terminal, and with ``--report`` a self-contained HTML report."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from dispatcher.config import Config
from dispatcher.errors import KtrdrError
from ktrdr_run.cli_submit import add_job_options, build_job, parse_pairs, submit_and_report
from ktrdr_run.client import Client
from ktrdr_run.formats import format_metric
from ktrdr_run.render import console_for
from runner.protocol import OpRecord

if TYPE_CHECKING:
    import pandas as pd


def add_backtest_parser(sub: Any) -> None:
    """Register the ``backtest`` subcommand."""
    p = sub.add_parser(
        "backtest",
        help="backtest a strategy in a fresh container and print its metrics",
        description="Run one backtest. With no --data-dir, symbol DEMO uses generated demo data.",
    )
    p.add_argument("--strategy", required=True, help="sma_cross, rsi_reversion, donchian_breakout, ...")
    p.add_argument("--symbol", required=True, help="reads {symbol}_{timeframe}.csv|parquet")
    p.add_argument("--timeframe", default="1d", help="e.g. 1d, 1h, 5m (default 1d)")
    p.add_argument("--start", help="first date (ISO, inclusive)")
    p.add_argument("--end", help="last date (ISO, inclusive)")
    p.add_argument("--param", "-p", action="append", metavar="K=V", help="strategy parameter (repeatable)")
    add_settings_options(p)
    p.add_argument("--report", type=Path, metavar="FILE.html", help="write a self-contained HTML report")
    p.add_argument("--no-chart", action="store_true", help="skip the equity and drawdown chart")
    add_job_options(p)
    p.set_defaults(handler=cmd_backtest)


def add_settings_options(p: argparse.ArgumentParser) -> None:
    """The backtest settings every backtesting command takes (capital, costs, sizing)."""
    p.add_argument("--capital", type=float, default=100_000.0, help="initial capital (default 100000)")
    p.add_argument("--commission", type=float, default=0.001, help="fraction of notional (default 0.001)")
    p.add_argument("--slippage", type=float, default=0.0005, help="fraction of price (default 0.0005)")
    p.add_argument("--long-only", action="store_true", help="flat instead of short")
    p.add_argument("--sizing", choices=["all_in", "fraction"], default="all_in")
    p.add_argument("--fraction", type=float, default=1.0, help="equity fraction with --sizing fraction")
    p.add_argument("--close-at-end", action="store_true", help="close an open position at the last close")


def settings_params(args: argparse.Namespace) -> dict[str, Any]:
    """The backtest settings of ``add_settings_options``, and ``--start``/``--end`` when given."""
    params: dict[str, Any] = {
        "initial_capital": args.capital,
        "commission": args.commission,
        "slippage": args.slippage,
        "long_only": args.long_only,
        "sizing": args.sizing,
        "fraction": args.fraction,
        "close_at_end": args.close_at_end,
    }
    for name in ("start", "end"):
        if getattr(args, name, None):
            params[name] = getattr(args, name)
    return params


async def cmd_backtest(args: argparse.Namespace, config: Config) -> int:
    params: dict[str, Any] = {
        "strategy": args.strategy,
        "symbol": args.symbol,
        "timeframe": args.timeframe,
        "strategy_params": parse_pairs(args.param or [], "--param"),
        **settings_params(args),
    }
    job = build_job("backtest", params, args)

    async def render(client: Client, record: OpRecord) -> None:
        print_backtest(record)
        await show_equity(client, record, args)

    return await submit_and_report(job, args, config, render=render)


async def show_equity(client: Client, record: OpRecord, args: argparse.Namespace) -> None:
    """The equity and drawdown chart, and the HTML report, from the op's artifacts."""
    # imported here: pandas and the renderers cost every other command's start-up time
    from ktrdr_run.charts import backtest_chart, backtest_chart_text
    from ktrdr_run.report import write_backtest_report

    if args.no_chart and not args.report:
        return
    try:
        equity = read_parquet(await client.op(record.op_id).artifact("equity_curve"))
        trades = read_parquet(await client.op(record.op_id).artifact("trades"))
    except KtrdrError as exc:
        print(f"note: no chart or report: {exc}", file=sys.stderr)
        return
    if not args.no_chart:
        console = console_for(sys.stdout)
        width = min(console.width if console.is_terminal else 80, 120)
        print()
        if console.is_terminal:
            console.print(backtest_chart_text(equity, width=width))
        else:
            for line in backtest_chart(equity, width=width):
                print(line)
    if args.report:
        path = write_backtest_report(args.report, record, equity, trades)
        print(f"report: {path.resolve()}", file=sys.stderr)


def read_parquet(data: bytes) -> pd.DataFrame:
    """A Parquet artifact as a DataFrame."""
    import pandas as pd

    return pd.read_parquet(io.BytesIO(data))


def _trade_row(trade: dict[str, Any]) -> str:
    exit_time = trade.get("exit_time") or "(open)"
    return (
        f"  {trade.get('side', ''):<5} {trade.get('entry_time', '')[:19]:<19} → {exit_time[:19]:<19} "
        f"{trade.get('units', 0):>8,} @ {trade.get('entry_price', 0):>10.4f} → "
        f"{trade.get('exit_price') or 0:>10.4f}  pnl {trade.get('pnl') or 0:>12,.2f}"
    )


def print_backtest(record: OpRecord, out: TextIO = sys.stdout) -> None:
    """The metrics table and the first and last trades of a completed backtest."""
    result = record.result or {}
    strategy = result.get("strategy", {})
    label = strategy.get("label") if isinstance(strategy, dict) else strategy
    period = result.get("period", {})
    print(f"backtest {record.op_id}: {label} on {result.get('symbol')} {result.get('timeframe')}", file=out)
    print(f"  data: {result.get('data_source', '')}", file=out)
    for warning in result.get("warnings") or []:
        print(f"  WARNING: {warning}", file=out)
    if result.get("synthetic_data"):
        print("  NOTE: these are generated demo bars, not market data.", file=out)
    print(
        f"  bars: {result.get('bars')}  from {period.get('first_bar')} to {period.get('last_bar')}", file=out
    )
    print("  metrics:", file=out)
    for name, value in (result.get("metrics") or {}).items():
        print(f"    {name:<24} {format_metric(name, value):>18}", file=out)
    preview = result.get("trades_preview") or {}
    first, last = preview.get("first") or [], preview.get("last") or []
    total = preview.get("total", len(first))
    if first:
        print(f"  first trades (of {total}):", file=out)
        for trade in first:
            print(_trade_row(trade), file=out)
    if last and total > len(first):
        print("  last trades:", file=out)
        for trade in last:
            print(_trade_row(trade), file=out)
    if record.artifacts:
        print("  artifacts (object store ktrdr_artifacts):", file=out)
        for name, digest in record.artifacts.items():
            print(f"    {name:<14} {digest}", file=out)
