"""``ktrdr-run sweep`` on the client side: options to the op's params, errors before
anything is submitted, and the leaderboard, summary and heatmap drawn from a hand-written
result. No NATS, no Docker; every expected value below is worked out by hand."""

from __future__ import annotations

import argparse
import io
from typing import Any

import msgspec
import pytest

from ktrdr_run import cli_sweep
from ktrdr_run.cli import main, parse_command_line
from ktrdr_run.cli_submit import UsageError, build_job
from ktrdr_run.cli_sweep import join_dash_value, print_sweep, sweep_params
from ktrdr_run.sweep_view import (
    heatmap_legend,
    heatmap_lines,
    heatmap_text,
    leaderboard_lines,
    leaderboard_rows,
    summary_line,
    validation_note,
)
from runner.protocol import OpRecord

BASE = ["sweep", "--strategy", "sma_cross", "--symbol", "DEMO"]


def parse(*extra: str) -> argparse.Namespace:
    return parse_command_line([*BASE, *extra])


def params(*extra: str) -> dict[str, Any]:
    return sweep_params(parse(*extra))


# --- options to params ---------------------------------------------------------------------


def test_two_grids_give_the_whole_params_dict() -> None:
    got = params("--grid", "fast=5:30:5", "--grid", "slow=20:100:10", "--maximize", "sharpe_ratio")
    assert got == {
        "strategy": "sma_cross",
        "symbol": "DEMO",
        "timeframe": "1d",
        "strategy_params": {},
        "initial_capital": 100_000.0,
        "commission": 0.001,
        "slippage": 0.0005,
        "long_only": False,
        "sizing": "all_in",
        "fraction": 1.0,
        "close_at_end": False,
        "space": {
            "fast": {"type": "range", "start": 5, "stop": 30, "step": 5},
            "slow": {"type": "range", "start": 20, "stop": 100, "step": 10},
        },
        "method": "grid",
        "maximize": "sharpe_ratio",
        "top_k": 10,
    }


def test_every_optional_setting_reaches_the_params() -> None:
    got = params(
        "--grid", "fast=5:30", "--grid", "slow=20,50,100", "-p", "exit_bars=3",
        "--timeframe", "1h", "--start", "2020-01-01", "--end", "2021-12-31",
        "--constraint", " fast < slow ", "--max-tries", "40", "--top", "5", "--chunk-size", "100",
        "--random-state", "7", "--round-size", "8",
        "--validate-start", "2022-01-01", "--validate-end", "2022-12-31",
        "--capital", "5000", "--commission", "0", "--slippage", "0.01", "--long-only",
        "--sizing", "fraction", "--fraction", "0.5", "--close-at-end",
    )  # fmt: skip
    assert got["space"] == {
        "fast": {"type": "range", "start": 5, "stop": 30, "step": 1},
        "slow": {"type": "values", "values": [20, 50, 100]},
    }
    assert got["strategy_params"] == {"exit_bars": 3}
    expected = {
        "timeframe": "1h", "start": "2020-01-01", "end": "2021-12-31", "constraint": "fast < slow",
        "max_tries": 40, "top_k": 5, "chunk_size": 100, "random_state": 7, "round_size": 8,
        "validate_start": "2022-01-01", "validate_end": "2022-12-31", "initial_capital": 5000.0,
        "commission": 0.0, "slippage": 0.01, "long_only": True, "sizing": "fraction",
        "fraction": 0.5, "close_at_end": True, "method": "grid", "maximize": "final_equity",
    }  # fmt: skip
    assert {key: got[key] for key in expected} == expected


@pytest.mark.parametrize(
    ("spec", "dimension"),
    [
        ("stop=0.5:2:0.5", {"type": "range", "start": 0.5, "stop": 2, "step": 0.5}),
        ("n=10:0:-2", {"type": "range", "start": 10, "stop": 0, "step": -2}),
        ("th=0.1,0.25,1.5", {"type": "values", "values": [0.1, 0.25, 1.5]}),
        ("ma=sma,ema", {"type": "values", "values": ["sma", "ema"]}),
        ("flag=true,false", {"type": "values", "values": [True, False]}),
        ("one=7", {"type": "values", "values": [7]}),
    ],
)
def test_grid_forms(spec: str, dimension: dict[str, Any]) -> None:
    name = spec.partition("=")[0]
    assert params("--grid", spec)["space"] == {name: dimension}


