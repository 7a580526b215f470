"""The dashboard's detail of a ``sweep`` op: its standing, leaderboard and best-so-far curve.

Fixed records through the same stand-in for the Client as the dashboard's snapshot tests
(no NATS, no Docker); a running sweep gets newer records pushed through the watch, as the
KV watch would deliver them. Figures are checked against values worked out by hand from
the records built here.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import Any

from textual.pilot import Pilot
from textual.widgets import DataTable, RichLog, Static

from runner.protocol import Event, LogEvent, OpRecord, ProgressEvent, StatusEvent, TrialEvent
from tests.test_dashboard import HOSTS, NOW, T0, FixedSource, record, select, until
from tui.app import DashboardApp
from tui.detail import OpDetailScreen, event_line
from tui.sweep_detail import CURVE_ROWS, BestCurve, BestHistory, SweepView, curve_lines

BRAILLE_BLANK = "\u2800"
TOP_DOTS = 0x01 | 0x08  # the top dot row of a braille cell
BOTTOM_DOTS = 0x40 | 0x80  # its bottom dot row

CHILDREN = [f"sweep-sma-01-c{i}" for i in range(4)]


def entry(rank: int, index: int, fast: int, slow: int, value: float, **metrics: Any) -> dict[str, Any]:
    """A leaderboard entry; ``oos`` is the out-of-sample final equity (None: not validated)."""
    oos = metrics.pop("oos")
    return {
        "rank": rank,
        "index": index,
        "params": {"fast": fast, "slow": slow},
        "value": value,
        "metrics": {"final_equity": value, **metrics},
        "validation": None if oos is None else {"final_equity": oos, "total_trades": 3},
    }


LEADERBOARD = [
    entry(1, 17, 10, 30, 12345.6, total_return=2345.6, sharpe_ratio=1.274, max_drawdown=812.5,
          total_trades=14, oos=11020.4),
    entry(2, 23, 10, 40, 12100.0, total_return=2100.0, sharpe_ratio=1.108, max_drawdown=640.25,
          total_trades=11, oos=10490.2),
    entry(3, 9, 5, 40, 11875.25, total_return=1875.25, sharpe_ratio=0.9871, max_drawdown=1203.0,
          total_trades=22, oos=9874.7),
    entry(4, 31, 15, 50, 11020.0, total_return=1020.0, sharpe_ratio=0.6452, max_drawdown=950.0,
          total_trades=8, oos=None),
    entry(5, 4, 5, 20, 10500.8, total_return=500.8, sharpe_ratio=0.31, max_drawdown=2200.75,
          total_trades=35, oos=10010.0),
]  # fmt: skip
#: What the leaderboard shows, worked out by hand from LEADERBOARD: rank, fast, slow,
#: final_equity, out-of-sample final_equity, total_return, sharpe_ratio, max_drawdown, trades.
EXPECTED_ROWS = [
    ["1", "10", "30", "12,346", "11,020", "2,346", "1.27", "812.50", "14"],
    ["2", "10", "40", "12,100", "10,490", "2,100", "1.11", "640.25", "11"],
    ["3", "5", "40", "11,875", "9,875", "1,875", "0.987", "1,203", "22"],
    ["4", "15", "50", "11,020", "-", "1,020", "0.645", "950.00", "8"],
    ["5", "5", "20", "10,501", "10,010", "500.80", "0.31", "2,201", "35"],
]
EXPECTED_COLUMNS = [
    "#", "fast", "slow", "final_equity ▲", "out-of-sample",
    "return", "sharpe", "max dd", "trades",
]  # fmt: skip
#: Combinations 1-4 at the 5th's value, then three improvements; the best is found at 18.
BEST_CURVE = [[1, 10500.8], [2, 10500.8], [5, 11020.0], [10, 11875.25], [18, 12345.6], [54, 12345.6]]

PARAMS = {
    "strategy": "sma_cross",
    "symbol": "DEMO",
    "timeframe": "1d",
    "start": "2020-01-01",
    "end": "2023-12-31",
    "space": {
        "fast": {"type": "range", "start": 5, "stop": 35, "step": 5},
        "slow": {"type": "range", "start": 20, "stop": 110, "step": 10},
    },
    "method": "grid",
    "maximize": "final_equity",
    "top_k": 5,
    "validate_start": "2024-01-01",
    "validate_end": "2024-06-30",
}
RESULT = {
    "method": "grid",
    "maximize": "final_equity",
    "param_names": ["fast", "slow"],
    "total": 54,
    "done": 54,
    "succeeded": 50,
    "failed": 1,
    "zero_trade": 2,
    "excluded": 0,
    "invalid": 3,
    "leaderboard": LEADERBOARD,
    "best": LEADERBOARD[0],
    "best_curve": BEST_CURVE,
    "surface": None,
    "children": 4,
    "elapsed_s": 1.42,
    "combos_per_s": 38.03,
    "validation": {"start": "2024-01-01", "end": "2024-06-30"},
    "symbol": "DEMO",
    "timeframe": "1d",
}


def finished_sweep() -> OpRecord:
    return record(
        "sweep-sma-01", "sweep", "completed", start=0, run=1, end=3, percent=100, host="",
        params=PARAMS, result=RESULT, children=CHILDREN, step="sweep",
        metrics=sweep_metrics(54.0, 54.0, 12345.6, 4.0),
        message="54/54 combinations, 38/s, best final_equity=12345.6 (fast=10, slow=30)",
        artifacts={"results": "sha256-" + "d" * 64},
    )  # fmt: skip


def sweep_metrics(done: float, total: float, best: float, children_done: float) -> dict[str, float]:
    """A sweep's progress metrics (4 children, 2 combinations failed)."""
    return {
        "done": done, "total": total, "combos_per_s": 300.0, "failed": 2.0,
        "children_done": children_done, "children_total": 4.0, "best": best,
    }  # fmt: skip


