"""The ``backtest`` operation run in-process with ``runner.sdk.local_context``."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from runner import registry
from runner.errors import Cancelled, DataError, InvalidParams
from runner.ops.backtest import BacktestParams
from runner.protocol import ProgressSnapshot
from runner.sdk import CancelToken, LocalSink, OpContext, artifact_name, local_context

METRICS = [
    "total_return", "total_return_pct", "annualized_return", "volatility", "sharpe_ratio",
    "sortino_ratio", "calmar_ratio", "max_drawdown", "max_drawdown_pct", "total_trades",
    "winning_trades", "losing_trades", "win_rate", "profit_factor", "avg_win", "avg_loss",
    "largest_win", "largest_loss", "avg_holding_period", "exposure_pct", "final_equity",
    "buy_and_hold_return_pct", "recovery_factor", "commissions_paid",
]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GOOG daily bars (real market data from backtesting.py) in KTRDR's CSV layout."""
    goog = pytest.importorskip("backtesting.test").GOOG
    frame = goog.rename(columns=str.lower)
    frame.index = frame.index.tz_localize("UTC").rename("timestamp")
    directory = tmp_path_factory.mktemp("data")
    frame.to_csv(directory / "GOOG_1d.csv", date_format="%Y-%m-%dT%H:%M:%SZ")
    return directory


def _op() -> registry.Operation:
    return registry.get("backtest")


def _run(
    params: dict[str, Any], data_dir: Path | None, scratch: Path
) -> tuple[dict[str, Any], LocalSink, OpContext]:
    op = _op()
    ctx, sink = local_context("backtest", data_dir=data_dir, scratch_dir=scratch)
    return op.fn(ctx, op.parse_params(params)), sink, ctx


def test_registered_and_cheap_to_import() -> None:
    assert "backtest" in registry.kinds()
    assert _op().gpu == "never"
    code = (
        "import sys, runner.registry as r; r.get('backtest'); "
        "print(sorted(m for m in ('numpy', 'pandas', 'pyarrow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_params_defaults_are_ktrdrs() -> None:
    p = _op().parse_params({"strategy": "sma_cross", "symbol": "AAPL"})
    assert isinstance(p, BacktestParams)
    assert (p.initial_capital, p.commission, p.slippage) == (100_000.0, 0.001, 0.0005)
    assert (p.timeframe, p.sizing, p.long_only, p.close_at_end) == ("1d", "all_in", False, False)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"strategy": "sma_cross", "symbol": "A", "capital": 5}, "capital"),
        ({"strategy": "nope", "symbol": "A"}, "strategy"),
        ({"strategy": "sma_cross", "symbol": "A", "strategy_params": {"fast": 50}}, "strategy_params"),
        ({"strategy": "sma_cross", "symbol": "A", "strategy_params": {"fats": 5}}, "strategy_params.fats"),
        ({"strategy": "rsi_reversion", "symbol": "A", "strategy_params": {"period": 1}},
         "strategy_params.period"),
        ({"strategy": "sma_cross", "symbol": "../x"}, "symbol"),
        ({"strategy": "sma_cross", "symbol": "A", "commission": -0.1}, "commission"),
        ({"strategy": "sma_cross", "symbol": "A", "sizing": "kelly"}, "sizing"),
        ({"strategy": "sma_cross", "symbol": "A", "fraction": 0.5}, "fraction"),
        ({"strategy": "sma_cross", "symbol": "A", "start": "01/02/2020"}, "start"),
        ({"strategy": "sma_cross", "symbol": "A", "start": "2021-01-01", "end": "2020-01-01"}, "end"),
    ],
)  # fmt: skip
def test_invalid_params_name_the_field(params: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidParams) as info:
        _op().parse_params(params)
    assert info.value.field == field, str(info.value)


def test_cli_strings_are_accepted() -> None:
    p = _op().parse_params(
        {
            "strategy": "sma_cross",
            "symbol": "A",
            "initial_capital": "5000",
            "long_only": "true",
            "strategy_params": {"fast": "5", "slow": "20"},
        },
        strict=False,
    )
    assert isinstance(p, BacktestParams)
    assert p.initial_capital == 5000.0 and p.long_only is True