@pytest.mark.parametrize(
    ("spec", "dimension"),
    [
        ("fast=2:50", {"type": "random", "low": 2, "high": 50, "kind": "int"}),
        ("w=0:1:float", {"type": "random", "low": 0.0, "high": 1.0, "kind": "float"}),
        ("w=0.1:0.9", {"type": "random", "low": 0.1, "high": 0.9, "kind": "float"}),
        ("lr=0.001:0.1:log", {"type": "random", "low": 0.001, "high": 0.1, "kind": "log"}),
    ],
)
def test_random_forms_default_to_tpe(spec: str, dimension: dict[str, Any]) -> None:
    got = params("--random", spec, "--max-tries", "50")
    assert got["space"] == {spec.partition("=")[0]: dimension}
    assert got["method"] == "tpe"
    assert got["max_tries"] == 50


def test_grid_and_random_together_keep_their_order_and_an_explicit_method() -> None:
    got = params("--random", "slow=20:200", "--grid", "fast=5,10", "--method", "random", "--max-tries", "9")
    assert list(got["space"]) == ["fast", "slow"]  # grids first, then random ones
    assert got["method"] == "random"


@pytest.mark.parametrize(
    "argv",
    [
        ["--maximize", "-max_drawdown"],
        ["--maximize=-max_drawdown"],
        ["--maximize", "-max_drawdown", "--grid", "slow=5:9"],
    ],
)
def test_maximize_a_negated_metric_in_either_form(argv: list[str]) -> None:
    args = parse("--grid", "fast=1:3", *argv)
    assert args.maximize == "-max_drawdown"
    assert sweep_params(args)["maximize"] == "-max_drawdown"


def test_a_negated_metric_that_starts_like_a_short_option() -> None:
    # -profit_factor must not read as "-p rofit_factor"
    args = parse("--grid", "fast=1:3", "--maximize", "-profit_factor", "-p", "x=1")
    assert args.maximize == "-profit_factor"
    assert args.param == ["x=1"]


def test_join_dash_value_leaves_the_rest_alone() -> None:
    assert join_dash_value(["--maximize", "-a_b", "-p", "x=1"], "--maximize") == [
        "--maximize=-a_b",
        "-p",
        "x=1",
    ]
    assert join_dash_value(["--maximize", "--json"], "--maximize") == ["--maximize", "--json"]
    assert join_dash_value(["--", "--maximize", "-a_b"], "--maximize") == ["--", "--maximize", "-a_b"]


# --- errors before anything is submitted -------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--grid", "fast=5:x"], ["--grid 'fast=5:x'", "'x' is not a number", "name=start:stop[:step]"]),
        (["--grid", "fast"], ["--grid 'fast'", "name=start:stop[:step] or name=v1,v2,..."]),
        (["--grid", "fast=30:5"], ["--grid 'fast=30:5'", "empty"]),
        (
            ["--random", "lr=0.1:1:exp", "--max-tries", "5"],
            ["--random 'lr=0.1:1:exp'", "'exp'", "name=low:high[:int|float|log]"],
        ),
        (
            ["--grid", "fast=5:30", "--random", "fast=1:9", "--max-tries", "5"],
            ["--random 'fast=1:9'", "'fast'", "--grid 'fast=5:30'"],
        ),
        (["--grid", "fast=5:30", "--grid", "fast=1,2"], ["--grid 'fast=1,2'", "already swept"]),
        (["--grid", "fast=5:30", "-p", "fast=3"], ["--param fast", "fixed or swept"]),
        ([], ["--grid or --random"]),
        (["--random", "fast=1:9"], ["--random", "--max-tries"]),
        (["--random", "fast=1:9", "--method", "grid"], ["--method grid", "--random fast"]),
        (["--grid", "fast=1:9", "--method", "tpe"], ["--method tpe", "--max-tries"]),
        (["--grid", "fast=1:9", "--maximize", "sharpe"], ["--maximize 'sharpe'", "sharpe_ratio"]),
        (["--grid", "fast=1:9", "--constraint", "fast < slow"], ["--constraint 'fast < slow'", "slow"]),
        (["--grid", "fast=1:9", "--top", "0"], ["--top"]),
        (["--grid", "fast=1:9", "--chunk-size", "0"], ["--chunk-size must be at least 1"]),
        (["--grid", "fast=1:9", "--random-state", "-1"], ["--random-state must be 0 to 2**32 - 1"]),
        (["--grid", "fast=1:9", "--validate-start", "2022-01-01"], ["--validate-start and --validate-end"]),
        (["--grid", "fast=1:9", "-p", "slow=9", "--constraint", "fast < slow"], ["--constraint", "slow"]),
    ],
)
def test_usage_errors_name_the_option(extra: list[str], expected: list[str]) -> None:
    with pytest.raises(UsageError) as caught:
        params(*extra)
    for text in expected:
        assert text in str(caught.value)


