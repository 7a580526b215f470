"""A 640-combination SMA grid: ktrdr-run's chunked containers beside backtesting.py's optimize.

The grid: ``fast`` in range(5, 85, 5) by ``slow`` in range(10, 210, 5) (16 x 40 = 640
combinations; the ``fast < slow`` ones run) on GOOG daily (backtesting.py's test data),
ranked by final equity. Ours, timed from submit to every chunk's result known to the
client, containers included: the valid combinations split into ``--chunks`` ``sweep_chunk``
ops run side by side (the coordinator that will do this split itself is still to come;
this measures what it will dispatch). The reference: backtesting.py's ``Backtest.optimize``
of its own canonical ``SmaCross`` on the same grid, in this process. Both runs report the
best params; vectorbt is timed too when it is installed. Prints times and ratios.

    python bench/sweep.py [--chunks 2] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from backtesting import Strategy
from backtesting.lib import crossover
from backtesting.test import SMA
from harness import bench_stack, run

from ktrdr_run import Client
from runner.protocol import Job, new_job_id

FAST, SLOW = range(5, 85, 5), range(10, 210, 5)


class SmaCross(Strategy):
    """backtesting.py's own SMA-cross example (module level: optimize pickles it)."""

    fast = 10
    slow = 30

    def init(self) -> None:
        self.sma1 = self.I(SMA, self.data.Close, self.fast)
        self.sma2 = self.I(SMA, self.data.Close, self.slow)

    def next(self) -> None:
        if crossover(self.sma1, self.sma2):
            self.position.close()
            self.buy()
        elif crossover(self.sma2, self.sma1):
            self.position.close()
            self.sell()


def goog_data_dir() -> Path:
    """GOOG daily in KTRDR's CSV layout, in a fresh temp dir (readable by the runner)."""
    import pandas as pd
    from backtesting.test import GOOG

    directory = Path(tempfile.mkdtemp(prefix="ktrdr-bench-data-"))
    directory.chmod(0o755)
    out = GOOG.rename(columns=str.lower)[["open", "high", "low", "close", "volume"]].copy()
    out.index = pd.DatetimeIndex(out.index).tz_localize("UTC").rename("timestamp")
    out.to_csv(directory / "GOOG_1d.csv", date_format="%Y-%m-%dT%H:%M:%SZ")
    (directory / "GOOG_1d.csv").chmod(0o644)
    return directory


def backtesting_py() -> tuple[float, dict[str, int]]:
    """Seconds for backtesting.py's optimize over the grid, and its best params."""
    from backtesting import Backtest
    from backtesting.test import GOOG

    bt = Backtest(GOOG, SmaCross, cash=100_000, commission=0.001, finalize_trades=True)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = bt.optimize(
            fast=FAST, slow=SLOW, constraint=lambda p: p.fast < p.slow, maximize="Equity Final [$]"
        )
    elapsed = time.perf_counter() - started
    strategy = stats._strategy  # backtesting.py documents the best run's params there
    return elapsed, {"fast": int(strategy.fast), "slow": int(strategy.slow)}


def vectorbt_time() -> float | None:
    """Seconds for vectorbt's SMA-cross grid (the same windows), when vectorbt is installed."""
    try:
        import vectorbt as vbt  # type: ignore[import-not-found]
    except ImportError:
        return None
    from backtesting.test import GOOG

    close = GOOG["Close"]
    started = time.perf_counter()
    fast, slow = vbt.MA.run_combs(
        close, window=sorted(set(FAST) | set(SLOW)), r=2, short_names=["fast", "slow"]
    )
    entries, exits = fast.ma_crossed_above(slow), fast.ma_crossed_below(slow)
    vbt.Portfolio.from_signals(close, entries, exits, fees=0.001, init_cash=100_000).final_value()
    return time.perf_counter() - started


async def ours(client: Client, data_dir: Path, chunks: int) -> tuple[float, dict[str, Any], int]:
    """Seconds from submit to every chunk's result; the best entry; combinations run."""
    combos = [{"fast": f, "slow": s} for f in FAST for s in SLOW if f < s]
    size = -(-len(combos) // chunks)
    started = time.perf_counter()
    ops = []
    for i in range(chunks):
        part = combos[i * size : (i + 1) * size]
        params = {
            "strategy": "sma_cross",
            "symbol": "GOOG",
            "combinations": part,
            "first_index": i * size,
            "maximize": "final_equity",
            "initial_capital": 100_000,
            "commission": 0.001,
            "slippage": 0.0,
            "close_at_end": True,
        }
        job = Job(job_id=new_job_id(), kind="sweep_chunk", params=params, data_dir=str(data_dir))
        ops.append(await client.submit_job(job))
    records = await asyncio.gather(*(op.wait(timeout_s=600) for op in ops))
    elapsed = time.perf_counter() - started
    results = []
    for record in records:
        if record.state != "completed" or record.result is None:
            raise SystemExit(f"chunk {record.op_id} ended {record.state}: {record.error}")
        results += record.result["results"]
    best = max((r for r in results if r["metrics"]), key=lambda r: r["metrics"]["final_equity"])
    return elapsed, best, len(results)


async def main(chunks: int, runs: int) -> None:
    data_dir = goog_data_dir()
    try:
        async with bench_stack() as stack:
            client = Client.over(stack.session)
            await ours(client, data_dir, chunks)  # warm-up: image, page cache
            timings, best, count = [], {}, 0
            for _ in range(runs):
                elapsed, best, count = await ours(client, data_dir, chunks)
                timings.append(elapsed)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    peer = [backtesting_py() for _ in range(runs)]
    peer_s = statistics.median(t for t, _ in peer)
    vbt_s = vectorbt_time()
    our_s = statistics.median(timings)
    print(f"grid                        fast {FAST} x slow {SLOW}: 640, {count} with fast < slow")
    print(f"ktrdr-run ({chunks} chunk ops)     median {our_s * 1000:8.1f} ms over {runs} runs")
    print(f"                            best {best['params']}")
    print(f"backtesting.py optimize     median {peer_s * 1000:8.1f} ms over {runs} runs")
    print(f"                            best {peer[0][1]}")
    print(f"ratio ktrdr-run / backtesting.py   {our_s / peer_s:.3f}   (goal: at most 0.1)")
    if vbt_s is None:
        print("vectorbt                    not installed (pip install vectorbt to compare)")
    else:
        print(f"vectorbt                    {vbt_s * 1000:8.1f} ms")
        print(f"ratio ktrdr-run / vectorbt         {our_s / vbt_s:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    run(main(args.chunks, args.runs))
