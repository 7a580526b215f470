"""The ``sweep_chunk`` operation run in-process with ``runner.sdk.local_context``.

The grid check is independent of the engine: backtesting.py's ``Backtest.optimize`` runs
the same grid, configured to the engine's semantics exactly as tests/test_backtest_engine.py
configures it (``peer_run``), acting on signals from that file's per-bar reference loops.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest

import runner.ops.sweep_chunk  # noqa: F401  (registers the op; now a builtin too)
from runner import registry
from runner.errors import Cancelled, DataError, InvalidParams
from runner.ops.sweep_chunk import SweepChunkParams
from runner.protocol import ProgressSnapshot
from runner.sdk import CancelToken, LocalSink, OpContext, local_context
from runner.sweep import chunk as chunk_module
from runner.sweep.constraint import parse_constraint
from runner.sweep.objective import parse_maximize, rank
from runner.sweep.plan import plan_grid
from runner.sweep.space import Range

backtesting = pytest.importorskip("backtesting")
from backtesting import Backtest, Strategy  # noqa: E402
from backtesting.test import GOOG  # noqa: E402

from tests.conftest import ktrdr_csv  # noqa: E402
from tests.test_backtest_engine import ref_sma_cross  # noqa: E402

REL = 1e-6
METRICS = [
    "total_return", "total_return_pct", "annualized_return", "volatility", "sharpe_ratio",
    "sortino_ratio", "calmar_ratio", "max_drawdown", "max_drawdown_pct", "total_trades",
    "winning_trades", "losing_trades", "win_rate", "profit_factor", "avg_win", "avg_loss",
    "largest_win", "largest_loss", "avg_holding_period", "exposure_pct", "final_equity",
    "buy_and_hold_return_pct", "recovery_factor", "commissions_paid",
]  # fmt: skip
SETTINGS: dict[str, Any] = {"initial_capital": 100_000, "commission": 0.001, "slippage": 0.0}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GOOG daily bars (real market data from backtesting.py) in KTRDR's CSV layout."""
    directory = tmp_path_factory.mktemp("data")
    ktrdr_csv(GOOG, directory / "GOOG_1d.csv")
    return directory


def _op() -> registry.Operation:
    return registry.get("sweep_chunk")


def _params(combinations: list[dict[str, Any]], **extra: Any) -> SweepChunkParams:
    raw = {"strategy": "sma_cross", "symbol": "GOOG", "combinations": combinations, **SETTINGS, **extra}
    parsed = _op().parse_params(raw)
    assert isinstance(parsed, SweepChunkParams)
    return parsed


def _run(
    params: SweepChunkParams, data_dir: Path | None, scratch: Path, ctx: OpContext | None = None
) -> tuple[dict[str, Any], LocalSink]:
    sink = LocalSink()
    if ctx is None:
        ctx, sink = local_context("sweep_chunk", data_dir=data_dir, scratch_dir=scratch)
    return _op().fn(ctx, params), sink


# --- backtesting.py's optimize on the same grid -------------------------------------------


class SmaCrossFollow(Strategy):
    """backtesting.py acting on changes of the reference sma_cross signals (decided on bar
    i, filled at i+1), as ``peer_run`` in tests/test_backtest_engine.py does."""

    fast = 10
    slow = 30

    def init(self) -> None:
        close = SimpleNamespace(close=np.asarray(self.data.Close, dtype=np.float64))
        self.sig = ref_sma_cross(close, int(self.fast), int(self.slow), False)  # type: ignore[arg-type]

    def next(self) -> None:
        i = len(self.data) - 1
        want, before = self.sig[i], self.sig[i - 1]
        if want == before:
            return
        if self.position:
            self.position.close()
        if want > 0:
            self.buy(size=1 - 1e-12)
        elif want < 0:
            self.sell(size=1 - 1e-12)


