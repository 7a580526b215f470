"""What the fuzz (tests/test_fuzz.py) found, each pinned in isolation: messages that used to
break admission, fail a waiting op, or be lost (the admission one needs neither Docker nor
NATS)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest

from dispatcher.admission import Rejected, peek_ids, validate_job
from dispatcher.config import Config, DispatcherConfig
from runner.protocol import (
    DEAD_LETTER_STREAM,
    EVENTS_STREAM,
    OPS_BUCKET,
    TERMINAL_STATES,
    op_subject,
)
from tests.conftest import RunningDispatcher
from tests.fuzz_plan import SUBMITTER
from tests.test_fuzz import stream_count

# -- what the fuzz found, one at a time ----------------------------------------------------


def admission_config(root: Path) -> Config:
    return Config(dispatcher=DispatcherConfig(data_roots=[str(root)]))


def probe_job(**changes: Any) -> bytes:
    job: dict[str, Any] = {"job_id": "fz-one", "kind": "probe", "params": {"hold_s": 0}}
    job.update(changes)
    return json.dumps(job).encode()


def test_admission_rejects_what_used_to_break_it(tmp_path: Path) -> None:
    """Each of these once escaped admission as a crash (retried, then dead-lettered, or
    looping forever when the dead letter itself crashed) or was admitted with an id that
    is no subject token; now each is an ordinary rejection naming the field."""
    root = tmp_path / "data"
    root.mkdir()
    (root / "loop").symlink_to(root / "loop")
    config = admission_config(root)
    deep_params = (
        b'{"job_id":"fz-deep","kind":"probe","params":{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    )
    cases: dict[str, tuple[bytes, str]] = {
        "nested too deeply": (deep_params, ""),
        "never closed, nested too deeply": (b"[" * 100_000, ""),
        "a NUL byte in data_dir": (probe_job(data_dir=f"{root}/x\x00y"), "data_dir"),
        "data_dir naming an unknown user's home": (probe_job(data_dir="~nosuchuser-fz/data"), "data_dir"),
        "data_dir through a link loop": (probe_job(data_dir=f"{root}/loop"), "data_dir"),
        "a job_id ending in a newline": (probe_job(job_id="fz-nl\n"), "job_id"),
        "a parent_id ending in a newline": (probe_job(parent_id="fz-parent\n"), "parent_id"),
        "a timeout past what credentials can express": (probe_job(timeout_s=1e300), "timeout_s"),
    }
    for name, (data, where) in cases.items():
        with pytest.raises(Rejected) as caught:
            validate_job(f"ktrdr.jobs.probe.{SUBMITTER}", data, config)
        assert caught.value.field == where, (name, caught.value.field, str(caught.value))
        job_id, kind = peek_ids(f"ktrdr.jobs.probe.{SUBMITTER}", data)  # never raises
        assert kind == "probe" and job_id in ("", "fz-one"), (name, job_id)
    assert peek_ids("ktrdr.jobs.probe", probe_job(job_id="fz-nl\n")) == ("", "probe")


async def publish_raw(url: str, subject: str, data: bytes, msg_id: str | None = None) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().publish(subject, data, headers={"Nats-Msg-Id": msg_id} if msg_id else None)
    finally:
        await nc.close()


async def read_record(url: str, op_id: str) -> dict[str, Any] | None:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value(OPS_BUCKET)
        try:
            return dict(json.loads((await kv.get(op_id)).value or b"{}"))
        except nats.js.errors.KeyNotFoundError:
            return None
    finally:
        await nc.close()


async def until_state(
    url: str, op_id: str, states: set[str] | frozenset[str], timeout_s: float = 60
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        record = await read_record(url, op_id)
        if record is not None and record["state"] in states:
            return record
        assert time.monotonic() < deadline, (op_id, states, record)
        await asyncio.sleep(0.1)


async def count_in(url: str, stream: str, subjects: str) -> int:
    nc = await nats.connect(url)
    try:
        return await stream_count(nc.jetstream(), stream, subjects)
    finally:
        await nc.close()


@pytest.mark.docker
@pytest.mark.nats
async def test_a_malformed_message_naming_a_waiting_op_leaves_it_alone(
    config: Config, dispatcher: RunningDispatcher
) -> None:
    """A job waiting for capacity (``queued``) is not failed by another message that
    reuses its id and is rejected: only its own job message (a requeue of it) may fail it."""
    url = config.nats.url
    cpus = dispatcher.dispatcher.fleet.hosts()[0].cpus
    blocker = {"job_id": "fz-blocker", "kind": "probe", "params": {"hold_s": 60}, "resources": {"cpus": cpus}}
    await publish_raw(url, "ktrdr.jobs.probe", json.dumps(blocker).encode(), "fz-blocker")
    await until_state(url, "fz-blocker", {"running"})
    waiting = {"job_id": "fz-waiting", "kind": "probe", "params": {"hold_s": 0}, "resources": {"cpus": 1}}
    await publish_raw(url, "ktrdr.jobs.probe", json.dumps(waiting).encode(), "fz-waiting")
    await until_state(url, "fz-waiting", {"queued"})
    others = [
        {"job_id": "fz-waiting", "kind": "probe", "params": 5},  # undecodable; its id peeked
        {**waiting, "params": {"hold_s": "soon"}},  # invalid params
        {**waiting, "data_dir": "/etc"},  # the same params, a directory outside the roots
        {**waiting, "resources": {"gpus": 1, "gpu": "never"}},  # the same params, impossible
    ]
    before = await count_in(url, EVENTS_STREAM, "ktrdr.rejected.>")
    for i, other in enumerate(others):
        await publish_raw(url, "ktrdr.jobs.probe", json.dumps(other).encode(), f"fz-other-{i}")
    deadline = time.monotonic() + 30
    while await count_in(url, EVENTS_STREAM, "ktrdr.rejected.>") < before + len(others):
        assert time.monotonic() < deadline, "the other messages were not all rejected"
        await asyncio.sleep(0.1)
    record = await read_record(url, "fz-waiting")
    assert record is not None and record["state"] == "queued", record
    assert await count_in(url, EVENTS_STREAM, op_subject("fz-waiting", "error")) == 0
    await publish_raw(
        url, op_subject("fz-blocker", "cancel"), b'{"event":"cancel","op_id":"fz-blocker","ts":1}'
    )
    done = await until_state(url, "fz-waiting", TERMINAL_STATES, 90)
    assert done["state"] == "completed" and done["error"] is None, done
    assert (await until_state(url, "fz-blocker", TERMINAL_STATES))["state"] == "cancelled"


@pytest.mark.docker
@pytest.mark.nats
async def test_a_garbage_cancel_stored_before_its_job_cancels_it(
    config: Config, dispatcher: RunningDispatcher
) -> None:
    """Any message on an op's cancel subject is a cancel request (as the live path and the
    runner read it): one stored before the job arrives cancels the job before it starts,
    instead of breaking its admission until it is dead-lettered."""
    url = config.nats.url
    for op_id, body in (
        ("fz-garbage-cancel", b"\xff\x00 not json"),
        ("fz-typed-cancel", b'{"event":"cancel"}'),
    ):
        await publish_raw(url, op_subject(op_id, "cancel"), body)
        job = {"job_id": op_id, "kind": "probe", "params": {"hold_s": 0}}
        await publish_raw(url, "ktrdr.jobs.probe", json.dumps(job).encode(), op_id)
        record = await until_state(url, op_id, TERMINAL_STATES, 60)
        assert record["state"] == "cancelled" and not record["container_id"], record
    assert await count_in(url, DEAD_LETTER_STREAM, "ktrdr.dead.>") == 0


@pytest.mark.docker
@pytest.mark.nats
async def test_a_job_whose_id_a_rejected_message_took_is_told_so(
    config: Config, dispatcher: RunningDispatcher
) -> None:
    """Ids are first come, first served: a rejected message with a usable id leaves a
    ``failed`` op. A later, valid job with that id does not run (the op already ended), and
    it gets a rejection saying why instead of being dropped as a duplicate."""
    url = config.nats.url
    bad = {"job_id": "fz-first", "kind": "probe", "params": {"hold_s": "soon"}}
    await publish_raw(url, "ktrdr.jobs.probe", json.dumps(bad).encode(), "fz-first-1")
    first = await until_state(url, "fz-first", {"failed"})
    good = {"job_id": "fz-first", "kind": "probe", "params": {"hold_s": 0}}
    await publish_raw(url, "ktrdr.jobs.probe", json.dumps(good).encode(), "fz-first-2")
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + 30
        while True:
            last = json.loads((await js.get_last_msg(EVENTS_STREAM, "ktrdr.rejected.probe")).data or b"{}")
            if last.get("error_type") == "JobIdReused":
                break
            assert time.monotonic() < deadline, last
            await asyncio.sleep(0.1)
    finally:
        await nc.close()
    assert last["op_id"] == "fz-first" and "rejected earlier" in last["message"], last
    assert await read_record(url, "fz-first") == first  # the op is as the first message left it
