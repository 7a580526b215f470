"""The Textual dashboard (`ktrdr-run dashboard`).

Live tests run the app headless (``run_test``) on a real Client against a real
nats-server, with a real dispatcher starting real probe containers: progress moving in
the table, cancel through the confirmation, read-only mode, filters, and a NATS restart
(disconnected shown, then resynced). Snapshot tests pin the look with fixed records,
hosts and events (a stand-in for the Client) and a fixed clock.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest
from nats.js.errors import NotFoundError
from textual.pilot import Pilot
from textual.widgets import Static

from discovery.health import GpuSnapshot, HostSnapshot
from dispatcher.config import Config
from dispatcher.embedded import EmbeddedNats
from dispatcher.jetstream import JetStreamHandles
from ktrdr_run.client import Client
from runner.protocol import (
    EVENTS_STREAM,
    ErrorEvent,
    ErrorInfo,
    Event,
    LogEvent,
    OpRecord,
    ProgressEvent,
    ProgressSnapshot,
    StatusEvent,
    job_subject,
    op_subject,
)
from tests.conftest import RunningDispatcher
from tui.app import DashboardApp, dashboard
from tui.confirm import ConfirmCancel
from tui.detail import OpDetailScreen
from tui.help import HelpScreen
from tui.ops_table import OpsTable

pytestmark = [pytest.mark.docker, pytest.mark.nats]

SIZE = (160, 50)
HELD = {"hold_s": 20, "tick_s": 0.5}  # 40 ticks of 2.5 %


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def until(
    pilot: Pilot[Any], check: Callable[[], Any], timeout_s: float = 30.0, what: str = "the condition"
) -> None:
    """Poll ``check`` (sync or async) every 0.1 s while the app runs, up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        await pilot.pause(0.1)


def cell(table: OpsTable, op_id: str, column: str) -> str:
    """The text a cell shows."""
    value = table.get_cell(op_id, column)
    return str(getattr(value, "plain", value))


def shown_percent(table: OpsTable, op_id: str) -> int | None:
    """The percentage the progress cell shows."""
    if op_id not in table.records or op_id not in table.shown_ids:
        return None
    match = re.search(r"(\d+)%", cell(table, op_id, "progress"))
    return int(match.group(1)) if match else None


def connection_text(app: DashboardApp) -> str:
    return str(app.main_screen.query_one("#connection", Static).render())


async def select(pilot: Pilot[Any], table: OpsTable, op_id: str) -> None:
    table.move_cursor(row=table.get_row_index(op_id), animate=False)
    table.focus()
    await pilot.pause()
    assert table.selected_op_id == op_id


async def publish_raw_job(handles: Any, job: dict[str, Any]) -> None:
    """A job message as another system would publish it (no client-side validation)."""
    await handles.js.publish(
        job_subject(job["kind"]), json.dumps(job).encode(), headers={"Nats-Msg-Id": job["job_id"]}
    )


async def cancel_quietly(client: Client, *op_ids: str) -> None:
    """End held probes so the dispatcher fixture stops quickly."""
    for op_id in op_ids:
        await client.cancel(op_id, "test cleanup")


# --- live: real NATS, real dispatcher, real containers ---------------------------------


async def test_held_probe_progress_then_cancel(config: Config, dispatcher: RunningDispatcher) -> None:
    async with Client(config) as client, dashboard(config) as app, app.run_test(size=SIZE) as pilot:
        table = app.ops_table
        op = await client.submit("probe", HELD, job_id=new_id("dash-held"))
        op_id = op.op_id
        await until(
            pilot,
            lambda: table.records.get(op_id) is not None and table.records[op_id].state == "running",
            90,
            "the probe to show running",
        )
        assert cell(table, op_id, "kind") == "probe"
        assert cell(table, op_id, "host") == table.records[op_id].host != ""
        await until(pilot, lambda: (shown_percent(table, op_id) or 0) > 0, 30, "progress above 0 %")
        first = shown_percent(table, op_id)
        assert first is not None
        await until(pilot, lambda: (shown_percent(table, op_id) or 0) > first, 10, "progress to move")
        # the percentage shown is the probe's: tick / 40 ticks (checked against the tick)
        record = table.records[op_id]
        assert record.progress is not None
        tick = record.progress.metrics["tick"]
        assert abs(float(cell(table, op_id, "progress").split()[-1].rstrip("%")) - 2.5 * tick) <= 0.5

        await select(pilot, table, op_id)
        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, ConfirmCancel), 5, "the confirmation")
        await pilot.press("y")
        await until(
            pilot, lambda: cell(table, op_id, "state") == "cancelled", 30, "the row to show cancelled"
        )
        record = await client.record(op_id)
        assert record.state == "cancelled"
        assert record.cancel is not None and record.cancel.reason == "cancelled from the dashboard"


