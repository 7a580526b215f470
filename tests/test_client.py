"""The Python client (``ktrdr_run.Client`` / ``SyncClient``) and the artifact commands,
against a real nats-server, a real dispatcher and real containers.

The first test is what a researcher would write: a script that imports only
``ktrdr_run``, run as its own process.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from dispatcher.config import Config
from ktrdr_run import Client, SyncClient
from ktrdr_run.errors import (
    ArtifactCorrupt,
    ArtifactNotFound,
    InvalidJob,
    KtrdrError,
    NoDispatcher,
    OpNotFound,
    WaitTimeout,
)
from runner.protocol import ProgressEvent
from tests.conftest import RunningDispatcher, run_cli, write_config

pytestmark = [pytest.mark.docker, pytest.mark.nats]

SCRIPT = """
import asyncio, io, json, sys
import pandas as pd
from ktrdr_run import Client, ProgressEvent

async def main():
    async with Client(sys.argv[1]) as client:
        op = await client.submit(
            "backtest",
            {"strategy": "sma_cross", "symbol": "DEMO", "timeframe": "1d",
             "strategy_params": {"fast": 10, "slow": 30}, "close_at_end": True},
            labels={"by": "script"},
        )
        progress = []
        async for event in op.events():
            if isinstance(event, ProgressEvent):
                progress.append([event.percent, event.step])
        record = await op.wait(timeout_s=120)
        trades = pd.read_parquet(io.BytesIO(await op.artifact("trades")))
        print(json.dumps({
            "op_id": op.op_id, "state": record.state, "progress": progress,
            "trades": len(trades), "pnl_sum": float(trades["pnl"].sum()),
            "columns": list(trades.columns),
        }))

