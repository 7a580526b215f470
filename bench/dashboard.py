"""Dashboard responsiveness: a full table of 1,000 ops, and key-press latency under load.

Runs against its own nats-server (random port, own store; no Docker, no dispatcher):
``--ops`` realistic op records (every kind and state, progress, results, errors) are
written straight into the ``ktrdr_ops`` KV bucket, then the dashboard runs headless
(``run_test``, 160x50) on a real connected Client.

(a) **Time to the first full table**: from starting the app to the first frame drawn
    with every record in the table (the KV watch's first batch decoded and posted, the
    rows added, the frame rendered; the headless driver drops the output). Reference,
    in the same run and alternating with it: a plain ``client.ops()`` listing of the
    same records on the same connected client. Prints both medians over ``--loads``
    and the ratio.

(b) **Key press to redraw** while ``--streaming`` ops stream progress: each of those
    records is rewritten in KV ``--rate`` times a second (percent, step, metrics), so
    the dashboard takes ~``streaming * rate`` updates a second. A "down" key (or "up" at
    the bottom) is sent through the app's driver, as a terminal's would be, and timed
    until the screen has been re-rendered with the cursor on its new row. Median and
    p95 over ``--presses``; the reference is the same measurement with nothing
    streaming, and the ratio. Also prints how many updates the table applied per
    second meanwhile.

    python bench/dashboard.py [--ops 1000] [--loads 5] [--streaming 20] [--rate 10] [--presses 50]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
from harness import describe, percentile, run
from textual import events

from dispatcher.config import Config, NatsConfig
from dispatcher.connection import connect
from dispatcher.embedded import EmbeddedNats, free_port
from dispatcher.jetstream import JetStreamHandles, ensure_jetstream
from ktrdr_run.client import Client
from runner.protocol import ErrorInfo, OpRecord, ProgressSnapshot, Resources
from tui.app import DashboardApp, dashboard
from tui.main_screen import OpsScreen
from tui.ops_table import OpsTable

SIZE = (160, 50)
KINDS = ("backtest", "backtest", "backtest", "train", "probe", "sweep")
TERMINAL = ("completed", "completed", "completed", "failed", "cancelled", "timed_out")
HOSTS = ("docker-local", "gpu-a100-1", "gpu-a100-2", "lxc-worker-1", "lxc-worker-2", "lxc-worker-3")
USERS = ("ana@lab", "bo@lab", "scheduler@ci", "notebook@lab")
LOAD_TIMEOUT_S = 60.0
PRESS_TIMEOUT_S = 5.0


def realistic(i: int, rng: random.Random, now: float) -> OpRecord:
    """One op record as the dispatcher writes them: params, resources, timestamps per
    transition, last progress, result or error, artifacts, a log tail."""
    kind = KINDS[i % len(KINDS)]
    state = "running" if i % 25 == 0 else ("queued" if i % 40 == 1 else TERMINAL[i % len(TERMINAL)])
    start = now - 86_400 + i * 80.0
    stamps = {"queued": start}
    if state != "queued":
        stamps |= {"placing": start + 0.1, "starting": start + 0.3, "running": start + 1.2}
    if state in TERMINAL:
        stamps[state] = start + 1.2 + rng.uniform(3, 900)
    params: dict[str, Any] = (
        {"strategy": "sma_cross", "symbol": rng.choice(["EURUSD", "BTCUSD", "SPY"]), "fast": 10, "slow": 50}
        if kind == "backtest"
        else {"epochs": 20, "lr": 0.001, "hidden": 64}
        if kind == "train"
        else {"hold_s": 30}
    )
    percent = 100.0 if state == "completed" else rng.uniform(0, 99) if state != "queued" else 0.0
    metrics = {"val_loss": rng.uniform(0.01, 1.0)} if kind == "train" else {"sharpe_ratio": rng.gauss(0.5, 1)}
    result = None
    artifacts: dict[str, str] = {}
    if state == "completed":
        result = {"metrics": {"sharpe_ratio": metrics.get("sharpe_ratio", 0.0), "total_return_pct": 12.5}}
        if kind == "train":
            result = {"val_loss": metrics["val_loss"], "epochs": 20}
        artifacts = {"trades": f"sha256-{i:064x}", "equity_curve": f"sha256-{i + 10**6:064x}"}
    error = (
        ErrorInfo("op_error", "ValueError: no bars in range", "ValueError", traceback="Traceback ...\n" * 8)
        if state == "failed"
        else None
    )
    return OpRecord(
        op_id=f"bench-{i:05d}-{rng.getrandbits(32):08x}",
        kind=kind,
        state=state,  # type: ignore[arg-type]
        params=params,
        params_digest=f"sha256:{rng.getrandbits(256):064x}",
        resources=Resources(cpus=1.0, memory_gb=2.0, gpus=1 if kind == "train" else 0, gpu="never"),
        submitted_by=USERS[i % len(USERS)],
        host="" if state == "queued" else HOSTS[i % len(HOSTS)],
        container_id="" if state == "queued" else f"{rng.getrandbits(256):064x}",
        image="ktrdr-runner:cpu-3f2a9c1e",
        dispatcher="dispatcher-1",
        attempts=0 if state == "queued" else 1,
        timestamps=stamps,
        progress=ProgressSnapshot(percent, "simulate", "simulated 412 trades", metrics, start + 2),
        result=result,
        artifacts=artifacts,
        error=error,
        exit_code=None if state not in TERMINAL else (1 if state == "failed" else 0),
        log_tail=[f"step {n}: ok" for n in range(20)],
    )


async def put_all(handles: JetStreamHandles, records: list[OpRecord]) -> None:
    """Write records into the ops bucket, 100 at a time."""
    for chunk in range(0, len(records), 100):
        batch = records[chunk : chunk + 100]
        await asyncio.gather(*(handles.ops.put(r.op_id, msgspec.json.encode(r)) for r in batch))


@contextlib.asynccontextmanager
async def nats_with_ops(count: int) -> AsyncIterator[tuple[Config, JetStreamHandles, list[OpRecord]]]:
    """A nats-server with JetStream set up and ``count`` records in ``ktrdr_ops``;
    stopped and its store removed afterwards."""
    state = Path(tempfile.mkdtemp(prefix="ktrdr-bench-"))
    server = EmbeddedNats(state / "nats", free_port(), host="0.0.0.0")
    try:
        await server.start()
        config = Config(state_dir=str(state), nats=NatsConfig(url=server.url, embedded=False))
        nc = await connect(server.url, name="bench-writer")
        try:
            handles = await ensure_jetstream(nc, config, mode="apply")
            rng = random.Random(7)
            now = time.time()
            records = [realistic(i, rng, now) for i in range(count)]
            await put_all(handles, records)
            yield config, handles, records
        finally:
            await nc.drain()
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(state, ignore_errors=True)


async def wait_until(check: Callable[[], bool], timeout_s: float, what: str, poll_s: float = 0.001) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(poll_s)


async def time_to_full_table(config: Config, count: int) -> tuple[float, float, float]:
    """Seconds from app start to the first frame drawn with every row in the table, to
    the watch's first batch reaching the table, and spent filling the table."""
    arrived: list[float] = []
    applied: list[float] = []
    painted: list[float] = []
    apply, refresh = OpsTable.apply, OpsScreen._compositor_refresh

    def timed_apply(table: OpsTable, records: list[OpRecord], *, initial: bool) -> None:
        began = time.perf_counter()
        arrived.append(began)
        apply(table, records, initial=initial)
        applied.append(time.perf_counter() - began)

    def timed_refresh(screen: OpsScreen) -> None:
        refresh(screen)
        if not painted and screen.query_one(OpsTable).row_count == count:
            painted.append(time.perf_counter())

    OpsTable.apply = timed_apply  # type: ignore[method-assign]
    OpsScreen._compositor_refresh = timed_refresh  # type: ignore[method-assign]
    try:
        async with dashboard(config, read_only=True) as app:
            start = time.perf_counter()
            async with app.run_test(size=SIZE) as _pilot:
                await wait_until(lambda: bool(painted), LOAD_TIMEOUT_S, f"a frame with {count} rows")
    finally:
        OpsTable.apply = apply  # type: ignore[method-assign]
        OpsScreen._compositor_refresh = refresh  # type: ignore[method-assign]
    return painted[0] - start, arrived[0] - start, sum(applied)


