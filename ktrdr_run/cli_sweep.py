"""``ktrdr-run sweep``: a parameter sweep of one strategy on one symbol, run by the
dispatcher's coordinator as ``sweep_chunk`` child ops, with live progress, then the
leaderboard, a summary line and, for a grid over two parameters, a heatmap."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import msgspec

from dispatcher.config import Config
from ktrdr_run.cli_backtest import add_settings_options, settings_params
from ktrdr_run.cli_submit import UsageError, add_job_options, build_job, parse_pairs, submit_and_report
from ktrdr_run.client import Client
from ktrdr_run.render import console_for
from ktrdr_run.sweep_view import (
    heatmap_lines,
    heatmap_text,
    leaderboard_lines,
    leaderboard_table,
    objective,
    summary_line,
    validation_note,
)
from runner.protocol import OpRecord
from runner.sweep.space import GRID_FORM, RANDOM_FORM, SpaceError, parse_grid_arg, parse_random_arg

METHODS = ("grid", "random", "tpe")
# A value after --maximize that argparse would take for an option: ``-max_drawdown``.
_DASH_WORD = re.compile(r"-[A-Za-z_]\w+")


def add_sweep_parser(sub: Any) -> None:
    """Register the ``sweep`` subcommand."""
    p = sub.add_parser(
        "sweep",
        help="sweep a strategy's parameters (grid, random or TPE) and print the leaderboard",
        description=(
            "Backtest many parameter combinations of one strategy on one symbol. The dispatcher's\n"
            "coordinator splits them into sweep_chunk child ops. With no --data-dir, symbol DEMO\n"
            "uses generated demo data."
        ),
        epilog=(
            "examples:\n"
            "  ktrdr-run sweep --strategy sma_cross --symbol DEMO --grid fast=5:30:5 "
            "--grid slow=20:100:10 --maximize sharpe_ratio\n"
            "  ktrdr-run sweep --strategy sma_cross --symbol DEMO --random fast=2:50 "
            "--random slow=10:200 --max-tries 200 --random-state 7 --maximize -max_drawdown"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--strategy", required=True, help="sma_cross, rsi_reversion, donchian_breakout, ...")
    p.add_argument("--symbol", required=True, help="reads {symbol}_{timeframe}.csv|parquet")
    p.add_argument("--timeframe", default="1d", help="e.g. 1d, 1h, 5m (default 1d)")
    p.add_argument("--start", help="first date (ISO, inclusive)")
    p.add_argument("--end", help="last date (ISO, inclusive)")
    p.add_argument(
        "--param", "-p", action="append", metavar="K=V", help="fixed strategy parameter (repeatable)"
    )
    p.add_argument(
        "--grid", action="append", metavar="SPEC", help=f"swept parameter: {GRID_FORM} (repeatable)"
    )
    p.add_argument(
        "--random",
        action="append",
        metavar="SPEC",
        help=f"sampled parameter: {RANDOM_FORM}; integer bounds without a kind mean int (repeatable)",
    )
    p.add_argument(
        "--method", choices=METHODS, help="how to search (default: grid, or tpe when any --random is given)"
    )
    p.add_argument(
        "--max-tries", type=int, metavar="N", help="trials for random/tpe (required); a cap for grid"
    )
    p.add_argument(
        "--constraint", default="", metavar="EXPR", help="skip combinations where it is false: 'fast < slow'"
    )
    p.add_argument(
        "--maximize",
        default="final_equity",
        metavar="METRIC",
        help="metric to optimise (default final_equity); -name minimises: --maximize -max_drawdown",
    )
    p.add_argument("--top", type=int, default=10, metavar="N", help="leaderboard size (default 10)")
    p.add_argument("--chunk-size", type=int, metavar="N", help="combinations per child op (default: sized)")
    p.add_argument("--random-state", type=int, metavar="N", help="seed for random and tpe")
    p.add_argument("--round-size", type=int, metavar="N", help="tpe: trials per round (default: sized)")
    p.add_argument(
        "--validate-start", default="", metavar="DATE", help="re-run the leaders out of sample from DATE"
    )
    p.add_argument("--validate-end", default="", metavar="DATE", help="... up to this date (inclusive)")
    add_settings_options(p)
    add_job_options(p)
    p.set_defaults(handler=cmd_sweep)


def join_dash_value(args: Sequence[str], option: str) -> list[str]:
    """``[option, "-name"]`` as ``[f"{option}=-name"]``: argparse reads a separate
    ``-name`` as an unknown option and ``option`` as missing its value."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return out + list(args[i:])
        if arg == option and i + 1 < len(args) and _DASH_WORD.fullmatch(args[i + 1]):
            out.append(f"{option}={args[i + 1]}")
            i += 2
            continue
        out.append(arg)
        i += 1
    return out


