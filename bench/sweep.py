"""A 640-combination SMA grid: a ktrdr-run ``sweep`` op beside backtesting.py's optimize
and vectorbt.

The grid: ``fast`` in range(5, 85, 5) by ``slow`` in range(10, 210, 5) (16 x 40 = 640
combinations; the ``fast < slow`` ones run) on GOOG daily (backtesting.py's test data),
ranked by final equity. Ours: one ``sweep`` op, timed from submit to its ranked result
known to the client, containers included (the coordinator splits the grid into
``sweep_chunk`` child ops by free capacity, or ``--chunk-size``). The references, in this
process: backtesting.py's ``Backtest.optimize`` of its own canonical ``SmaCross`` on the
same grid, and vectorbt's portfolios of the same pairs (when installed: ``pip install -e
.[bench]``). Each reports its best params. Prints times and ratios.

    python bench/sweep.py [--chunk-size N] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
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
    # backtesting.py draws progress bars on stderr when tqdm is installed (optuna brings it)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        stats = bt.optimize(
            fast=FAST, slow=SLOW, constraint=lambda p: p.fast < p.slow, maximize="Equity Final [$]"
        )
    elapsed = time.perf_counter() - started
    strategy = stats._strategy  # backtesting.py documents the best run's params there
    return elapsed, {"fast": int(strategy.fast), "slow": int(strategy.slow)}


def vectorbt_run() -> tuple[float, dict[str, int]] | None:
    """Seconds for vectorbt's SMA-cross portfolios over the same (fast, slow) pairs, and its
    best pair by final value; None when vectorbt is not installed (``pip install -e .[bench]``).
    Timed warm: numba compiles on the first call, which a warm-up call pays."""
    try:
        import vectorbt as vbt
    except ImportError:
        return None
    from backtesting.test import GOOG

    close = GOOG["Close"]
    pairs = [(f, s) for f in FAST for s in SLOW if f < s]

    def once() -> Any:
        fast = vbt.MA.run(close, [f for f, _ in pairs], short_name="fast")
        slow = vbt.MA.run(close, [s for _, s in pairs], short_name="slow")
        entries, exits = fast.ma_crossed_above(slow), fast.ma_crossed_below(slow)
        portfolio = vbt.Portfolio.from_signals(close, entries, exits, fees=0.001, init_cash=100_000)
        return portfolio.final_value()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        once()
        started = time.perf_counter()
        values = once()
    elapsed = time.perf_counter() - started
    fast_w, slow_w = values.idxmax()
    return elapsed, {"fast": int(fast_w), "slow": int(slow_w)}


def sweep_params(chunk_size: int | None) -> dict[str, Any]:
    """The grid as a ``sweep`` op's params."""
    params: dict[str, Any] = {
        "strategy": "sma_cross",
        "symbol": "GOOG",
        "space": {
            "fast": {"type": "range", "start": FAST.start, "stop": FAST.stop, "step": FAST.step},
            "slow": {"type": "range", "start": SLOW.start, "stop": SLOW.stop, "step": SLOW.step},
        },
        "constraint": "fast < slow",
        "maximize": "final_equity",
        "initial_capital": 100_000,
        "commission": 0.001,
        "slippage": 0.0,
        "close_at_end": True,
    }
    if chunk_size:
        params["chunk_size"] = chunk_size
    return params


async def ours(client: Client, data_dir: Path, chunk_size: int | None) -> tuple[float, dict[str, Any], Any]:
    """Seconds from submit to the ranked result of one ``sweep`` op; its best; its record."""
    started = time.perf_counter()
    op = await client.submit("sweep", sweep_params(chunk_size), data_dir=str(data_dir))
    record = await op.wait(timeout_s=600)
    elapsed = time.perf_counter() - started
    if record.state != "completed" or record.result is None:
        raise SystemExit(f"sweep {record.op_id} ended {record.state}: {record.error}")
    # the sweep completes on its chunks' results; their containers exit just after: let
    # them, so the next run starts on an idle machine (not timed)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        children = [await client.op(c).record() for c in record.children]
        if all(c.terminal for c in children):
            break
        await asyncio.sleep(0.05)
    return elapsed, record.result["best"], record


async def main(chunk_size: int | None, runs: int) -> None:
    data_dir = goog_data_dir()
    try:
        async with bench_stack() as stack:
            client = Client.over(stack.session)
            await ours(client, data_dir, chunk_size)  # warm-up: image, page cache
            timings: list[float] = []
            best: dict[str, Any] = {}
            record = None
            for _ in range(runs):
                elapsed, best, record = await ours(client, data_dir, chunk_size)
                timings.append(elapsed)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    assert record is not None and record.result is not None
    peer = [backtesting_py() for _ in range(runs)]
    peer_s = statistics.median(t for t, _ in peer)
    vbt = vectorbt_run()
    our_s = statistics.median(timings)
    result = record.result
    print(f"grid                        fast {FAST} x slow {SLOW}: 640, {result['done']} with fast < slow")
    print(
        f"ktrdr-run sweep op          median {our_s * 1000:8.1f} ms over {runs} runs "
        f"(submit -> ranked result; {result['children']} chunk ops, containers included)"
    )
    print(f"                            best {best['params']}")
    print(f"backtesting.py optimize     median {peer_s * 1000:8.1f} ms over {runs} runs")
    print(f"                            best {peer[0][1]}")
    print(f"ratio ktrdr-run / backtesting.py   {our_s / peer_s:.3f}   (goal: at most 0.1)")
    if vbt is None:
        print("vectorbt                    not installed (pip install -e .[bench] to compare)")
    else:
        print(f"vectorbt (warm, no numba compile) {vbt[0] * 1000:8.1f} ms")
        print(f"                            best {vbt[1]}")
        print(f"ratio ktrdr-run / vectorbt         {our_s / vbt[0]:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk-size", type=int, help="combinations per chunk (default: the coordinator's)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    run(main(args.chunk_size, args.runs))
