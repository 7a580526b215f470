"""`ktrdr-run backtest` through the whole path: real data mounted read-only into a fresh
container, results checked against the independent per-bar reference, artifacts read
back from the object store by digest, bad data rejected before any container."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import docker
import nats
import numpy as np
import pandas as pd
import pytest

from dispatcher.config import Config
from runner.backtest.data import Bars
from tests.conftest import KTRDR_RUN, RunningDispatcher, ktrdr_csv, run_cli, write_config
from tests.test_core_path import containers_created

pytest.importorskip("backtesting")
from backtesting.test import GOOG

from tests.test_backtest_engine import ref_signals, ref_simulate

pytestmark = [pytest.mark.docker, pytest.mark.nats]

METRICS = (
    "total_return total_return_pct annualized_return volatility sharpe_ratio sortino_ratio calmar_ratio "
    "max_drawdown max_drawdown_pct total_trades winning_trades losing_trades win_rate profit_factor "
    "avg_win avg_loss largest_win largest_loss avg_holding_period exposure_pct final_equity "
    "buy_and_hold_return_pct recovery_factor commissions_paid"
).split()


@pytest.fixture
def data_dir(tmp_state: Path) -> Path:
    directory = tmp_state / "data"
    directory.mkdir()
    directory.chmod(0o755)
    tmp_state.chmod(0o755)
    ktrdr_csv(GOOG, directory / "GOOG_1d.csv")
    return directory


async def fetch_artifact(url: str, name: str) -> bytes:
    nc = await nats.connect(url)
    try:
        store = await nc.jetstream().object_store("ktrdr_artifacts")
        return (await store.get(name)).data or b""
    finally:
        await nc.close()


async def test_backtest_json_on_real_data_matches_reference(
    config: Config, tmp_state: Path, data_dir: Path, dispatcher: RunningDispatcher
) -> None:
    config_path = write_config(config, tmp_state / "ktrdr-run.toml")
    args = ["backtest", "--strategy", "sma_cross", "--symbol", "GOOG", "--timeframe", "1d"]
    args += ["-p", "fast=10", "-p", "slow=30", "--data-dir", str(data_dir), "--json"]
    done = await asyncio.to_thread(run_cli, args, config_path)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["state"] == "completed"
    result = record["result"]
    metrics = result["metrics"]
    assert set(METRICS) <= set(metrics), set(METRICS) - set(metrics)
    assert result["synthetic_data"] is False

    # the independent per-bar reference on the same real bars, with the CLI's default costs
    bars = Bars.from_frame(GOOG.rename(columns=str.lower), source="GOOG")
    signals = ref_signals("sma_cross", bars, {"fast": 10, "slow": 30}, False)
    trades, equity = ref_simulate(bars, signals, capital=100_000.0, commission=0.001, slippage=0.0005)
    assert metrics["final_equity"] == pytest.approx(equity[-1], rel=1e-6)
    assert metrics["total_trades"] == len(trades)
    assert metrics["total_return"] == pytest.approx(equity[-1] - 100_000.0, rel=1e-6)
    returns = np.diff(equity) / np.asarray(equity[:-1])
    assert metrics["sharpe_ratio"] == pytest.approx(
        returns.mean() / returns.std(ddof=1) * np.sqrt(252), rel=1e-6
    )
    peak = np.maximum.accumulate(equity)
    assert metrics["max_drawdown_pct"] == pytest.approx(float(np.max((peak - equity) / peak)), rel=1e-6)
    wins = [t["pnl"] for t in trades if t["pnl"] > 0]
    assert metrics["winning_trades"] == len(wins)

    # artifacts: named by the sha256 of their content, readable from the object store
    for name in ("trades", "equity_curve"):
        object_name = record["artifacts"][name]
        data = await fetch_artifact(config.nats.url, object_name)
        assert object_name == "sha256-" + hashlib.sha256(data).hexdigest()
    curve = pd.read_parquet(
        io.BytesIO(await fetch_artifact(config.nats.url, record["artifacts"]["equity_curve"]))
    )
    assert curve["equity"].iloc[-1] == pytest.approx(equity[-1], rel=1e-6)
    stored_trades = pd.read_parquet(
        io.BytesIO(await fetch_artifact(config.nats.url, record["artifacts"]["trades"]))
    )
    closed = stored_trades[~stored_trades["is_open"]]
    assert list(closed["units"]) == [t["units"] for t in trades]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("nan", "NaN"),
        ("missing", "XXX_1d"),
        ("range", "2030"),
    ],
)
async def test_bad_data_is_rejected_before_any_container(
    config: Config,
    tmp_state: Path,
    data_dir: Path,
    dispatcher: RunningDispatcher,
    docker_client: docker.DockerClient,
    case: str,
    expected: str,
) -> None:
    symbol, extra = "GOOG", []
    if case == "nan":
        frame = GOOG.copy()
        frame.iloc[100, frame.columns.get_loc("Close")] = float("nan")
        ktrdr_csv(frame, data_dir / "BAD_1d.csv")
        symbol = "BAD"
    elif case == "missing":
        symbol = "XXX"
    else:
        extra = ["--start", "2030-01-01", "--end", "2031-01-01"]
    config_path = write_config(config, tmp_state / "ktrdr-run.toml")
    job_id = f"bad-{case}-{os.getpid()}-{time.time_ns() % 10**6}"
    since = time.time()
    args = ["backtest", "--strategy", "sma_cross", "--symbol", symbol, "-p", "fast=5", "-p", "slow=20"]
    args += ["--data-dir", str(data_dir), "--job-id", job_id, "--json", *extra]
    done = await asyncio.to_thread(run_cli, args, config_path)
    assert done.returncode == 1, done.stderr
    record = json.loads(done.stdout)
    assert record["state"] == "failed"
    assert record["error"]["reason"] == "invalid_job"
    assert expected in record["error"]["message"]
    assert record["error"]["field"] == "data"
    assert containers_created(docker_client, job_id, since) == 0


async def test_unreadable_data_dir_is_a_clear_error(
    config: Config, tmp_state: Path, data_dir: Path, dispatcher: RunningDispatcher
) -> None:
    data_dir.chmod(0o700)
    config_path = write_config(config, tmp_state / "ktrdr-run.toml")
    args = ["backtest", "--strategy", "sma_cross", "--symbol", "GOOG", "--data-dir", str(data_dir), "--json"]
    done = await asyncio.to_thread(run_cli, args, config_path)
    record = json.loads(done.stdout)
    assert record["error"]["field"] == "data_dir"
    assert "chmod o+rx" in record["error"]["message"]


async def test_ctrl_c_cancels_the_op_and_waits_for_the_ack(
    config: Config, tmp_state: Path, dispatcher: RunningDispatcher
) -> None:
    config_path = write_config(config, tmp_state / "ktrdr-run.toml")
    env = {**os.environ, "KTRDR_RUN_CONFIG": str(config_path)}
    proc = subprocess.Popen(  # noqa: ASYNC220 - the test drives a real CLI process
        [KTRDR_RUN, "submit", "probe", "-p", "hold_s=60", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    try:
        nc = await nats.connect(config.nats.url)
        kv = await nc.jetstream().key_value("ktrdr_ops")
        deadline = time.monotonic() + 60
        running = False
        while time.monotonic() < deadline and not running:
            await asyncio.sleep(0.2)
            keys = []
            try:
                keys = await kv.keys()
            except Exception:  # noqa: BLE001 - the bucket has no keys yet
                pass
            for key in keys:
                entry = await kv.get(key)
                running = running or json.loads(entry.value)["state"] == "running"
        await nc.close()
        assert running, "the op never reached running"
        await asyncio.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    record = json.loads(out)
    assert record["state"] == "cancelled"
    assert record["cancel"]["acked"] is True and record["cancel"]["forced"] is False
    assert record["cancel"]["reason"] == "Ctrl-C at the terminal"
