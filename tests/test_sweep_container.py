"""A ``sweep_chunk`` op in a real container: one data load, every combination run, each
combination's metrics equal to a single ``backtest`` op of the same params."""

from __future__ import annotations

import pytest

from dispatcher.config import Config
from ktrdr_run import Client
from tests.conftest import RunningDispatcher

pytestmark = [pytest.mark.docker, pytest.mark.nats]


async def test_a_chunk_runs_its_combinations_in_one_container(
    config: Config, dispatcher: RunningDispatcher
) -> None:
    combos = [{"fast": f, "slow": s} for f in (5, 10, 20) for s in (30, 50)] + [{"fast": 40, "slow": 30}]
    async with Client(config) as client:
        chunk = await client.submit(
            "sweep_chunk",
            {"strategy": "sma_cross", "symbol": "DEMO", "combinations": combos, "maximize": "sharpe_ratio"},
        )
        record = await chunk.wait(timeout_s=120)
        assert record.state == "completed", record.error
        results = record.result["results"] if record.result else []
        assert [r["index"] for r in results] == list(range(len(combos)))
        assert results[-1]["error"] and "fast" in results[-1]["error"]  # fast >= slow: rejected, alone
        assert all(r["error"] is None for r in results[:-1])
        single = await client.submit(
            "backtest", {"strategy": "sma_cross", "symbol": "DEMO", "strategy_params": combos[2]}
        )
        alone = await single.wait(timeout_s=120)
        assert alone.result is not None
        assert results[2]["metrics"] == alone.result["metrics"]
        best = max(results[:-1], key=lambda r: r["metrics"]["sharpe_ratio"])
        assert record.result is not None and record.result["best"]["index"] == best["index"]