def test_backtest_on_real_data(data_dir: Path, tmp_path: Path) -> None:
    params = {
        "strategy": "sma_cross",
        "symbol": "GOOG",
        "start": "2005-01-01",
        "end": "2012-12-31",
        "strategy_params": {"fast": 10, "slow": 30},
    }
    result, sink, ctx = _run(params, data_dir, tmp_path)

    # JSON-ready builtins only, every metric present.
    text = json.dumps(result, allow_nan=False)
    assert json.loads(text) == result
    assert list(result["metrics"]) == METRICS
    assert result["data_source"] == "data file GOOG_1d.csv" and not result["synthetic_data"]
    assert result["period"] == {"first_bar": "2005-01-03T00:00:00Z", "last_bar": "2012-12-31T00:00:00Z"}
    assert result["strategy"]["params"] == {"fast": 10, "slow": 30}
    assert result["strategy"]["warmup"] == 30

    # Progress: from 0 to 100, never backwards, through every stage.
    reports = sink.progress_reports
    percents = [r.percent for r in reports]
    assert percents[0] == 0 and percents[-1] == 100 and percents == sorted(percents)
    steps = [r.step for r in reports]
    for step in ("load", "signals", "simulate", "metrics", "artifacts", "done"):
        assert step in steps
    assert any(r.metrics.get("bars") == result["bars"] for r in reports)

    # Artifacts: stored under their digests and readable as Parquet.
    assert set(result["artifacts"]) == {"trades", "equity_curve"} == set(ctx.artifacts)
    trades = pq.read_table(io.BytesIO(sink.stored[result["artifacts"]["trades"]])).to_pandas()
    curve = pq.read_table(io.BytesIO(sink.stored[result["artifacts"]["equity_curve"]])).to_pandas()
    for name, digest in result["artifacts"].items():
        assert digest == artifact_name(sink.stored[digest]), name
    assert len(curve) == result["bars"]
    assert curve["equity"].iloc[-1] == pytest.approx(result["metrics"]["final_equity"])
    assert str(curve["timestamp"].dt.tz) == "UTC"
    closed = trades[~trades["is_open"]]
    assert (
        len(closed)
        == result["metrics"]["total_trades"]
        == result["trades_preview"]["total"] - int(trades["is_open"].any())
    )
    assert (closed["pnl"] > 0).sum() == result["metrics"]["winning_trades"]
    # Equity bookkeeping: initial capital plus every trade's pnl is the final equity.
    assert 100_000 + trades["pnl"].sum() == pytest.approx(result["metrics"]["final_equity"], rel=1e-9)
    assert result["trades_preview"]["first"][0]["entry_time"] == trades["entry_time"].iloc[0].strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    # Metrics recomputed from the stored equity curve.
    eq = curve["equity"].to_numpy()
    peak = np.maximum.accumulate(eq)
    assert result["metrics"]["max_drawdown_pct"] == pytest.approx(((peak - eq) / peak).max())
    assert result["metrics"]["exposure_pct"] == pytest.approx((curve["units"] != 0).mean())
    r = np.diff(eq) / eq[:-1]
    assert result["metrics"]["sharpe_ratio"] == pytest.approx(r.mean() / r.std(ddof=1) * np.sqrt(252))


def test_identical_runs_store_identical_artifacts(data_dir: Path, tmp_path: Path) -> None:
    params = {"strategy": "donchian_breakout", "symbol": "GOOG", "long_only": True}
    first, _, _ = _run(params, data_dir, tmp_path / "a")
    second, _, _ = _run(params, data_dir, tmp_path / "b")
    assert first["artifacts"] == second["artifacts"]
    assert first["metrics"] == second["metrics"]