def running_sweep(done: float, best: float) -> OpRecord:
    return record(
        "sweep-run-01", "sweep", "running", start=100, run=101, percent=done / 6.4,
        params={**PARAMS, "method": "random", "max_tries": 640},
        children=[f"sweep-run-01-c{i}" for i in range(4)],
        metrics=sweep_metrics(done, 640.0, best, 1.0), step="sweep",
        message=f"{done:.0f}/640 combinations, 300/s, best final_equity={best}",
    )  # fmt: skip


def sweep_events(op_id: str, t0: float, total: float, reports: list[tuple[float, float]]) -> list[Event]:
    """Statuses, a progress report before any combination has a value, two trials (one
    failed), then a progress report per (done, best) of ``reports``, a second apart."""
    events: list[Event] = [
        StatusEvent(op_id=op_id, ts=t0, state="queued"),
        StatusEvent(op_id=op_id, ts=t0 + 1, state="running"),
        LogEvent(op_id=op_id, ts=t0 + 1.1, message=f"{total:.0f} combinations in 4 chunks"),
        ProgressEvent(op_id=op_id, ts=t0 + 1.2, percent=1.0, metrics={"done": 1.0, "total": total}),
        TrialEvent(op_id=op_id, ts=t0 + 1.5, index=17, params={"fast": 10, "slow": 30},
                   metrics={"final_equity": 12345.6, "sharpe_ratio": 1.274, "total_trades": 14},
                   child=f"{op_id}-c0"),
        TrialEvent(op_id=op_id, ts=t0 + 1.6, index=18, params={"fast": 30, "slow": 30},
                   error="fast must be below slow", child=f"{op_id}-c0"),
    ]  # fmt: skip
    for n, (done, best) in enumerate(reports, start=1):
        metrics = sweep_metrics(done, total, best, children_done=4 * done // total)
        events.append(ProgressEvent(op_id=op_id, ts=t0 + 1 + n, percent=100 * done / total, metrics=metrics))
    return events


#: The finished sweep's events: its reports, then it completes.
FINISHED_EVENTS = [
    *sweep_events("sweep-sma-01", T0, 54.0, [(27.0, 11875.25), (54.0, 12345.6)]),
    StatusEvent(op_id="sweep-sma-01", ts=T0 + 3, state="completed"),
]
#: The running sweep's events: two reports so far (done 40 and 80).
RUNNING_EVENTS = sweep_events("sweep-run-01", T0 + 100, 640.0, [(40.0, 10200.0), (80.0, 11000.0)])


class PushSource(FixedSource):
    """:class:`FixedSource` whose watch goes on delivering what :meth:`push` gives it."""

    def __init__(self, records: list[OpRecord], events: dict[str, list[Event]]) -> None:
        super().__init__(records, HOSTS, events)
        self.queue: asyncio.Queue[OpRecord] = asyncio.Queue()

    async def watch_ops(self) -> AsyncIterator[list[OpRecord]]:
        yield list(self.records)
        while True:
            yield [await self.queue.get()]

    def push(self, record: OpRecord) -> None:
        self.queue.put_nowait(record)


def sweep_app() -> DashboardApp:
    backtest = record("bt-sma-eurusd-01", "backtest", "completed", start=0, run=2, end=9, percent=100,
                      host="docker-local", result={"metrics": {"sharpe_ratio": 1.274}})  # fmt: skip
    children = [
        record(child, "sweep_chunk", "completed", start=1.5, run=2, end=2.9, percent=100,
               host="docker-local", parent_id="sweep-sma-01")
        for child in CHILDREN
    ]  # fmt: skip
    records = [finished_sweep(), running_sweep(120.0, 11500.0), backtest, *children]
    events = {"sweep-sma-01": FINISHED_EVENTS, "sweep-run-01": RUNNING_EVENTS}
    return DashboardApp(PushSource(records, events), clock=lambda: NOW, server="nats://127.0.0.1:4222")


async def open_detail(pilot: Pilot[Any], op_id: str) -> OpDetailScreen:
    app = pilot.app
    assert isinstance(app, DashboardApp)
    await until(pilot, lambda: app.ops_table.row_count == 7 and app.hosts_panel.loaded, 10, "data")
    await select(pilot, app.ops_table, op_id)
    await pilot.press("enter")
    await until(pilot, lambda: isinstance(app.screen, OpDetailScreen), 5, "the detail")
    screen = app.screen
    assert isinstance(screen, OpDetailScreen) and screen.op_id == op_id
    count = len(FINISHED_EVENTS if op_id == "sweep-sma-01" else RUNNING_EVENTS)
    await until(pilot, lambda: screen.events_seen == count, 5, "the events")
    return screen


def plain(value: Any) -> str:
    return str(getattr(value, "plain", value))


def table_rows(table: DataTable[Any]) -> list[list[str]]:
    return [[plain(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


def status_text(view: SweepView) -> str:
    return str(view.query_one("#sweep-status", Static).render())


def cells_with(line: str, bits: int) -> list[int]:
    """Plot cells (after the y axis) of a chart line that have any of ``bits`` set."""
    plot = line.split("┤", 1)[-1].split("│", 1)[-1]
    return [i for i, ch in enumerate(plot) if (ord(ch) - 0x2800) & bits]


# --- a finished sweep ------------------------------------------------------------------


async def test_finished_sweep_leaderboard_and_curve() -> None:
    app = sweep_app()
    async with app.run_test(size=(160, 40)) as pilot:
        screen = await open_detail(pilot, "sweep-sma-01")
        view = screen.query_one(SweepView)
        table = view.leaderboard
        assert table.display
        assert [plain(column.label) for column in table.ordered_columns] == EXPECTED_COLUMNS
        assert table_rows(table) == EXPECTED_ROWS
        assert view.border_title == "sweep · grid · maximize final_equity ▲"

        status = status_text(view)
        assert "54/54 combinations · 50 ok · 1 failed · 2 zero-trade · 3 invalid · 38.0/s in 1.4s" in status
        assert "children: 4 (4 done)" in status
        assert "best final_equity 12,346  (fast=10, slow=30)  out-of-sample 11,020" in status
        assert "validated on 2024-01-01 → 2024-06-30" in status

        # the curve is result.best_curve: 1 → 54 combinations, 10,501 → 12,346
        curve = view.query_one(BestCurve)
        assert curve.points == [(float(x), float(y)) for x, y in BEST_CURVE]
        lines = curve.chart
        assert lines is not None and len(lines) == CURVE_ROWS + 1
        *plot, axis = lines
        width = curve.content_size.width
        assert all(len(line) == width for line in plot)
        assert plot[0].startswith("12,346 ┤") and plot[-1].startswith("10,501 ┤")
        cols = width - len("12,346 ┤")
        assert axis.split() == ["1", "54"] and axis.endswith("54")
        # the bottom dot row from the first column; the top one from combination 18 on:
        # dot column j stands for combination 1 + j * 53 / (2 cols - 1), a point shows
        # from its nearest column
        assert cells_with(plot[-1], BOTTOM_DOTS)[0] == 0
        first_top = math.ceil(17 * (2 * cols - 1) / 53 - 0.5) // 2
        top = cells_with(plot[0], TOP_DOTS)
        assert top == list(range(first_top, cols))
        rendered = str(curve.render())
        assert rendered.startswith("best final_equity ▲ so far, by combinations done")

        # the event log words trials: params and metrics, or the error
        log_lines = [line.text for line in screen.query_one("#detail-log", RichLog).lines]
        assert any("trial    #17  fast=10 slow=30  final_equity=12,346 sharpe_ratio=1.27 total_trades=14"
                   in line for line in log_lines)  # fmt: skip
        assert any("trial    #18  fast=30 slow=30  fast must be below slow" in line for line in log_lines)

        # other kinds get no sweep view
        await pilot.press("escape")
        await select(pilot, app.ops_table, "bt-sma-eurusd-01")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, OpDetailScreen), 5, "the backtest's detail")
        assert not app.screen.query(SweepView)


def test_snapshot_finished_sweep_detail(snap_compare: Any) -> None:
    async def before(pilot: Pilot[Any]) -> None:
        await open_detail(pilot, "sweep-sma-01")

    assert snap_compare(sweep_app(), terminal_size=(160, 40), run_before=before)


# --- a running sweep -------------------------------------------------------------------


async def test_running_sweep_progress_line_and_curve_from_progress() -> None:
    app = sweep_app()
    source = app.source
    assert isinstance(source, PushSource)
    async with app.run_test(size=(160, 40)) as pilot:
        screen = await open_detail(pilot, "sweep-run-01")
        view = screen.query_one(SweepView)
        # the replayed progress events (done 40, 80; done 10 has no best yet) and the record (120)
        await until(pilot, lambda: len(view.history) == 3, 5, "the replayed reports")
        assert view.history.points == [(40.0, 10200.0), (80.0, 11000.0), (120.0, 11500.0)]
        assert not view.leaderboard.display  # no result yet
        assert view.border_title == "sweep · random · maximize final_equity ▲"
        status = status_text(view)
        assert "120/640 combinations · 2 failed · 300.0/s" in status
        assert "children: 4 (1 done)" in status
        assert "best so far final_equity 11,500" in status

        # newer records from the watch join the curve, one point each
        for n, (done, best) in enumerate(((200.0, 11800.0), (320.0, 12100.0)), start=4):
            source.push(running_sweep(done, best))
            await until(pilot, lambda n=n: len(view.history) == n, 5, f"report {n}")  # type: ignore[misc]
        assert view.history.points[-2:] == [(200.0, 11800.0), (320.0, 12100.0)]
        assert "320/640 combinations" in status_text(view)
        assert "best so far final_equity 12,100" in status_text(view)

        curve = view.query_one(BestCurve)
        assert curve.x_max == 640.0 and curve.points == view.history.points
        lines = curve.chart
        assert lines is not None
        *plot, axis = lines
        assert plot[0].startswith("12,100 ┤") and plot[-1].startswith("10,200 ┤")
        assert axis.split() == ["1", "640"]
        cols = len(plot[0]) - len("12,100 ┤")
        # nothing before combination 40 nor after 320 (half the axis is still to run)
        drawn = sorted({i for line in plot for i in cells_with(line, 0xFF)})

        def dot(x: float) -> float:  # the dot column of combination x
            return (x - 1) * (2 * cols - 1) / 639

        assert drawn[0] == math.ceil(dot(40) - 0.5) // 2
        assert drawn[-1] == math.floor(dot(320) + 0.5) // 2
        # the newest best (12,100 at 320) is drawn: the top dot row, in the last cell drawn
        assert cells_with(plot[0], TOP_DOTS) == [drawn[-1]]
        assert 0.45 < drawn[-1] / cols < 0.55
        assert "(5 reports)" in str(curve.render())

        # it finishes: the result's curve and leaderboard replace the progress
        source.push(finished_sweep_as("sweep-run-01"))
        await until(pilot, lambda: view.leaderboard.display, 5, "the leaderboard")
        assert table_rows(view.leaderboard) == EXPECTED_ROWS
        assert curve.points == [(float(x), float(y)) for x, y in BEST_CURVE]


def finished_sweep_as(op_id: str) -> OpRecord:
    done = finished_sweep()
    done.op_id = op_id
    return done


# --- pieces ----------------------------------------------------------------------------


def test_history_keeps_the_newest_report_per_done_and_thins_past_its_cap() -> None:
    history = BestHistory(cap=8)
    assert not history.add({"done": 3.0})  # no best yet
    assert history.add({"done": 3.0, "best": 1.0})
    assert not history.add({"done": 3.0, "best": 1.0})
    assert history.add({"done": 3.0, "best": 2.0})
    assert history.points == [(3.0, 2.0)]
    history.clear()
    for done in range(1, 101):
        history.add({"done": float(done), "best": float(done * 2)})
        assert len(history) <= 8
    points = history.points
    assert points[0] == (1.0, 2.0) and points[-1] == (100.0, 200.0)
    assert [x for x, _ in points] == sorted(x for x, _ in points)
    assert all(y == 2 * x for x, y in points)


def test_curve_lines_edge_cases() -> None:
    assert curve_lines([], width=40, height=3) is None
    assert curve_lines([(1.0, 5.0)], width=6, height=3) is None  # no room for a plot
    flat = curve_lines([(1.0, 5.0), (10.0, 5.0)], width=30, height=3)
    assert flat is not None and len(flat) == 4 and all(len(line) <= 30 for line in flat)
    assert any(cells_with(line, 0xFF) for line in flat[:-1])


def test_trial_event_line() -> None:
    metrics = {"final_equity": 10500.8, "sharpe_ratio": None, "total_trades": 35}
    trial = TrialEvent(op_id="s", ts=T0 + 2, index=3, params={"fast": 5, "lr": 0.003}, metrics=metrics)
    line = event_line(trial, T0)
    assert line is not None
    assert line.plain == (
        "    +2.0s trial    #3  fast=5 lr=0.003  final_equity=10,501 sharpe_ratio=- total_trades=35"
    )
