"""Operator requeue (issue 15): an ended op runs again as the next attempt of the same op,
its earlier run kept in the record's history with who asked. Real dispatcher, real NATS
and Docker; every command is a ``ktrdr-run`` process of its own."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import nats
import pytest

from dispatcher.config import Config
from ktrdr_run.manifest import load_manifest
from ktrdr_run.session import submitter
from runner.protocol import REQUEUE_SUBJECT
from tests.conftest import RunningDispatcher, run_cli, write_config
from tests.faults import DispatcherProcess, all_events, fault_config, python_argv, wait_states


async def status_events(url: str, op_id: str) -> list[dict[str, Any]]:
    """Every status event of the op, read from the event stream itself."""
    return [e for e in await all_events(url, op_id) if e["event"] == "status"]


@pytest.fixture
def config_path(config: Config, tmp_state: Path) -> Path:
    """The test's config as a file, for the ``ktrdr-run`` processes."""
    return write_config(config, tmp_state / "ktrdr-run.toml")


def cli(config_path: Path, *args: str, timeout_s: float = 120) -> Any:
    return asyncio.to_thread(run_cli, list(args), config_path, timeout_s)


async def test_requeue_of_a_failed_op_runs_attempt_2_of_the_same_op(
    config: Config, dispatcher: RunningDispatcher, config_path: Path
) -> None:
    failed = await cli(config_path, "submit", "probe", "-p", "fail=true", "--job-id", "rq-failed", "--json")
    assert failed.returncode == 1, failed.stderr
    first = json.loads(failed.stdout)
    assert (first["state"], first["attempts"]) == ("failed", 1)

    again = await cli(
        config_path, "ops", "requeue", "rq-failed", "--reason", "flaky disk", "--wait", "--json"
    )
    assert again.returncode == 1, again.stderr  # it fails again, as it must: same params
    record = json.loads(again.stdout)
    assert (record["op_id"], record["state"], record["attempts"]) == ("rq-failed", "failed", 2)
    [ended] = record["history"]
    assert (ended["attempt"], ended["state"], ended["error"]["reason"]) == (
        1,
        "failed",
        first["error"]["reason"],
    )
    assert (ended["requeued_by"], ended["requeue_reason"]) == (submitter(), "flaky disk")
    assert ended["container_id"] == first["container_id"] != record["container_id"]
    assert ended["timestamps"] == first["timestamps"]

    # the event stream agrees: two runs, each ending failed, the second after a requeue
    events = await status_events(config.nats.url, "rq-failed")
    terminal = [(e["state"], e["attempt"]) for e in events if e["state"] == "failed"]
    assert terminal == [("failed", 1), ("failed", 2)]
    assert any(e["state"] == "queued" and e["message"].startswith("requeued by ") for e in events)

    counted = dispatcher.dispatcher.metrics.registry.get_sample_value
    assert counted("ktrdr_ops_requeued_total", {"kind": "probe", "from_state": "failed"}) == 1.0

    shown = await cli(config_path, "ops", "show", "rq-failed")
    assert shown.returncode == 0, shown.stderr
    assert f"attempt 1 on {first['host']}: failed" in shown.stdout
    assert f"requeued by {submitter()}: flaky disk" in shown.stdout
    assert f"attempt 2 on {record['host']}: failed" in shown.stdout


async def test_a_cancelled_op_requeued_runs_to_completion_and_its_old_cancel_stays_behind(
    config: Config, dispatcher: RunningDispatcher, config_path: Path
) -> None:
    started = await cli(config_path, "submit", "probe", "-p", "hold_s=3", "--job-id", "rq-cancel", "--detach")
    assert started.returncode == 0, started.stderr
    cancelled = await cli(config_path, "ops", "cancel", "rq-cancel", "--reason", "wrong window", "--wait")
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout, cancelled.stderr

    # the waiter follows the new run: the first run's terminal event is not the end
    again = await cli(config_path, "ops", "requeue", "rq-cancel", "--wait", "--json")
    assert again.returncode == 0, again.stderr
    record = json.loads(again.stdout)
    assert record["state"] == "completed" and record["cancel"] is None
    assert [h["state"] for h in record["history"]] == ["cancelled"]
    assert record["history"][0]["requeued_by"] == submitter()
    assert record["result"] is not None

    # a completed op is not run again: refused, naming why, nothing changed
    refused = await cli(config_path, "ops", "requeue", "rq-cancel")
    assert refused.returncode == 2
    assert "op rq-cancel completed: a completed op is not run again" in refused.stderr
    missing = await cli(config_path, "ops", "requeue", "no-such-op")
    assert missing.returncode == 2 and "no op no-such-op" in missing.stderr