async def test_escape_keeps_the_op_and_read_only_never_publishes(
    config: Config, dispatcher: RunningDispatcher
) -> None:
    async with Client(config) as client:
        op = await client.submit("probe", HELD, job_id=new_id("dash-ro"))
        op_id = op.op_id
        try:
            async with dashboard(config, read_only=True) as app, app.run_test(size=SIZE) as pilot:
                table = app.ops_table
                await until(
                    pilot,
                    lambda: op_id in table.records and table.records[op_id].state == "running",
                    90,
                    "the probe to run",
                )
                summary = str(app.main_screen.query_one("#summary", Static).render())
                assert "read-only" in summary
                await select(pilot, table, op_id)
                await pilot.press("c")
                await pilot.pause(0.3)
                assert not isinstance(app.screen, ConfirmCancel)
                assert any("read-only" in n.message for n in app._notifications)
                await pilot.press("y")  # nothing to confirm
                await pilot.pause(1.0)
                record = await client.record(op_id)
                assert record.state == "running" and record.cancel is None
                with pytest.raises(NotFoundError):  # no cancel request was ever published
                    await client.session.handles.js.get_last_msg(EVENTS_STREAM, op_subject(op_id, "cancel"))

            # not read-only: Esc at the confirmation keeps the op running too
            async with dashboard(config) as app, app.run_test(size=SIZE) as pilot:
                table = app.ops_table
                await until(pilot, lambda: op_id in table.shown_ids, 10, "the op")
                await select(pilot, table, op_id)
                await pilot.press("c")
                await until(pilot, lambda: isinstance(app.screen, ConfirmCancel), 5, "the confirmation")
                await pilot.press("escape")
                await pilot.pause(0.5)
                assert not isinstance(app.screen, ConfirmCancel)
                assert (await client.record(op_id)).cancel is None
        finally:
            await cancel_quietly(client, op_id)


async def test_text_and_state_filters(
    config: Config, dispatcher: RunningDispatcher, js_handles: JetStreamHandles
) -> None:
    tag = uuid.uuid4().hex[:6]
    running = [f"alpha-run1-{tag}", f"alpha-run2-{tag}"]
    rejected = {f"beta-bad-{tag}": "backtest", f"alpha-bad-{tag}": "probe"}
    async with Client(config) as client:
        try:
            for op_id in running:
                await client.submit("probe", HELD, job_id=op_id)
            for op_id, kind in rejected.items():  # invalid params: rejected, failed at once
                await publish_raw_job(js_handles, {"job_id": op_id, "kind": kind, "params": {"bogus": 1}})
            async with dashboard(config) as app, app.run_test(size=SIZE) as pilot:
                table = app.ops_table

                def states() -> dict[str, str]:
                    return {op_id: record.state for op_id, record in table.records.items()}

                await until(
                    pilot,
                    lambda: (
                        all(states().get(i) == "running" for i in running)
                        and all(states().get(i) == "failed" for i in rejected)
                    ),
                    90,
                    "two running and two failed ops",
                )
                assert table.row_count == 4

                await pilot.press("slash", *"alpha")
                assert table.row_count == 3
                await pilot.press(*"-run")
                assert sorted(table.shown_ids) == sorted(running)
                await pilot.press("enter")  # keeps the filter, back to the table
                assert table.has_focus and table.row_count == 2
                await pilot.press("escape")  # clears it
                assert table.row_count == 4

                await pilot.press("slash", *"backtest", "enter")  # matches the kind
                assert table.shown_ids == [f"beta-bad-{tag}"]
                await pilot.press("escape")

                expected = {
                    "active": 2,
                    "queued": 0,
                    "running": 2,
                    "completed": 0,
                    "failed": 2,
                    "cancelled": 0,
                }
                for state, count in expected.items():
                    await pilot.press("f")
                    assert table.state_filter == state
                    assert table.row_count == count, state
                    assert all(states()[i] == state or state == "active" for i in table.shown_ids)
                await pilot.press("f")
                assert table.state_filter == "all" and table.row_count == 4

                # both: failed and "alpha"
                for _ in range(5):
                    await pilot.press("f")
                assert table.state_filter == "failed"
                await pilot.press("slash", *"alpha", "enter")
                assert table.shown_ids == [f"alpha-bad-{tag}"]
                summary = str(app.main_screen.query_one("#summary", Static).render())
                assert "1 of 4 ops" in summary and "failed" in summary and "alpha" in summary
        finally:
            await cancel_quietly(client, *running)