def peer_optimize(fast: range, slow: range) -> tuple[pd.Series, pd.Series]:
    bt = Backtest(
        GOOG,
        SmaCrossFollow,
        cash=SETTINGS["initial_capital"],
        commission=SETTINGS["commission"],
        spread=0.0,
        margin=1.0,
        trade_on_close=False,
        hedging=False,
        exclusive_orders=False,
        finalize_trades=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats, heatmap = bt.optimize(
            fast=fast,
            slow=slow,
            constraint=lambda p: p.fast < p.slow,
            maximize="Equity Final [$]",
            return_heatmap=True,
        )
    return stats, heatmap


def test_grid_ranks_as_backtesting_py_optimize(data_dir: Path, tmp_path: Path) -> None:
    fast, slow = range(5, 30, 5), range(10, 70, 10)
    space = {"fast": Range(5, 30, 5), "slow": Range(10, 70, 10)}
    plan = plan_grid(space, "sma_cross", constraint=parse_constraint("fast < slow", space))
    result, _ = _run(_params(plan.combinations, maximize="final_equity"), data_dir, tmp_path)
    assert result["count"] == result["succeeded"] == len(plan.combinations) == 24
    assert result["failed"] == 0

    stats, heatmap = peer_optimize(fast, slow)
    assert len(heatmap) == 24 and heatmap.notna().all()
    ranked = rank(result["results"], parse_maximize("final_equity"))
    best = ranked[0]
    assert (best["params"]["fast"], best["params"]["slow"]) == (stats._strategy.fast, stats._strategy.slow)
    assert best["metrics"]["final_equity"] == pytest.approx(float(stats["Equity Final [$]"]), rel=REL)
    assert result["best"] == best
    # every combination, not only the best: the same final equity, so the same ranking
    for entry in result["results"]:
        peer = float(heatmap[(entry["params"]["fast"], entry["params"]["slow"])])
        assert entry["metrics"]["final_equity"] == pytest.approx(peer, rel=REL), entry["params"]
    peer_order = [tuple(int(v) for v in p) for p in heatmap.sort_values(ascending=False, kind="stable").index]
    ours = [(e["params"]["fast"], e["params"]["slow"]) for e in ranked]
    assert ours == peer_order
    # the best is a clear winner, not a tie decided by order
    second = ranked[1]["metrics"]["final_equity"]
    assert best["metrics"]["final_equity"] > second * (1 + 1e-3)


def test_each_combination_matches_the_backtest_op(data_dir: Path, tmp_path: Path) -> None:
    combos = [{"fast": 10, "slow": 30}, {"fast": 20, "slow": 50}]
    result, _ = _run(_params(combos, slippage=0.0005, long_only=True), data_dir, tmp_path)
    backtest = registry.get("backtest")
    for entry, combo in zip(result["results"], combos, strict=True):
        ctx, _ = local_context("backtest", data_dir=data_dir, scratch_dir=tmp_path)
        raw = {"strategy": "sma_cross", "symbol": "GOOG", "strategy_params": combo, "long_only": True}
        raw |= {**SETTINGS, "slippage": 0.0005}
        single = backtest.fn(ctx, backtest.parse_params(raw))
        assert list(entry["metrics"]) == METRICS
        assert entry["metrics"] == single["metrics"]
        assert entry["params"] == combo and entry["error"] is None
    assert result["period"] == single["period"] and result["bars"] == single["bars"]
    assert result["periods_per_year"] == single["periods_per_year"] == 252.0


def test_rejected_combinations_get_errors_and_the_rest_complete(data_dir: Path, tmp_path: Path) -> None:
    combos: list[dict[str, Any]] = [
        {"fast": 10, "slow": 30},
        {"fast": 30, "slow": 10},  # the strategy's own rule: fast < slow
        {"fast": 5, "slow": 20_000},  # over the field's bound
        {"fast": "x", "slow": 20},  # not a number
        {"fast": 5, "slow": 5_000},  # valid, but more warm-up than the data has
        {"fast": 1_000, "slow": 2_000},  # valid, and no cross: no trade
        {"fast": 20, "slow": 50},
    ]
    result, sink = _run(_params(combos, first_index=100, maximize="sharpe_ratio"), data_dir, tmp_path)
    entries = result["results"]
    assert [e["index"] for e in entries] == list(range(100, 107))
    assert [e["error"] is None for e in entries] == [True, False, False, False, False, True, True]
    assert entries[1]["error"] == "fast (30) must be smaller than slow (10)"
    assert entries[2]["error"].startswith("slow: Expected `int` <= 10000")
    assert entries[3]["error"].startswith("fast: Expected `int`")
    assert "needs at least 5002" in entries[4]["error"]
    assert all(e["metrics"] is None for e in entries if e["error"])
    assert (result["count"], result["succeeded"], result["failed"], result["zero_trade"]) == (7, 3, 4, 1)
    assert entries[5]["metrics"]["total_trades"] == 0 and entries[5]["metrics"]["sharpe_ratio"] is None
    # the zero-trade combination has no Sharpe ratio: it ranks after both that have one
    ranked = rank(entries, parse_maximize("sharpe_ratio"))
    assert {e["index"] for e in ranked[:2]} == {100, 106}
    assert [e["index"] for e in ranked[2:]] == [101, 102, 103, 104, 105]
    assert result["best"]["index"] == ranked[0]["index"]
    last = sink.progress_reports[-1]
    assert last.metrics["done"] == last.metrics["total"] == 7 and last.metrics["failed"] == 4


def test_progress_reports_done_rate_and_best(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chunk_module, "PROGRESS_EVERY_S", 0.0)
    combos = [{"fast": f, "slow": s} for f in (5, 10, 20) for s in (30, 60)]
    result, sink = _run(_params(combos, maximize="-max_drawdown_pct"), data_dir, tmp_path)
    running = [p for p in sink.progress_reports if p.step == "combinations"]
    assert [p.metrics["done"] for p in running] == [1, 2, 3, 4, 5, 6, 6]
    assert all(p.metrics["total"] == 6 and p.metrics["combos_per_s"] > 0 for p in running)
    percents = [p.percent for p in sink.progress_reports]
    assert percents == sorted(percents) and percents[-1] == 100.0
    # best so far, by an independent pass over the results: the lowest drawdown seen yet
    for report, upto in zip(running, range(1, 7), strict=False):
        want = min(e["metrics"]["max_drawdown_pct"] for e in result["results"][:upto])
        assert report.metrics["best"] == want
        assert "best -max_drawdown_pct=" in report.message
    assert result["best"]["metrics"]["max_drawdown_pct"] == running[-1].metrics["best"]
    assert result["maximize"] == "-max_drawdown_pct"
    assert result["combos_per_s"] > 0 and result["elapsed_s"] > 0


def test_cancel_between_combinations(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunk_module, "PROGRESS_EVERY_S", 0.0)
    token = CancelToken()

    class CancelAfterThree(LocalSink):
        def progress(self, snapshot: ProgressSnapshot, milestone: bool = False) -> None:
            super().progress(snapshot, milestone)
            if snapshot.step == "combinations" and snapshot.metrics["done"] >= 3:
                token.cancel("stop the sweep")

    sink = CancelAfterThree()
    ctx = OpContext(
        op_id="t", kind="sweep_chunk", sink=sink, cancel_token=token, data_dir=data_dir, scratch_dir=tmp_path
    )
    combos = [{"fast": f, "slow": 60} for f in range(5, 55, 5)]
    with pytest.raises(Cancelled, match="stop the sweep"):
        _op().fn(ctx, _params(combos))
    done = [p.metrics["done"] for p in sink.progress_reports if p.step == "combinations"]
    assert done == [1, 2, 3], "the fourth combination never started"


def test_cancel_before_start(data_dir: Path, tmp_path: Path) -> None:
    ctx, _ = local_context("sweep_chunk", data_dir=data_dir, scratch_dir=tmp_path)
    ctx.cancel_token.cancel("early")
    with pytest.raises(Cancelled):
        _op().fn(ctx, _params([{"fast": 5, "slow": 10}]))


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"combinations": []}, "combinations"),
        ({"combinations": [{"fast": 5}, {"fats": 5}]}, "combinations[1].fats"),
        ({"strategy_params": {"slwo": 5}}, "strategy_params.slwo"),
        ({"maximize": "sharpe"}, "maximize"),
        ({"strategy": "nope"}, "strategy"),
        ({"first_index": -1}, "first_index"),
        ({"fraction": 0.5}, "fraction"),
        ({"start": "2021-01-01", "end": "2020-01-01"}, "end"),
        ({"combinations": [{"fast": [5]}]}, "combinations[0][...]"),  # msgspec names no dict key
        ({"combinationz": [{"fast": 5}]}, "combinationz"),
    ],
)
def test_invalid_params_name_the_field(extra: dict[str, Any], field: str) -> None:
    raw = {"strategy": "sma_cross", "symbol": "GOOG", "combinations": [{"fast": 5, "slow": 10}], **extra}
    with pytest.raises(InvalidParams) as info:
        _op().parse_params(raw)
    assert info.value.field == field, str(info.value)
    if field == "maximize":
        assert "known metrics" in str(info.value)