asyncio.run(main())
"""


async def test_a_script_with_only_the_client_runs_a_backtest(
    config: Config, dispatcher: RunningDispatcher, tmp_state: Path
) -> None:
    config_path = write_config(config, tmp_state / "ktrdr-run.toml")
    script = tmp_state / "research.py"
    script.write_text(textwrap.dedent(SCRIPT))
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(script), str(config_path)],
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["state"] == "completed"
    percents = [p for p, _step in out["progress"]]
    assert len(percents) >= 3 and percents == sorted(percents) and percents[-1] == 100
    assert {"entry_time", "exit_time", "side", "pnl"} <= set(out["columns"])

    # independent of the client: the op record as the CLI's JSON gives it
    shown = await asyncio.to_thread(run_cli, ["ops", "show", out["op_id"], "--json"], config_path)
    record = json.loads(shown.stdout)
    metrics = record["result"]["metrics"]
    assert out["trades"] == record["result"]["trades_preview"]["total"] > 0
    # closed at the end: every trade's pnl adds up to the whole change in equity
    assert out["pnl_sum"] == pytest.approx(
        metrics["final_equity"] - record["params"]["initial_capital"], rel=1e-9, abs=1e-6
    )


async def test_ops_artifacts_writes_files_whose_sha256_matches_the_record(
    config: Config, dispatcher: RunningDispatcher, tmp_state: Path
) -> None:
    config_path = write_config(config, tmp_state / "ktrdr-run.toml")
    report_path = str(tmp_state / "report.html")
    args = ["backtest", "--strategy", "sma_cross", "--symbol", "DEMO", "--job-id", "bt-art"]
    args += ["--report", report_path]
    ran = await asyncio.to_thread(run_cli, args, config_path)
    assert ran.returncode == 0, ran.stderr
    # not a terminal: the chart is drawn 80 columns wide, after the metrics
    chart = ran.stdout[ran.stdout.index("\nEquity ") :].splitlines()[1:]
    assert len(chart) >= 15 and max(len(line) for line in chart) <= 80
    assert any("Drawdown  max" in line for line in chart)
    report = (tmp_state / "report.html").read_text()
    assert "bt-art" in report and "http://" not in report and "https://" not in report
    shown = await asyncio.to_thread(run_cli, ["ops", "show", "bt-art", "--json"], config_path)
    record = json.loads(shown.stdout)
    out_dir = tmp_state / "out"
    saved = await asyncio.to_thread(run_cli, ["ops", "artifacts", "bt-art", "-o", str(out_dir)], config_path)
    assert saved.returncode == 0, saved.stderr
    files = sorted(p.name for p in out_dir.iterdir())
    assert files == ["equity_curve.parquet", "trades.parquet"]
    for name, object_name in record["artifacts"].items():
        data = (out_dir / f"{name}.parquet").read_bytes()
        assert object_name == "sha256-" + hashlib.sha256(data).hexdigest()
    equity = pd.read_parquet(out_dir / "equity_curve.parquet")
    assert equity["equity"].iloc[-1] == pytest.approx(record["result"]["metrics"]["final_equity"])

    # one artifact by its store name, to a file and to stdout
    name = record["artifacts"]["trades"]
    target = tmp_state / "t" / "trades.parquet"
    got = await asyncio.to_thread(run_cli, ["artifacts", "get", name, "-o", str(target)], config_path)
    assert got.returncode == 0, got.stderr
    assert target.read_bytes() == (out_dir / "trades.parquet").read_bytes()
    piped = await asyncio.to_thread(
        subprocess.run,
        [str(Path(sys.executable).parent / "ktrdr-run"), "artifacts", "get", name, "-o", "-"],
        capture_output=True,
        timeout=60,
        env={"KTRDR_RUN_CONFIG": str(config_path), "PATH": "/usr/bin:/bin"},
    )
    assert piped.returncode == 0 and piped.stdout == target.read_bytes()

    missing = await asyncio.to_thread(
        run_cli, ["artifacts", "get", "sha256-" + "0" * 64, "-o", str(tmp_state / "x")], config_path
    )
    assert missing.returncode == 2 and "no artifact 'sha256-000" in missing.stderr
    assert not (tmp_state / "x").exists()


async def test_client_errors_name_what_to_do(config: Config, js_handles: object) -> None:
    """No dispatcher runs here: ops stay queued, and the client says so."""
    async with Client(config) as client:
        with pytest.raises(InvalidJob) as bad:
            await client.submit("probe", {"hold_s": "long"})
        assert bad.value.field == "params.hold_s"
        with pytest.raises(InvalidJob) as unknown:
            await client.submit("no_such_kind", {})
        assert unknown.value.field == "kind" and "probe" in str(unknown.value)
        with pytest.raises(OpNotFound, match="no op with id 'nope'"):
            await client.record("nope")
        with pytest.raises(ArtifactNotFound):
            await client.artifact("sha256-" + "1" * 64)

        op = await client.submit("probe", {}, job_id="queued-forever")
        with pytest.raises(WaitTimeout, match=r"still queued after 0\.5 s"):
            await op.wait(timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(NoDispatcher, match="ktrdr-run dispatcher"):
            await op.wait(no_dispatcher_s=1.0)
        assert time.monotonic() - started < 10
        assert isinstance(NoDispatcher("x", 1), KtrdrError)


async def test_a_corrupt_artifact_is_refused_and_nothing_is_written(
    config: Config, js_handles: object, tmp_path: Path
) -> None:
    handles = js_handles
    data = b"PAR1 real bytes PAR1"
    wrong_name = "sha256-" + hashlib.sha256(b"other bytes").hexdigest()
    await handles.artifacts.put(wrong_name, data)  # type: ignore[attr-defined]
    async with Client(config) as client:
        with pytest.raises(ArtifactCorrupt, match="hashes to sha256-"):
            await client.artifact(wrong_name)
    config_path = write_config(config, tmp_path / "ktrdr-run.toml")
    target = tmp_path / "out.bin"
    got = await asyncio.to_thread(run_cli, ["artifacts", "get", wrong_name, "-o", str(target)], config_path)
    assert got.returncode == 1 and "corrupt" in got.stderr
    assert not target.exists() and not list(tmp_path.glob("*.partial"))


async def test_watch_ops_gives_the_current_records_then_changes(
    config: Config, dispatcher: RunningDispatcher
) -> None:
    async with Client(config) as client:
        first = await client.submit("probe", {}, job_id="watch-first")
        await first.wait(timeout_s=120)
        watch = client.watch_ops()
        initial = await asyncio.wait_for(anext(watch), 10)
        assert [r.op_id for r in initial] == ["watch-first"]
        second = await client.submit("probe", {}, job_id="watch-second")
        states: list[str] = []
        async with asyncio.timeout(120):
            async for batch in watch:
                states += [r.state for r in batch if r.op_id == second.op_id]
                if states and states[-1] == "completed":
                    break
        await watch.aclose()
        assert states[0] == "queued" and "running" in states
        listed = await client.ops(kind="probe", state="completed")
        assert {r.op_id for r in listed} == {"watch-first", "watch-second"}
        assert await client.ops(kind="backtest") == []
        hosts = await client.hosts()
        assert hosts and all(h.cpus > 0 for h in hosts)


async def test_sync_client_in_a_thread(config: Config, dispatcher: RunningDispatcher) -> None:
    """The blocking wrapper, as a notebook uses it: follows events, cancels, waits."""

    def blocking() -> tuple[str, str, list[str]]:
        with SyncClient(config) as client:
            op = client.submit("probe", {"hold_s": 30, "tick_s": 0.5}, job_id="sync-held")
            kinds: list[str] = []
            for event in op.events():
                kinds.append(type(event).__name__)
                if isinstance(event, ProgressEvent) and event.percent > 0 and "cancel" not in kinds:
                    kinds.append("cancel")
                    op.cancel("enough")
            record = op.wait(timeout_s=60)
            assert record.cancel is not None
            return record.state, record.cancel.reason, kinds

    state, reason, kinds = await asyncio.to_thread(blocking)
    assert (state, reason) == ("cancelled", "enough")
    assert kinds[-1] == "StatusEvent" and "ProgressEvent" in kinds


def test_nothing_is_left_connected(config: Config) -> None:
    """A SyncClient that cannot connect stops its thread and says why."""
    broken = Config(
        state_dir=config.state_dir, nats=type(config.nats)(url="nats://127.0.0.1:1", embedded=False)
    )
    with pytest.raises(KtrdrError, match=r"no NATS server answers at nats://127\.0\.0\.1:1"):
        SyncClient(broken)


async def test_every_record_is_listed_every_time(config: Config, js_handles: object) -> None:
    """nats-py's "no more current values" marker can race ahead of values already pushed;
    a listing must still hold every record, each time (1,000 records, 15 listings)."""
    from runner.protocol import OpRecord, encode

    handles = js_handles
    for i in range(1000):
        record = OpRecord(op_id=f"op-{i:04d}", kind="probe", timestamps={"queued": 1.0e9 + i})
        await handles.ops.put(record.op_id, encode(record))  # type: ignore[attr-defined]
    await handles.ops.delete("op-0999")  # type: ignore[attr-defined]  # the last value is a delete
    async with Client(config) as client:
        for _ in range(10):
            assert len(await client.ops()) == 999
        for _ in range(5):
            batches = client.watch_ops()
            first = await asyncio.wait_for(anext(batches), 10)
            await batches.aclose()
            assert len(first) == 999
        assert (await client.ops(limit=1))[0].op_id == "op-0998"  # newest first