def test_demo_data_is_generated_and_flagged(tmp_path: Path) -> None:
    result, sink, _ = _run({"strategy": "sma_cross", "symbol": "DEMO"}, None, tmp_path)
    assert result["synthetic_data"] is True
    assert "synthetic" in result["data_source"] and "not market data" in result["data_source"]
    assert any("synthetic" in message for _, message in sink.logs)
    assert (tmp_path / "demo-data" / "DEMO_1d.csv").is_file()
    assert result["metrics"]["total_trades"] > 0
    again, _, _ = _run({"strategy": "sma_cross", "symbol": "DEMO"}, None, tmp_path / "x")
    assert again["artifacts"] == result["artifacts"], "demo data is deterministic"


def test_real_symbol_without_data_dir_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no data directory is mounted"):
        _run({"strategy": "sma_cross", "symbol": "GOOG"}, None, tmp_path)


def test_bad_data_fails_before_any_artifact(tmp_path: Path) -> None:
    frame = pd.DataFrame(
        {"open": [1.0, 2.0], "high": [1.0, 2.0], "low": [1.0, 2.0], "close": [1.0, -2.0], "volume": 1},
        index=pd.DatetimeIndex(["2024-01-01", "2024-01-02"], name="timestamp"),
    )
    frame.to_csv(tmp_path / "BAD_1d.csv")
    op = _op()
    ctx, sink = local_context("backtest", data_dir=tmp_path, scratch_dir=tmp_path)
    with pytest.raises(DataError, match=r"BAD_1d\.csv: column 'close' has 1 non-positive"):
        op.fn(ctx, op.parse_params({"strategy": "sma_cross", "symbol": "BAD"}))
    assert sink.stored == {}


def test_cancel_before_start(data_dir: Path, tmp_path: Path) -> None:
    op = _op()
    token = CancelToken()
    token.cancel("user asked")
    ctx, sink = local_context("backtest", data_dir=data_dir, scratch_dir=tmp_path, cancel_token=token)
    with pytest.raises(Cancelled, match="user asked"):
        op.fn(ctx, op.parse_params({"strategy": "sma_cross", "symbol": "GOOG"}))
    assert sink.stored == {}


@pytest.mark.parametrize("trip_at", ["load", "signals", "simulate", "metrics"])
def test_cancel_is_honoured_at_the_next_checkpoint(data_dir: Path, tmp_path: Path, trip_at: str) -> None:
    op = _op()
    ctx, sink = local_context("backtest", data_dir=data_dir, scratch_dir=tmp_path)
    record = sink.progress

    def progress(snapshot: ProgressSnapshot, milestone: bool = False) -> None:
        record(snapshot, milestone)
        if snapshot.step == trip_at:
            ctx.cancel_token.cancel("stop")

    sink.progress = progress  # type: ignore[method-assign]
    with pytest.raises(Cancelled):
        op.fn(ctx, op.parse_params({"strategy": "rsi_reversion", "symbol": "GOOG"}))
    assert sink.stored == {} and ctx.artifacts == {}
    steps = [r.step for r in sink.progress_reports]
    assert "done" not in steps and "artifacts" not in steps


def test_job_message_round_trip() -> None:
    """The params a client would publish decode into the struct and back."""
    raw = msgspec.json.encode(
        {"strategy": "bollinger_reversion", "symbol": "EURUSD", "timeframe": "1h",
         "strategy_params": {"period": 20, "k": 2.5}, "close_at_end": True}
    )  # fmt: skip
    p = _op().parse_params(msgspec.json.decode(raw))
    assert msgspec.to_builtins(p)["strategy_params"] == {"period": 20, "k": 2.5}


def test_preflight_is_registered_for_the_dispatcher(tmp_path: Path) -> None:
    op = _op()
    assert op.preflight is not None
    params = op.parse_params({"strategy": "sma_cross", "symbol": "NOPE"})
    with pytest.raises(DataError, match=r"NOPE_1d\.csv: data file not found"):
        op.preflight(params, tmp_path)
    op.preflight(op.parse_params({"strategy": "sma_cross", "symbol": "DEMO"}), None)