def test_a_bad_grid_exits_2_without_submitting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KTRDR_RUN_CONFIG", raising=False)

    async def never(*_args: Any, **_kwargs: Any) -> int:
        raise AssertionError("submitted")

    monkeypatch.setattr(cli_sweep, "submit_and_report", never)
    assert main([*BASE, "--grid", "fast=5:x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --grid 'fast=5:x': ")
    assert "expected name=start:stop[:step] or name=v1,v2,..." in err


def test_the_sweep_op_accepts_the_params() -> None:
    args = parse(
        "--grid", "fast=5:30:5", "--grid", "slow=20:100:10", "--constraint", "fast < slow",
        "--maximize", "-max_drawdown", "--end", "2021-12-31",
        "--validate-start", "2022-01-01", "--validate-end", "2022-12-31",
    )  # fmt: skip
    job = build_job("sweep", sweep_params(args), args)
    assert job.kind == "sweep"
    assert job.params["space"]["slow"] == {"type": "range", "start": 20, "stop": 100, "step": 10}
    expected: dict[str, Any] = {"method": "grid", "maximize": "-max_drawdown", "constraint": "fast < slow"}
    expected |= {"validate_start": "2022-01-01", "validate_end": "2022-12-31", "top_k": 10}
    assert {key: job.params[key] for key in expected} == expected


def test_what_only_the_op_knows_is_still_a_usage_error() -> None:
    args = parse("--grid", "nope=1:3")
    with pytest.raises(UsageError, match=r"params\.space\.nope: is not a parameter of strategy sma_cross"):
        build_job("sweep", sweep_params(args), args)


async def test_cmd_sweep_submits_a_sweep_job(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake_build(kind: str, job_params: dict[str, Any], _args: argparse.Namespace) -> str:
        seen.update(kind=kind, params=job_params)
        return "JOB"

    async def fake_submit(job: Any, _args: Any, _config: Any, **kwargs: Any) -> int:
        seen.update(job=job, render=kwargs.get("render"))
        return 0

    monkeypatch.setattr(cli_sweep, "build_job", fake_build)
    monkeypatch.setattr(cli_sweep, "submit_and_report", fake_submit)
    assert await cli_sweep.cmd_sweep(parse("--grid", "fast=1:3"), None) == 0  # type: ignore[arg-type]
    assert seen["kind"] == "sweep" and seen["job"] == "JOB" and seen["render"] is not None
    assert seen["params"]["space"] == {"fast": {"type": "range", "start": 1, "stop": 3, "step": 1}}


# --- rendering ----------------------------------------------------------------------------------


def metrics(**given: Any) -> dict[str, Any]:
    base = {"total_return": 0.0, "sharpe_ratio": None, "max_drawdown": 0.0, "total_trades": 0}
    return {**base, "win_rate": None, "final_equity": 100_000.0, **given}


FIRST = {
    "rank": 1, "index": 4, "params": {"fast": 10, "slow": 40}, "value": 1.5, "validation": None,
    "metrics": metrics(
        total_return=2500.0, sharpe_ratio=1.5, max_drawdown=-800.0, total_trades=12, win_rate=0.5
    ),
}  # fmt: skip
SECOND = {
    "rank": 2, "index": 3, "params": {"fast": 5, "slow": 40}, "value": 0.25, "validation": None,
    "metrics": metrics(
        total_return=300.5, sharpe_ratio=0.25, max_drawdown=-1200.0, total_trades=30, win_rate=0.4
    ),
}  # fmt: skip
SURFACE = {
    "x": "fast",
    "y": "slow",
    "xs": [5, 10, 15],
    "ys": [20, 40],
    "values": [[0.5, None, -1.0], [0.25, 1.5, 0.0]],
}


def result(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "method": "grid", "maximize": "sharpe_ratio", "param_names": ["fast", "slow"],
        "total": 6, "done": 6, "succeeded": 5, "failed": 1, "zero_trade": 1, "excluded": 2, "invalid": 0,
        "leaderboard": [FIRST, SECOND], "best": FIRST, "surface": SURFACE,
        "children": 2, "elapsed_s": 1.5, "combos_per_s": 4.0, "validation": None,
        "symbol": "DEMO", "timeframe": "1d", "strategy": {"name": "sma_cross", "shared_params": {}},
        "period": {"first_bar": "2020-01-01", "last_bar": "2021-12-31"},
        "data_source": "demo", "warnings": [],
    }  # fmt: skip
    return {**base, **overrides}


def test_leaderboard_cells() -> None:
    headers, rows = leaderboard_rows(result())
    assert headers == [
        "#", "fast", "slow", "sharpe_ratio", "total_return", "max_drawdown", "total_trades", "win_rate"
    ]  # fmt: skip
    assert rows == [
        ["1", "10", "40", "1.5000", "2,500.00", "-800.00", "12", "50.00 %"],
        ["2", "5", "40", "0.2500", "300.50", "-1,200.00", "30", "40.00 %"],
    ]


def test_leaderboard_plain_lines_align_params_left_and_numbers_right() -> None:
    lines = leaderboard_lines(result())
    assert lines[0] == "#  fast  slow  sharpe_ratio  total_return  max_drawdown  total_trades  win_rate"
    assert lines[1] == "1  10    40          1.5000      2,500.00       -800.00            12   50.00 %"
    assert lines[2] == "2  5     40          0.2500        300.50     -1,200.00            30   40.00 %"


def test_minimising_names_the_objective_and_drops_it_from_the_key_metrics() -> None:
    board = [{**FIRST, "value": -800.0}]
    headers, rows = leaderboard_rows(result(maximize="-max_drawdown", leaderboard=board))
    assert headers == [
        "#",
        "fast",
        "slow",
        "max_drawdown (min)",
        "total_return",
        "sharpe_ratio",
        "total_trades",
        "win_rate",
    ]
    assert rows == [["1", "10", "40", "-800.00", "2,500.00", "1.5000", "12", "50.00 %"]]


def test_validation_puts_in_and_out_of_sample_side_by_side() -> None:
    first = {**FIRST, "validation": metrics(sharpe_ratio=0.75)}
    board = [first, SECOND]  # SECOND was not validated: n/a
    res = result(leaderboard=board, validation={"start": "2022-01-01", "end": "2022-12-31"})
    headers, rows = leaderboard_rows(res)
    assert headers[3:5] == ["IS sharpe_ratio", "OOS sharpe_ratio"]
    assert [row[3:5] for row in rows] == [["1.5000", "0.7500"], ["0.2500", "n/a"]]
    assert validation_note(res) == (
        "IS = in-sample (2020-01-01 .. 2021-12-31), OOS = out-of-sample (2022-01-01 .. 2022-12-31)"
    )
    assert validation_note(result()) is None


def test_summary_line() -> None:
    assert summary_line(result()) == (
        "6/6 combinations · 1 failed · 1 zero-trade · 2 excluded · 0 invalid · 2 chunk ops · 1.5s · "
        "4.0 combos/s · best fast=10 slow=40 → sharpe_ratio 1.5000"
    )
    assert summary_line(result(best=None)).endswith("· best none")


def test_heatmap_plain_shades_each_cell() -> None:
    # min -1.0, max 1.5 (span 2.5), 9 shades ".:-=+*#%@" at round((v + 1) / 2.5 * 8):
    # 0.5 -> 4.8 -> 5 '*', -1 -> 0 '.', 0.25 -> 4 '+', 1.5 -> 8 '@', 0.0 -> 3.2 -> 3 '='
    assert heatmap_lines(SURFACE, "sharpe_ratio", minimize=False) == [
        "sharpe_ratio by fast (columns) and slow (rows)",
        "slow  5 10 15",
        "  20 ** ·  ..",
        "  40 ++ @@ ==",
        ". min -1.0000 … @ max 1.5000 (higher is better); · no value",
    ]


def test_heatmap_minimising_puts_the_lowest_value_darkest() -> None:
    # 1 - t: 0.5 -> 3.2 -> 3 '=', -1 -> 8 '@', 0.25 -> 4 '+', 1.5 -> 0 '.', 0.0 -> 4.8 -> 5 '*'
    lines = heatmap_lines(SURFACE, "max_drawdown", minimize=True)
    assert lines[2:] == [
        "  20 == ·  @@",
        "  40 ++ .. **",
        ". max 1.50 … @ min -1.00 (lower is better); · no value",
    ]


def test_heatmap_wide_labels_widen_the_cells() -> None:
    surface = {"x": "w", "y": "n", "xs": [0.125, 1], "ys": [3], "values": [[2.0, 4.0]]}
    assert heatmap_lines(surface, "final_equity", minimize=False)[1:3] == ["n 0.125     1", "3 ..... @@@@@"]


def test_heatmap_constant_and_empty_surfaces() -> None:
    same = {"x": "a", "y": "b", "xs": [1, 2], "ys": [1], "values": [[3.0, 3.0]]}
    assert heatmap_lines(same, "total_trades", minimize=False)[2] == "1 @@ @@"
    empty = {"x": "a", "y": "b", "xs": [1], "ys": [1], "values": [[None]]}
    assert heatmap_lines(empty, "total_trades", minimize=False)[2:] == ["1 ·", "no cell has a value (·)"]
    assert heatmap_legend(empty, "total_trades", minimize=True) == "no cell has a value (·)"


def test_heatmap_colours_run_from_red_worst_to_green_best() -> None:
    text = heatmap_text(SURFACE, "sharpe_ratio", minimize=False)
    plain_rows = text.plain.split("\n")
    assert plain_rows[2] == "  20    ·    "  # blocks are blank cells with a background
    backgrounds = [str(span.style) for span in text.spans if str(span.style).startswith("on ")]
    # row 20: 0.5, None, -1.0 (worst: red); row 40: 0.25, 1.5 (best: green), 0.0; then the legend
    assert backgrounds[1] == "on rgb(215,48,39)"
    assert backgrounds[3] == "on rgb(26,152,80)"
    assert "min -1.0000" in text.plain and "max 1.5000" in text.plain


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def record(state: str = "completed", **res: Any) -> OpRecord:
    raw: dict[str, Any] = {
        "op_id": "sw1", "kind": "sweep", "state": state, "result": result(**res),
        "artifacts": {"results": "sha256-abc"},
    }  # fmt: skip
    if state == "cancelled":
        raw["cancel"] = {"reason": "Ctrl-C at the terminal", "requested_at": 1.0}
    if state == "timed_out":
        raw["error"] = {"reason": "timeout", "message": "the sweep ran past its timeout of 60 s"}
    return msgspec.convert(raw, OpRecord)


def test_print_sweep_plain_when_not_a_terminal() -> None:
    out = io.StringIO()
    print_sweep(record(), out)
    text = out.getvalue()
    assert "\x1b[" not in text
    assert text.startswith("sweep sw1: sma_cross on DEMO 1d, grid over fast, slow, maximise sharpe_ratio\n")
    assert "1  10    40          1.5000      2,500.00" in text
    assert "  40 ++ @@ ==\n" in text
    assert "  results        sha256-abc\n" in text
    assert "cancelled" not in text


def test_print_sweep_colours_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NO_COLOR", "TERM", "FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COLORTERM", "truecolor")
    out = Terminal()
    print_sweep(record(), out)
    text = out.getvalue()
    assert "\x1b[" in text
    assert "  40 ++ @@ ==" not in text  # blocks, not shades
    assert "sharpe_ratio by fast (columns) and slow (rows)" in text


def test_print_sweep_without_a_surface_draws_no_heatmap() -> None:
    out = io.StringIO()
    print_sweep(record(surface=None), out)
    assert "(columns)" not in out.getvalue()


def test_a_cancelled_sweep_prints_its_partial_leaderboard() -> None:
    out = io.StringIO()
    print_sweep(record("cancelled", done=3, leaderboard=[SECOND], best=SECOND), out)
    lines = out.getvalue().splitlines()
    assert "2  5     40          0.2500        300.50     -1,200.00            30   40.00 %" in lines
    assert lines[-1] == "sweep cancelled (Ctrl-C at the terminal): the results cover 3/6 combinations"


def test_a_timed_out_sweep_says_so() -> None:
    out = io.StringIO()
    print_sweep(record("timed_out", done=4), out)
    assert out.getvalue().splitlines()[-1] == (
        "sweep timed out (the sweep ran past its timeout of 60 s): the results cover 4/6 combinations"
    )