async def test_two_operators_requeueing_one_op_at_once_start_exactly_one_more_attempt(
    config: Config, dispatcher: RunningDispatcher, config_path: Path
) -> None:
    failed = await cli(config_path, "submit", "probe", "-p", "fail=true", "--job-id", "rq-race", "--json")
    assert failed.returncode == 1, failed.stderr

    both = await asyncio.gather(*(cli(config_path, "ops", "requeue", "rq-race") for _ in range(2)))
    codes = sorted(p.returncode for p in both)
    assert codes == [0, 2], [(p.returncode, p.stderr) for p in both]
    loser = next(p for p in both if p.returncode == 2)
    assert "op rq-race is " in loser.stderr or "changed while it was being requeued" in loser.stderr

    waited = await cli(config_path, "ops", "cancel", "rq-race", "--wait", "--json")  # waits it out
    assert waited.returncode == 0, waited.stderr
    events = await status_events(config.nats.url, "rq-race")
    assert [e["attempt"] for e in events if e["state"] == "running"] == [1, 2]
    record = json.loads((await cli(config_path, "ops", "show", "rq-race", "--json")).stdout)
    assert record["attempts"] == 2 and len(record["history"]) == 1


async def test_a_running_op_and_a_bad_request_are_refused_and_the_service_goes_on(
    config: Config, dispatcher: RunningDispatcher, config_path: Path
) -> None:
    started = await cli(config_path, "submit", "probe", "-p", "hold_s=30", "--job-id", "rq-live", "--detach")
    assert started.returncode == 0, started.stderr
    nc = await nats.connect(config.nats.url)
    try:
        for bad, said in [
            (b"{not json", "requeue request is not valid JSON"),
            (
                b'{"op_id": "rq-live", "when": 1}',
                "invalid requeue request: when: unknown field",
            ),
            (b'{"op_id": 7}', "invalid requeue request: op_id: "),
            (b'{"op_id": "../x"}', "op_id: '../x' is not an op id"),
        ]:
            reply = json.loads((await nc.request(REQUEUE_SUBJECT, bad, timeout=10)).data)
            assert reply["requeued"] is False and said in reply["error"], reply
        live = await cli(config_path, "ops", "requeue", "rq-live")
        assert live.returncode == 2
        assert "only a failed, cancelled or timed-out op is requeued" in live.stderr
        assert "cancel it first (`ktrdr-run ops cancel rq-live --wait`)" in live.stderr
    finally:
        await nc.close()
    stopped = await cli(config_path, "ops", "cancel", "rq-live", "--wait")
    assert stopped.returncode == 0, stopped.stderr


async def test_requeue_with_no_dispatcher_or_a_garbled_answer_says_so_at_once(
    config: Config, config_path: Path
) -> None:
    setup = await cli(config_path, "setup")
    assert setup.returncode == 0, setup.stderr
    done = await cli(config_path, "ops", "requeue", "some-op", timeout_s=30)
    assert done.returncode == 3
    assert "requeue of op some-op: no dispatcher is running to take it" in done.stderr
    assert "nothing was changed" in done.stderr

    # something answers, but not in the contract's words (it stands for a dispatcher of
    # another version): a clear error, not a traceback
    nc = await nats.connect(config.nats.url)
    try:

        async def garble(msg: Any) -> None:
            await msg.respond(b"<html>nonsense</html>")

        await nc.subscribe(REQUEUE_SUBJECT, cb=garble)
        await nc.flush()
        garbled = await cli(config_path, "ops", "requeue", "some-op", timeout_s=30)
    finally:
        await nc.close()
    assert garbled.returncode == 3, garbled.stderr
    assert "requeue of op some-op: the dispatcher's answer is unreadable" in garbled.stderr
    assert "Traceback" not in garbled.stderr


async def test_retry_failed_requeues_the_ended_ops_of_a_manifest_and_no_other(
    config: Config, dispatcher: RunningDispatcher, config_path: Path
) -> None:
    manifest = config_path.parent / "batch.toml"
    manifest.write_text(
        '[[jobs]]\nname = "ok"\nkind = "probe"\nparams = { hold_s = 0.1 }\n\n'
        '[[jobs]]\nname = "bad"\nkind = "probe"\nparams = { fail = true }\n'
    )
    ids = {p.label: p.job.job_id for p in load_manifest(manifest)}
    first = await cli(config_path, "submit", "--manifest", str(manifest), "--json", timeout_s=180)
    assert first.returncode == 1, first.stderr
    assert {o["entry"]: o["state"] for o in json.loads(first.stdout)["ops"]} == {
        "ok": "completed",
        "bad": "failed",
    }

    retried = await cli(
        config_path,
        "ops",
        "retry-failed",
        "--manifest",
        str(manifest),
        "--wait",
        "--reason",
        "nightly",
        timeout_s=180,
    )
    assert retried.returncode == 1, retried.stderr  # "bad" fails again
    assert "1 op(s) requeued, 0 refused, 1 left as they are" in retried.stderr
    ok = json.loads((await cli(config_path, "ops", "show", ids["ok"], "--json")).stdout)
    bad = json.loads((await cli(config_path, "ops", "show", ids["bad"], "--json")).stdout)
    assert (ok["attempts"], ok["history"]) == (1, [])
    assert (bad["state"], bad["attempts"]) == ("failed", 2)
    assert [(h["state"], h["requeue_reason"]) for h in bad["history"]] == [("failed", "nightly")]