def parse_space_args(grid: Sequence[str], random: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``--grid`` and ``--random`` as the op's ``space`` (name to tagged dimension, in the
    order given: grids first). UsageError names the option, the text and the accepted form."""
    space: dict[str, dict[str, Any]] = {}
    given: dict[str, str] = {}
    for option, form, texts in (("--grid", GRID_FORM, grid), ("--random", RANDOM_FORM, random)):
        for text in texts:
            try:
                name, dim = parse_grid_arg(text) if option == "--grid" else parse_random_arg(text)
            except SpaceError as exc:
                raise UsageError(f"{option} {text!r}: {exc} (expected {form})") from None
            if name in space:
                raise UsageError(
                    f"{option} {text!r}: parameter {name!r} is already swept by {given[name]}; "
                    "sweep each parameter once"
                )
            space[name] = msgspec.to_builtins(dim)
            given[name] = f"{option} {text!r}"
    return space


def default_method(space: dict[str, dict[str, Any]]) -> str:
    """``tpe`` when any parameter is sampled (``--random``), else ``grid``."""
    return "tpe" if any(dim.get("type") == "random" for dim in space.values()) else "grid"


def _check_sweep(args: argparse.Namespace, space: dict[str, dict[str, Any]], shared: dict[str, Any]) -> str:
    """The method, after the checks that can name an option; UsageError otherwise."""
    if not space:
        raise UsageError("nothing to sweep: give at least one --grid or --random")
    both = [name for name in space if name in shared]
    if both:
        raise UsageError(f"--param {both[0]} is also swept; a parameter is either fixed or swept")
    method: str = args.method or default_method(space)
    sampled = [name for name, dim in space.items() if dim.get("type") == "random"]
    if method == "grid" and sampled:
        raise UsageError(
            f"--method grid needs every parameter as --grid; --random {sampled[0]} needs "
            "--method random or tpe"
        )
    if method != "grid" and args.max_tries is None:
        how = f"--method {method}" if args.method else "--random (the method defaults to tpe)"
        raise UsageError(f"{how} needs --max-tries N, the number of trials")
    for option, value in (("--max-tries", args.max_tries), ("--top", args.top)):
        if value is not None and value < 1:
            raise UsageError(f"{option} must be at least 1, got {value}")
    for option, value in (("--chunk-size", args.chunk_size), ("--round-size", args.round_size)):
        if value is not None and value < 1:
            raise UsageError(f"{option} must be at least 1, got {value}")
    if args.random_state is not None and not 0 <= args.random_state < 2**32:
        raise UsageError(f"--random-state must be 0 to 2**32 - 1, got {args.random_state}")
    if bool(args.validate_start) != bool(args.validate_end):
        raise UsageError("out-of-sample validation needs both --validate-start and --validate-end")
    from runner.sweep.objective import ObjectiveError, parse_maximize

    try:
        parse_maximize(args.maximize)
    except ObjectiveError as exc:
        raise UsageError(f"--{exc}") from None
    if args.constraint.strip():
        from runner.sweep.constraint import ConstraintError, parse_constraint

        try:
            parse_constraint(args.constraint, list(space))
        except ConstraintError as exc:
            raise UsageError(f"--{exc}") from None
    return method


def sweep_params(args: argparse.Namespace) -> dict[str, Any]:
    """The ``sweep`` op's params from the command line; UsageError (naming the option)
    for anything wrong that can be told before submitting."""
    shared = parse_pairs(args.param or [], "--param")
    space = parse_space_args(args.grid or [], args.random or [])
    method = _check_sweep(args, space, shared)
    params: dict[str, Any] = {
        "strategy": args.strategy,
        "symbol": args.symbol,
        "timeframe": args.timeframe,
        "strategy_params": shared,
        **settings_params(args),
        "space": space,
        "method": method,
        "maximize": args.maximize.strip(),
        "top_k": args.top,
    }
    optional = {
        "constraint": args.constraint.strip(),
        "validate_start": args.validate_start,
        "validate_end": args.validate_end,
    }
    params.update({key: value for key, value in optional.items() if value})
    for key, number in (
        ("max_tries", args.max_tries),
        ("random_state", args.random_state),
        ("chunk_size", args.chunk_size),
        ("round_size", args.round_size),
    ):
        if number is not None:
            params[key] = number
    return params


async def cmd_sweep(args: argparse.Namespace, config: Config) -> int:
    """Submit a sweep, follow it, and print its leaderboard (``--json``: the op record)."""
    job = build_job("sweep", sweep_params(args), args)

    async def render(_client: Client, record: OpRecord) -> None:
        print_sweep(record)

    return await submit_and_report(
        job, args, config, render=render, render_states=("completed", "cancelled", "timed_out")
    )


def _headline(record: OpRecord, result: dict[str, Any]) -> str:
    strategy = result.get("strategy") or {}
    name = strategy.get("name") if isinstance(strategy, dict) else strategy
    metric, minimize = objective(result)
    swept = ", ".join(result.get("param_names") or []) or "?"
    goal = f"minimise {metric}" if minimize else f"maximise {metric}"
    return (
        f"sweep {record.op_id}: {name} on {result.get('symbol')} {result.get('timeframe')}, "
        f"{result.get('method', '?')} over {swept}, {goal}"
    )


def print_sweep(record: OpRecord, out: TextIO | None = None) -> None:
    """A finished sweep (completed, or cancelled or timed out with partial results): headline, data,
    leaderboard, summary, the heatmap of a two-parameter grid, and its artifacts."""
    out = out or sys.stdout
    console = console_for(out)
    result = record.result or {}
    print(_headline(record, result), file=out)
    if result.get("data_source"):
        print(f"  data: {result['data_source']}", file=out)
    period = result.get("period") or {}
    if period:
        print(f"  bars: from {period.get('first_bar')} to {period.get('last_bar')}", file=out)
    strategy = result.get("strategy")
    shared = strategy.get("shared_params") if isinstance(strategy, dict) else None
    if shared:
        print("  fixed: " + " ".join(f"{k}={v}" for k, v in shared.items()), file=out)
    for warning in result.get("warnings") or []:
        print(f"  WARNING: {warning}", file=out)
    print(file=out)
    if console.is_terminal:
        console.print(leaderboard_table(result))
    else:
        for line in leaderboard_lines(result):
            print(line, file=out)
    note = validation_note(result)
    if note:
        print(note, file=out)
    if result:
        print(file=out)
        print(summary_line(result), file=out)
    surface = result.get("surface")
    if surface:
        metric, minimize = objective(result)
        print(file=out)
        if console.is_terminal:
            console.print(heatmap_text(surface, metric, minimize))
        else:
            for line in heatmap_lines(surface, metric, minimize):
                print(line, file=out)
    if record.artifacts:
        print("artifacts (object store ktrdr_artifacts):", file=out)
        for name, digest in record.artifacts.items():
            print(f"  {name:<14} {digest}", file=out)
        print(f"  fetch with: ktrdr-run ops artifacts {record.op_id} -o DIR", file=out)
    if record.state in ("cancelled", "timed_out"):
        if record.state == "cancelled":
            why = record.cancel.reason if record.cancel and record.cancel.reason else "no reason given"
        else:
            why = record.error.message if record.error else "past its timeout"
        covered = f"{result.get('done', 0):,}/{result.get('total', 0):,}" if result else "none of the"
        state = record.state.replace("_", " ")
        print(f"sweep {state} ({why}): the results cover {covered} combinations", file=out)