INCOMPLETE_LISTINGS = [0]


async def time_listing(config: Config, count: int) -> float:
    """Seconds for ``client.ops()`` to return every record (client already connected).

    A listing that comes back short is timed again (and counted): the KV watch under it
    can mark the end of the current values before they are delivered (nats-py reads the
    consumer's pending count after the server has already pushed them)."""
    async with Client(config) as client:
        for _ in range(5):
            start = time.perf_counter()
            records = await client.ops()
            elapsed = time.perf_counter() - start
            if len(records) == count:
                return elapsed
            INCOMPLETE_LISTINGS[0] += 1
    raise SystemExit(f"client.ops() returned {len(records)} records, not {count}, 5 times")


class Streamer:
    """Rewrites ``records`` in KV ``rate`` times a second each, as running ops do."""

    def __init__(self, handles: JetStreamHandles, records: list[OpRecord], rate: float) -> None:
        self.handles = handles
        self.records = records
        self.rate = rate
        self.puts = 0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        tick = 0
        next_at = time.monotonic()
        while True:
            tick += 1
            now = time.time()
            for record in self.records:
                record.state = "running"
                record.progress = ProgressSnapshot(
                    percent=(tick * 0.5) % 100,
                    step="epoch",
                    message=f"batch {tick}",
                    metrics={"val_loss": 1.0 / (1 + tick * 0.01), "loss": 0.9 / (1 + tick * 0.01)},
                    ts=now,
                )
            await asyncio.gather(
                *(self.handles.ops.put(r.op_id, msgspec.json.encode(r)) for r in self.records)
            )
            self.puts += len(self.records)
            next_at += 1.0 / self.rate
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def press_latencies(app: DashboardApp, presses: int) -> list[float]:
    """Seconds from a key reaching the app's driver to the screen re-rendered with the
    cursor on its new row, for ``presses`` presses of down (up at the bottom)."""
    table = app.ops_table
    screen = app.main_screen
    original = screen._compositor_refresh
    rendered: dict[str, float] = {}

    def timed_refresh() -> None:
        original()
        if table.cursor_row == rendered.get("want", -1) and "at" not in rendered:
            rendered["at"] = time.perf_counter()

    screen._compositor_refresh = timed_refresh  # type: ignore[method-assign]
    driver = app._driver
    assert driver is not None
    latencies = []
    direction = "down"
    try:
        for _ in range(presses):
            row = table.cursor_row
            if row >= min(table.row_count, 40) - 1:
                direction = "up"
            elif row == 0:
                direction = "down"
            rendered.clear()
            rendered["want"] = row + (1 if direction == "down" else -1)
            start = time.perf_counter()
            driver.send_message(events.Key(direction, None))
            await wait_until(lambda: "at" in rendered, PRESS_TIMEOUT_S, "the redraw")
            latencies.append(rendered["at"] - start)
            await asyncio.sleep(0.05)  # a person's key repeat, not a flood
    finally:
        screen._compositor_refresh = original  # type: ignore[method-assign]
    return latencies