async def test_nats_restart_shows_disconnected_then_resyncs(
    config: Config, nats_server: EmbeddedNats, dispatcher: RunningDispatcher
) -> None:
    async with Client(config) as client, dashboard(config) as app, app.run_test(size=SIZE) as pilot:
        table = app.ops_table
        before = await client.submit("probe", {}, job_id=new_id("dash-before"))
        await until(pilot, lambda: before.op_id in table.shown_ids, 60, "the first op")
        assert app.connected and "connected" in connection_text(app)
        assert app.loads == 1

        await asyncio.to_thread(nats_server.stop)
        await until(pilot, lambda: not app.connected, 15, "the app to notice")
        assert "disconnected" in connection_text(app)

        await nats_server.start()  # same port, same store
        await until(pilot, lambda: app.connected, 30, "the app to reconnect")
        assert "disconnected" not in connection_text(app)
        await until(pilot, lambda: app.loads == 2, 30, "the table to resync")

        after = await _submit_retrying(client, "probe", new_id("dash-after"))
        await until(pilot, lambda: after in table.shown_ids, 60, "the op submitted after the restart")
        assert before.op_id in table.shown_ids  # the resync kept what was there
        await until(
            pilot,
            lambda: cell(table, after, "state") == "completed",
            90,
            "live updates after the resync",
        )


async def _submit_retrying(client: Client, kind: str, job_id: str, timeout_s: float = 20.0) -> str:
    """Submit once JetStream answers again after the restart."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return (await client.submit(kind, {}, job_id=job_id)).op_id
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


# --- snapshots: fixed data, fixed clock ------------------------------------------------

T0 = 1_780_000_000.0
NOW = T0 + 300
GIB = 1024**3
TRACEBACK = """Traceback (most recent call last):
  File "/opt/runner/runner/__main__.py", line 88, in main
    result = op.run(ctx, params)
  File "/opt/runner/runner/ops/train.py", line 141, in train
    loss = step(model, batch)
  File "/opt/runner/runner/ops/train.py", line 97, in step
    raise FloatingPointError("loss became NaN at epoch 7")