def test_shared_params_and_overrides(data_dir: Path, tmp_path: Path) -> None:
    # shared slow=30; each combination sets fast (and one overrides slow)
    result, _ = _run(
        _params([{"fast": 10}, {"fast": 10, "slow": 50}], strategy_params={"slow": 30}), data_dir, tmp_path
    )
    direct, _ = _run(_params([{"fast": 10, "slow": 30}, {"fast": 10, "slow": 50}]), data_dir, tmp_path)
    assert [e["metrics"] for e in result["results"]] == [e["metrics"] for e in direct["results"]]
    assert result["strategy"] == {"name": "sma_cross", "shared_params": {"slow": 30}}


def test_preflight(data_dir: Path, tmp_path: Path) -> None:
    preflight = _op().preflight
    assert preflight is not None
    preflight(_params([{"fast": 30, "slow": 10}, {"fast": 5, "slow": 10}]), data_dir)
    with pytest.raises(DataError, match="XXX_1d"):
        preflight(_params([{"fast": 5, "slow": 10}], symbol="XXX"), data_dir)
    # no combination has enough bars: fails before any container starts
    with pytest.raises(DataError, match="needs at least 5002"):
        preflight(_params([{"fast": 5, "slow": 5_000}, {"fast": 5, "slow": 6_000}]), data_dir)
    with pytest.raises(DataError, match="no data directory is mounted"):
        preflight(_params([{"fast": 5, "slow": 10}]), None)


def test_demo_data_needs_no_directory(tmp_path: Path) -> None:
    result, sink = _run(
        _params([{"fast": 5, "slow": 20}, {"fast": 10, "slow": 40}], symbol="DEMO"), None, tmp_path
    )
    assert result["synthetic_data"] is True and result["succeeded"] == 2
    assert any(level == "warning" and "DEMO" in message for level, message in sink.logs)


def test_registered_and_cheap_to_import() -> None:
    op = _op()
    assert op.gpu == "never" and op.check is not None and op.preflight is not None
    code = (
        "import sys, runner.ops.sweep_chunk, runner.registry as r; r.get('sweep_chunk'); "
        "print(sorted(m for m in ('numpy', 'pandas', 'pyarrow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