async def measure_presses(
    config: Config, handles: JetStreamHandles, streaming: list[OpRecord], rate: float, presses: int
) -> tuple[list[float], list[float], float]:
    """(latencies while streaming, latencies idle, table updates applied per second)."""
    async with dashboard(config, read_only=True) as app, app.run_test(size=SIZE) as _pilot:
        table = app.ops_table
        await wait_until(lambda: table.row_count > 0 and app.loads == 1, LOAD_TIMEOUT_S, "the table", 0.01)
        await asyncio.sleep(0.5)
        idle = await press_latencies(app, presses)
        updates = 0
        original = table.apply

        def counting_apply(records: list[OpRecord], *, initial: bool) -> None:
            nonlocal updates
            updates += len(records)
            original(records, initial=initial)

        table.apply = counting_apply  # type: ignore[method-assign]
        streamer = Streamer(handles, streaming, rate)
        streamer.start()
        try:
            await asyncio.sleep(1.0)  # in full flow
            began, counted = time.perf_counter(), updates
            busy = await press_latencies(app, presses)
            applied_per_s = (updates - counted) / (time.perf_counter() - began)
        finally:
            await streamer.stop()
    return busy, idle, applied_per_s


async def main(count: int, loads: int, streaming: int, rate: float, presses: int) -> None:
    async with nats_with_ops(count) as (config, handles, records):
        await time_to_full_table(config, count)  # warm-up of each, not counted
        await time_listing(config, count)
        full, arriving, applying, listing = [], [], [], []
        for _ in range(loads):
            elapsed, first_batch, in_apply = await time_to_full_table(config, count)
            full.append(elapsed)
            arriving.append(first_batch)
            applying.append(in_apply)
            listing.append(await time_listing(config, count))
        running = [r for r in records if r.state == "running"][:streaming]
        running += [r for r in records if r.state != "running"][: streaming - len(running)]
        busy, idle, applied_per_s = await measure_presses(config, handles, running, rate, presses)

    full_median, listing_median = statistics.median(full), statistics.median(listing)
    print(f"op records in KV            {count}  (160x50 headless, real nats-server, real Client)")
    print(f"(a) runs                    {loads} each, alternating, after one warm-up each")
    p95_ms = percentile(full, 95) * 1000
    print(f"    dashboard: full table   median {full_median * 1000:7.1f} ms   (p95 {p95_ms:.1f} ms)")
    print(f"      first batch at        median {statistics.median(arriving) * 1000:7.1f} ms")
    print(f"      table fill            median {statistics.median(applying) * 1000:7.1f} ms")
    print(f"    reference client.ops()  median {listing_median * 1000:7.1f} ms")
    print(f"    ratio dashboard / ops() {full_median / listing_median:7.2f}")
    if INCOMPLETE_LISTINGS[0]:
        print(f"    (client.ops() came back short {INCOMPLETE_LISTINGS[0]} time(s); timed again)")
    print(f"(b) key press → redraw      {presses} presses each; {streaming} ops rewritten {rate:g}x/s each")
    print(f"    while streaming         {describe(busy)}")
    print(f"    reference, idle         {describe(idle)}")
    print(f"    ratio streaming / idle  {statistics.median(busy) / statistics.median(idle):7.2f} (median)")
    print(
        f"    table updates           {applied_per_s:7.1f} records/s applied of {streaming * rate:g}/s"
        " written (the newest of each op per 0.2 s batch)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=1000)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--streaming", type=int, default=20)
    parser.add_argument("--rate", type=float, default=10.0)
    parser.add_argument("--presses", type=int, default=50)
    args = parser.parse_args()
    run(main(args.ops, args.loads, args.streaming, args.rate, args.presses))