FloatingPointError: loss became NaN at epoch 7"""


def record(
    op_id: str,
    kind: str,
    state: str,
    *,
    start: float,
    run: float | None = None,
    end: float | None = None,
    percent: float | None = None,
    **fields: Any,
) -> OpRecord:
    """An op record: submitted at T0+start, running from T0+run, ended at T0+end."""
    timestamps = {"queued": T0 + start}
    if run is not None:
        timestamps |= {"placing": T0 + start + 0.2, "starting": T0 + start + 0.5, "running": T0 + run}
    if end is not None:
        timestamps[state] = T0 + end
    metrics = fields.pop("metrics", {})
    step, message = fields.pop("step", ""), fields.pop("message", "")
    progress = None if percent is None else ProgressSnapshot(percent, step, message, metrics, T0 + start)
    return OpRecord(
        op_id=op_id,
        kind=kind,
        state=state,  # type: ignore[arg-type]
        timestamps=timestamps,
        progress=progress,
        submitted_by=fields.pop("submitted_by", "ana@lab"),
        **fields,
    )


RECORDS = [
    record("bt-sma-eurusd-01", "backtest", "completed", start=0, run=2, end=9, percent=100,
           host="docker-local", result={"metrics": {"sharpe_ratio": 1.274}},
           artifacts={"trades": "sha256-" + "a" * 64, "equity_curve": "sha256-" + "b" * 64}),
    record("bt-sma-eurusd-02", "backtest", "running", start=30, run=31, percent=60, host="docker-local",
           metrics={"sharpe_ratio": 0.81}, step="simulate", message="simulated 412 trades"),
    record("bt-rsi-btc-01", "backtest", "queued", start=200),
    record("train-lstm-07", "train", "failed", start=10, run=12, end=140, percent=70, host="gpu-a100-1",
           metrics={"val_loss": 0.4123, "loss": 0.3823}, submitted_by="bo@lab", attempts=1,
           params={"epochs": 10, "lr": 0.003, "symbol": "EURUSD", "features": ["rsi", "atr"]},
           error=ErrorInfo("op_error", "loss became NaN at epoch 7", "FloatingPointError",
                           traceback=TRACEBACK),
           artifacts={"checkpoint_epoch6": "sha256-" + "c" * 64}),
    record("train-lstm-08", "train", "running", start=100, run=104, percent=35, host="gpu-a100-1",
           metrics={"val_loss": 0.2871}, submitted_by="bo@lab", step="epoch", message="epoch 4/10"),
    record("probe-local-1", "probe", "cancelled", start=50, run=51, end=70, percent=40, host="docker-local"),
    record("probe-local-2", "probe", "timed_out", start=55, run=56, end=116, percent=90, host="docker-local"),
    record("sweep-grid-01", "sweep", "running", start=5, run=6, percent=12.5, host="docker-local"),
    record("bt-bad-params", "backtest", "failed", start=150, end=150.1,
           error=ErrorInfo("invalid_job", "invalid job: params.fast: Expected `int`", field="params.fast")),
    record("bt-sma-spy-03", "backtest", "starting", start=240, host="lxc-worker-3"),
    record("train-mlp-02", "train", "completed", start=20, run=21, end=90, percent=100, host="docker-local",
           result={"val_loss": 0.0312}, submitted_by="bo@lab"),
    record("probe-lost-1", "probe", "lost", start=60, run=61, percent=20, host="lxc-worker-3"),
]  # fmt: skip

HOSTS = [
    HostSnapshot(name="docker-local", source="docker", state="available", cpus=16, memory_bytes=64 * GIB,
                 free_cpus=12.5, free_memory_bytes=50 * GIB, running_ops=3),
    HostSnapshot(name="gpu-a100-1", source="static", state="available", cpus=32, memory_bytes=256 * GIB,
                 gpus=[GpuSnapshot(index=0, model="A100"), GpuSnapshot(index=1, model="A100")],
                 free_cpus=28, free_memory_bytes=200 * GIB, free_gpus=1, running_ops=1),
    HostSnapshot(name="lxc-worker-3", source="proxmox", state="unhealthy", cpus=8, memory_bytes=16 * GIB,
                 failures=3, error="engine did not answer"),
    HostSnapshot(name="gpu-rtx-2", source="static", state="available", cpus=24, memory_bytes=128 * GIB,
                 gpus=[GpuSnapshot(index=i, model="RTX 4090") for i in range(4)],
                 free_cpus=24, free_memory_bytes=128 * GIB, free_gpus=4),
    HostSnapshot(name="lxc-worker-9", source="proxmox", state="gone", cpus=4, memory_bytes=8 * GIB),
]  # fmt: skip


def failed_training_events() -> list[Event]:
    op = "train-lstm-07"
    events: list[Event] = [
        StatusEvent(op_id=op, ts=T0 + 10, state="queued"),
        StatusEvent(op_id=op, ts=T0 + 10.2, state="placing"),
        StatusEvent(op_id=op, ts=T0 + 10.5, state="starting", host="gpu-a100-1"),
        StatusEvent(op_id=op, ts=T0 + 12, state="running", host="gpu-a100-1"),
        LogEvent(op_id=op, ts=T0 + 12.5, message="features: 48211 bars, 32 features"),
    ]
    for epoch, val_loss in enumerate([0.92, 0.71, 0.58, 0.49, 0.44, 0.41, 0.4123], 1):
        events.append(
            ProgressEvent(
                op_id=op,
                ts=T0 + 12 + 18 * epoch,
                percent=10.0 * epoch,
                step="epoch",
                message=f"epoch {epoch}/10",
                metrics={"loss": round(val_loss - 0.03, 4), "val_loss": val_loss},
            )
        )
    events += [
        LogEvent(op_id=op, ts=T0 + 139, level="warning", message="gradient norm 1.2e6 at epoch 7"),
        ErrorEvent(op_id=op, ts=T0 + 140, reason="op_error", message="loss became NaN at epoch 7"),
        StatusEvent(op_id=op, ts=T0 + 140, state="failed", host="gpu-a100-1"),
    ]
    return events


class FixedOp:
    """An op handle of :class:`FixedSource`: its fixed events, then nothing more."""

    def __init__(self, events: list[Event]) -> None:
        self._events = events

    async def events(self, *, until_terminal: bool = True) -> AsyncIterator[Event]:
        for event in self._events:
            yield event
        await asyncio.Event().wait()  # live: no more events come


class FixedSource:
    """Stands for :class:`ktrdr_run.Client` with fixed data (the dashboard's snapshot
    tests): the records, hosts and events given, always connected; cancels are noted."""

    connected = True

    def __init__(self, records: list[OpRecord], hosts: list[HostSnapshot], events: dict[str, list[Event]]):
        self.records = records
        self._hosts = hosts
        self._events = events
        self.cancelled: list[str] = []

    async def watch_ops(self) -> AsyncIterator[list[OpRecord]]:
        yield list(self.records)
        await asyncio.Event().wait()

    def op(self, op_id: str) -> FixedOp:
        return FixedOp(self._events.get(op_id, []))

    async def hosts(self) -> list[HostSnapshot]:
        return list(self._hosts)

    async def record(self, op_id: str) -> OpRecord:
        return next(r for r in self.records if r.op_id == op_id)

    async def cancel(self, op_id: str, reason: str = "") -> OpRecord | None:
        self.cancelled.append(op_id)
        return await self.record(op_id)


def fixed_app(**kwargs: Any) -> DashboardApp:
    source = FixedSource(RECORDS, HOSTS, {"train-lstm-07": failed_training_events()})
    return DashboardApp(source, clock=lambda: NOW, server="nats://127.0.0.1:4222", **kwargs)


async def loaded(pilot: Pilot[Any]) -> None:
    app = pilot.app
    assert isinstance(app, DashboardApp)
    await until(pilot, lambda: app.ops_table.row_count == len(RECORDS) and app.hosts_panel.loaded, 10, "data")


def test_snapshot_ops_table(snap_compare: Any) -> None:
    assert snap_compare(fixed_app(), terminal_size=(160, 40), run_before=loaded)


def test_snapshot_sorted_by_metric_read_only(snap_compare: Any) -> None:
    async def before(pilot: Pilot[Any]) -> None:
        await loaded(pilot)
        app = pilot.app
        assert isinstance(app, DashboardApp)
        app.ops_table.set_sort("metric")
        await pilot.pause()

    assert snap_compare(fixed_app(read_only=True), terminal_size=(160, 30), run_before=before)


def test_snapshot_failed_op_detail(snap_compare: Any) -> None:
    async def before(pilot: Pilot[Any]) -> None:
        await loaded(pilot)
        app = pilot.app
        assert isinstance(app, DashboardApp)
        await select(pilot, app.ops_table, "train-lstm-07")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, OpDetailScreen), 5, "the detail")
        screen = app.screen
        assert isinstance(screen, OpDetailScreen)
        await until(pilot, lambda: screen.events_seen == 15, 5, "the events")

    assert snap_compare(fixed_app(), terminal_size=(160, 40), run_before=before)


def test_snapshot_hosts_panel(snap_compare: Any) -> None:
    async def before(pilot: Pilot[Any]) -> None:
        await loaded(pilot)
        app = pilot.app
        assert isinstance(app, DashboardApp)
        app.ops_table.set_filters(state="cancelled")  # one op: the hosts stand out
        await pilot.pause()

    assert snap_compare(fixed_app(), terminal_size=(120, 20), run_before=before)


def test_snapshot_help(snap_compare: Any) -> None:
    assert snap_compare(fixed_app(), press=["question_mark"], terminal_size=(120, 36), run_before=loaded)


def test_snapshot_small_terminal(snap_compare: Any) -> None:
    assert snap_compare(fixed_app(), terminal_size=(80, 24), run_before=loaded)


# --- fixed data: keys and figures ------------------------------------------------------


async def test_every_key_in_a_small_terminal() -> None:
    app = fixed_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await loaded(pilot)
        table = app.ops_table
        await pilot.press("s", "s", "S", "j", "j", "k", "f", "f", "h", "h", "question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape", "escape", "slash", *"train", "enter")
        assert table.row_count == 3  # train-lstm-07, train-lstm-08, train-mlp-02
        await pilot.press("enter")
        assert isinstance(app.screen, OpDetailScreen)
        await pilot.press("f", "f", "escape")
        assert app.screen is app.main_screen
        assert table.sort_by == "kind" and table.reverse  # S reversed the ascending kind order
        for _ in range(7):
            await pilot.press("s")
        assert table.sort_by == "submitted" and table.reverse
        await pilot.press("q")
    assert app.return_code == 0


async def test_the_detail_lists_the_runs_before_an_operator_requeued_the_op() -> None:
    from runner.protocol import EndedAttempt, ErrorInfo

    earlier = EndedAttempt(
        attempt=1,
        state="failed",
        host="gpu-a100-2",
        error=ErrorInfo(reason="oom_killed", message="out of memory"),
        requeued_by="alice@lab",
        requeue_reason="more memory",
    )
    records = [
        msgspec.structs.replace(r, history=[earlier], attempts=2) if r.op_id == "train-lstm-07" else r
        for r in RECORDS
    ]
    source = FixedSource(records, HOSTS, {"train-lstm-07": failed_training_events()})
    app = DashboardApp(source, clock=lambda: NOW, server="nats://127.0.0.1:4222")
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        await select(pilot, app.ops_table, "train-lstm-07")
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, OpDetailScreen), 5, "the detail")
        summary = str(app.screen.query_one("#detail-summary", Static).render())
    assert (
        "attempt 1 on gpu-a100-2: failed (oom_killed: out of memory); requeued by alice@lab: more memory"
        in summary
    ), summary


async def test_cancel_needs_confirmation_and_skips_finished_ops() -> None:
    app = fixed_app()
    source = app.source
    assert isinstance(source, FixedSource)
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        table = app.ops_table
        await select(pilot, table, "bt-sma-eurusd-02")
        await pilot.press("c", "n")
        await select(pilot, table, "train-lstm-07")  # failed already: nothing to ask
        await pilot.press("c")
        assert not isinstance(app.screen, ConfirmCancel)
        await select(pilot, table, "bt-sma-eurusd-02")
        await pilot.press("c")
        assert isinstance(app.screen, ConfirmCancel)
        await pilot.press("y")
        await until(pilot, lambda: source.cancelled == ["bt-sma-eurusd-02"], 5, "the cancel")
        await pilot.press("enter", "c", "y")  # from the detail screen too
        await until(pilot, lambda: source.cancelled == ["bt-sma-eurusd-02"] * 2, 5, "the second cancel")


async def test_table_figures() -> None:
    app = fixed_app()
    async with app.run_test(size=SIZE) as pilot:
        await loaded(pilot)
        table = app.ops_table
        assert table.shown_ids[0] == "bt-sma-spy-03"  # newest first
        assert cell(table, "bt-sma-eurusd-01", "metric") == "sharpe 1.27"  # result.metrics
        assert cell(table, "bt-sma-eurusd-02", "metric") == "sharpe 0.81"  # progress.metrics
        assert cell(table, "train-lstm-08", "metric") == "val_loss 0.2871"
        assert cell(table, "train-mlp-02", "metric") == "val_loss 0.0312"  # result
        assert cell(table, "bt-sma-eurusd-01", "elapsed") == "7.0s"  # running 2 → completed 9
        assert cell(table, "train-lstm-08", "elapsed") == "3m16s"  # 300 - 104, still running
        assert cell(table, "bt-rsi-btc-01", "elapsed") == "1m40s"  # queued at 200
        assert cell(table, "sweep-grid-01", "progress").endswith(" 12%")
        table.set_sort("metric")
        metric_rows = [i for i in table.shown_ids if cell(table, i, "metric")]
        assert metric_rows[0] == "bt-sma-eurusd-01"  # biggest first, missing last
        assert table.shown_ids[-1] not in metric_rows
        # an update lands in place: same row, new cells
        row = table.get_row_index("bt-rsi-btc-01")
        moved = record("bt-rsi-btc-01", "backtest", "running", start=200, run=260, percent=45,
                       host="docker-local", metrics={"sharpe_ratio": -0.5})  # fmt: skip
        table.apply([moved], initial=False)
        assert table.get_row_index("bt-rsi-btc-01") == row
        assert cell(table, "bt-rsi-btc-01", "state") == "running"
        assert cell(table, "bt-rsi-btc-01", "elapsed") == "40.0s"
        await pilot.pause(0.5)  # the deferred re-sort
        assert [i for i in table.shown_ids if cell(table, i, "metric")][-1] == "bt-rsi-btc-01"
