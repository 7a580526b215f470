"""Holes found by reading the code, each closed and shown here against real NATS / Docker:

- a compare-and-set write whose reply was lost is recognised by reading back, not taken
  for a conflict (op records and reservations);
- events of another attempt are not signs of this attempt's life, nor its outcome;
- a cancel request meant for an earlier op with the same id does not cancel a new one;
- a job id reused with different params is rejected, and the existing op is untouched;
- admission (a data preflight that reads a big file) runs off the dispatcher's event
  loop: the dispatcher keeps answering while it reads.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from discovery.base import Host
from dispatcher.config import Config
from dispatcher.jetstream import JetStreamHandles
from dispatcher.opstore import OpStore
from dispatcher.placement import Placement
from runner.protocol import DISPATCHER_PING_SUBJECT, TERMINAL_STATES, OpRecord, Resources, now
from tests.conftest import RunningDispatcher
from tests.faults import DispatcherProcess, all_events, fault_config, publish_jobs, records, wait_states
from tests.test_lifecycle import running_dispatcher

pytestmark = [pytest.mark.nats]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class LostReply:
    """The real KV bucket, except that its first write of ``method`` is applied by the
    server and then its reply is lost (a TimeoutError), as a NATS hiccup does."""

    def __init__(self, kv: Any, method: str) -> None:
        self._kv = kv
        self._method = method
        self.lost = 0

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._kv, name)
        if name != self._method:
            return real

        async def applied_then_lost(*args: Any, **kwargs: Any) -> Any:
            revision = await real(*args, **kwargs)
            if not self.lost:
                self.lost += 1
                raise nats.errors.TimeoutError
            return revision

        return applied_then_lost


async def test_a_record_write_whose_reply_was_lost_is_not_a_conflict(js_handles: JetStreamHandles) -> None:
    kv = LostReply(js_handles.ops, "_update")
    store = OpStore(kv, js_handles.js)  # type: ignore[arg-type]
    op_id = new_id("lost-reply")
    assert await store.create(OpRecord(op_id=op_id, kind="probe", timestamps={"queued": now()}))
    moved = await store.transition(op_id, "placing", allowed_from={"queued"}, dispatcher="d1", attempts=1)
    assert kv.lost == 1
    assert moved is not None and moved.state == "placing"  # not "someone else moved it"
    record, _ = await store.get(op_id)
    assert record.state == "placing" and record.dispatcher == "d1"
    placing = [e for e in await all_events_of(js_handles, op_id) if e.get("state") == "placing"]
    assert len(placing) == 1


async def test_a_reservation_whose_reply_was_lost_is_held_once(js_handles: JetStreamHandles) -> None:
    kv = LostReply(js_handles.reservations, "create")
    placement = Placement(kv, "d1")  # type: ignore[arg-type]
    host = Host(name=new_id("h"), source="test", docker_url="", cpus=4.0, memory_bytes=8 * 1024**3)
    resources = Resources(cpus=1.0, memory_gb=1.0, gpus=0, gpu="never")
    held = await placement.reserve("op-1", resources, [host], lambda _h: False, attempt=1)
    assert kv.lost == 1
    assert held is not None and held.host.name == host.name  # not abandoned as a conflict
    assert await placement.reserved_ops(host.name) == {"op-1"}
    await placement.release(held)
    assert await placement.reserved_ops(host.name) == set()


async def all_events_of(handles: JetStreamHandles, op_id: str) -> list[dict[str, Any]]:
    info = await handles.js.stream_info("KTRDR_EVENTS", subjects_filter=f"ktrdr.ops.{op_id}.>")
    total = sum((info.state.subjects or {}).values())
    sub = await handles.js.subscribe(f"ktrdr.ops.{op_id}.>", ordered_consumer=True)
    out = [json.loads((await sub.next_msg(timeout=5)).data) for _ in range(total)]
    await sub.unsubscribe()
    return out


@pytest.mark.docker
async def test_another_attempts_heartbeats_do_not_keep_an_attempt_alive(
    config: Config, runner_image: str, no_leftover_containers: None, js_handles: JetStreamHandles
) -> None:
    """A runner that never reaches NATS, while heartbeats of another attempt (a zombie of
    an earlier one, say) arrive: the attempt still ends runner_unreachable."""
    closed = f"nats://{'127.0.0.1'}:1"
    cfg = fault_config(config, "zombie")
    cfg = msgspec.structs.replace(cfg, nats=msgspec.structs.replace(cfg.nats, runner_url=closed))
    op_id = new_id("zombie")
    async with running_dispatcher(cfg, lambda: runner_image, "zombie"):
        await publish_jobs(cfg.nats.url, [{"job_id": op_id, "kind": "probe", "params": {"hold_s": 30}}])
        nc = await nats.connect(cfg.nats.url)
        try:
            deadline = time.monotonic() + 60
            while (await records(cfg.nats.url, [op_id])).get(op_id, {}).get("state") not in TERMINAL_STATES:
                assert time.monotonic() < deadline
                beat = {"event": "heartbeat", "op_id": op_id, "ts": time.time(), "attempt": 7, "uptime_s": 1}
                await nc.publish(f"ktrdr.ops.{op_id}.heartbeat", json.dumps(beat).encode())
                forged = {
                    "event": "result",
                    "op_id": op_id,
                    "ts": time.time(),
                    "attempt": 7,
                    "result": {"x": 1},
                }
                await nc.publish(f"ktrdr.ops.{op_id}.result", json.dumps(forged).encode())
                await asyncio.sleep(0.3)
        finally:
            await nc.close()
    final = json.loads((await js_handles.ops.get(op_id)).value)
    assert final["state"] == "failed" and final["error"]["reason"] == "runner_unreachable", final
    assert closed in final["error"]["message"]


@pytest.mark.docker
async def test_a_cancel_of_an_earlier_op_with_the_same_id_does_not_cancel_a_new_one(
    config: Config, runner_image: str, no_leftover_containers: None, js_handles: JetStreamHandles
) -> None:
    short = msgspec.structs.replace(config, retention=msgspec.structs.replace(config.retention, ops_s=1.0))
    op_id = new_id("reuse")
    async with running_dispatcher(short, lambda: runner_image, "reuse"):
        url = short.nats.url
        await publish_jobs(url, [{"job_id": op_id, "kind": "probe", "params": {"hold_s": 30}}])
        await wait_states(url, [op_id], {"running"}, 60)
        nc = await nats.connect(url)
        cancel = {"event": "cancel", "op_id": op_id, "ts": time.time(), "reason": "that one"}
        await nc.jetstream().publish(f"ktrdr.ops.{op_id}.cancel", json.dumps(cancel).encode())
        await nc.close()
        assert (await wait_states(url, [op_id], TERMINAL_STATES, 60))[op_id]["state"] == "cancelled"
        deadline = time.monotonic() + 30  # the finished record expires (retention)
        while True:
            try:
                await js_handles.ops.get(op_id)
            except Exception:  # noqa: BLE001 - KeyNotFoundError: expired
                break
            assert time.monotonic() < deadline, "record did not expire"
            await asyncio.sleep(0.3)
        # the same id again, long after: a new op, and the old cancel is not for it
        job = {"job_id": op_id, "kind": "probe", "params": {"hold_s": 1}}
        nc = await nats.connect(url)
        await nc.jetstream().publish(
            "ktrdr.jobs.probe", json.dumps(job).encode(), headers={"Nats-Msg-Id": f"{op_id}-2"}
        )
        await nc.close()
        final = (await wait_states(url, [op_id], TERMINAL_STATES, 60))[op_id]
    assert final["state"] == "completed", final


async def test_a_job_id_reused_with_different_params_is_rejected(
    config: Config, dispatcher: RunningDispatcher, js_handles: JetStreamHandles
) -> None:
    url = config.nats.url
    op_id = new_id("same")
    await publish_jobs(url, [{"job_id": op_id, "kind": "probe"}])
    first = (await wait_states(url, [op_id], TERMINAL_STATES, 60))[op_id]
    assert first["state"] == "completed"
    rejected = await js_handles.js.subscribe("ktrdr.rejected.probe", ordered_consumer=True)
    other = {"job_id": op_id, "kind": "probe", "params": {"hold_s": 1}}
    await js_handles.js.publish(
        "ktrdr.jobs.probe", json.dumps(other).encode(), headers={"Nats-Msg-Id": f"{op_id}-2"}
    )
    error = json.loads((await rejected.next_msg(timeout=30)).data)
    assert error["op_id"] == op_id and error["field"] == "job_id"
    assert "job_id reused with different params" in error["message"]
    after = json.loads((await js_handles.ops.get(op_id)).value)
    assert after == first  # the existing op is untouched
    assert [e["state"] for e in await all_events(url, op_id) if e["event"] == "status"][-1] == "completed"


def write_big_csv(path: Path, rows: int) -> None:
    stamps = np.datetime64("2000-01-01T00:00") + np.arange(rows).astype("timedelta64[m]")
    close = np.round(100 + np.cumsum(np.random.default_rng(7).normal(0, 0.01, rows)), 4)
    table = pa.table(
        {
            "timestamp": np.char.add(np.datetime_as_string(stamps, unit="s"), "Z"),
            "open": close,
            "high": close + 0.1,
            "low": close - 0.1,
            "close": close,
            "volume": np.full(rows, 1000),
        }
    )
    pacsv.write_csv(table, path)


@pytest.mark.docker
async def test_admission_reads_data_off_the_event_loop(
    config: Config, tmp_state: Path, js_handles: JetStreamHandles, no_leftover_containers: None
) -> None:
    """While the dispatcher process checks a 2M-bar data file (seconds of pandas work), it
    keeps answering pings at once: its event loop is free for cancels, timeouts, creates."""
    data = tmp_state / "data"
    data.mkdir()
    data.chmod(0o755)
    write_big_csv(data / "BIG_1m.csv", 2_000_000)
    (data / "BIG_1m.csv").chmod(0o644)
    cfg = fault_config(config, "preflight")
    url = cfg.nats.url
    with DispatcherProcess(cfg, tmp_state, "preflight") as proc:
        nc = await nats.connect(url)
        try:
            deadline = time.monotonic() + 60
            while True:  # up and answering
                try:
                    await nc.request(DISPATCHER_PING_SUBJECT, b"", timeout=0.5)
                    break
                except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
                    assert time.monotonic() < deadline, proc.log_tail()
                    await asyncio.sleep(0.2)
            job = {
                "job_id": new_id("big"),
                "kind": "backtest",
                "params": {"strategy": "sma_cross", "symbol": "BIG", "timeframe": "1m"},
                "data_dir": str(data),
                "resources": {"cpus": 0.5, "memory_gb": 2},
            }
            await publish_jobs(url, [job])
            worst_s = 0.0
            started = time.monotonic()
            while True:  # ping all through admission, until the op is placed (or ends)
                sent = time.monotonic()
                await nc.request(DISPATCHER_PING_SUBJECT, b"", timeout=10)
                worst_s = max(worst_s, time.monotonic() - sent)
                entry = None
                try:
                    entry = await js_handles.ops.get(job["job_id"])
                except Exception:  # noqa: BLE001 - not admitted yet
                    pass
                if entry is not None and json.loads(entry.value)["state"] != "queued":
                    break
                assert time.monotonic() - started < 60, proc.log_tail()
                await asyncio.sleep(0.05)
            admitted_s = time.monotonic() - started
            await wait_states(url, [job["job_id"]], TERMINAL_STATES, 120, why=proc.log_tail())
        finally:
            await nc.close()
    assert admitted_s > 0.8, admitted_s  # the check really took a while
    assert worst_s < 0.5, (worst_s, admitted_s)
    print(f"admission took {admitted_s:.2f}s; slowest ping meanwhile {worst_s * 1000:.0f} ms")