async def test_a_requeuer_killed_between_its_write_and_the_job_message_loses_nothing(
    config: Config, tmp_state: Path, config_path: Path, no_leftover_containers: None
) -> None:
    url = config.nats.url
    dying = DispatcherProcess(
        fault_config(config, "rq-dies"),
        tmp_state,
        "rq-dies",
        argv=python_argv("tests.crashing_dispatcher", "requeue"),
    )
    heir = DispatcherProcess(fault_config(config, "rq-heir"), tmp_state, "rq-heir")
    try:
        dying.start()
        failed = await cli(
            config_path, "submit", "probe", "-p", "fail=true", "--job-id", "rq-crash", "--json"
        )
        assert failed.returncode == 1, failed.stderr + dying.log_tail()

        # the requeue is written, then its dispatcher vanishes without a word: the asker
        # is told it has no answer and what to check, within its deadline
        asked = await cli(config_path, "ops", "requeue", "rq-crash", timeout_s=60)
        assert asked.returncode == 3, asked.stderr
        assert "no dispatcher answered within 10 s; it may still have been done" in asked.stderr
        assert dying.process is not None and dying.process.wait(10) == -9
        [record] = (await wait_states(url, ["rq-crash"], {"queued"}, 5)).values()
        assert (record["attempts"], len(record["history"])) == (1, 1)

        heir.start()  # takes the op over once the dead one's lease runs out, and runs it
        [record] = (await wait_states(url, ["rq-crash"], {"failed"}, 120, why=heir.log_tail())).values()
        assert (record["attempts"], record["dispatcher"]) == (2, heir.dispatcher_id)
        events = await status_events(url, "rq-crash")
        assert [e["attempt"] for e in events if e["state"] == "running"] == [1, 2]  # once each

        # asked what it is doing (dispatcher/diagnostics.py), it says, and goes on
        for signum, said in ((signal.SIGUSR1, "asyncio tasks:"), (signal.SIGUSR2, "most recent call first")):
            heir.signal(signum)
            deadline = time.monotonic() + 10
            while said not in heir.log_path.read_text(errors="replace"):
                assert time.monotonic() < deadline, heir.log_tail()
                await asyncio.sleep(0.1)
        assert heir.alive()
    finally:
        dying.kill()
        code = heir.stop()
    assert code == 0, heir.log_tail()


def test_the_runs_of_a_requeued_op_read_in_order() -> None:
    from ktrdr_run.render import run_lines
    from runner.protocol import EndedAttempt, ErrorInfo, OpRecord

    never = EndedAttempt(attempt=0, state="cancelled", requeued_by="bob")
    failed = EndedAttempt(
        attempt=1,
        state="failed",
        host="h1",
        error=ErrorInfo(reason="op_error", message="boom"),
        requeued_by="al",
    )
    record = OpRecord(op_id="x", kind="probe", state="queued", attempts=1, history=[never, failed])
    assert run_lines(record) == [
        "before its first attempt: cancelled; requeued by bob",
        "attempt 1 on h1: failed (op_error: boom); requeued by al",
        "attempt 2: queued (latest)",
    ]
    assert run_lines(OpRecord(op_id="y", kind="probe")) == []  # never requeued: nothing to list


def test_a_requeue_is_counted_by_the_state_it_left() -> None:
    from dispatcher.metrics import Metrics
    from runner.protocol import OpRecord

    metrics = Metrics()
    ended = OpRecord(op_id="x", kind="probe", state="timed_out", attempts=1)
    metrics.observe(ended, OpRecord(op_id="x", kind="probe", state="queued", attempts=1))
    metrics.observe(None, OpRecord(op_id="y", kind="probe"))  # a new op is submitted, not requeued
    sample = metrics.registry.get_sample_value
    assert sample("ktrdr_ops_requeued_total", {"kind": "probe", "from_state": "timed_out"}) == 1.0
    assert sample("ktrdr_ops_submitted_total", {"kind": "probe"}) == 1.0
