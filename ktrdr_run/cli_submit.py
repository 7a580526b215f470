"""Submitting from the command line: build a job from options, follow it with a
progress view, report the outcome as an exit code."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from dispatcher.config import Config
from ktrdr_run.client import Client, Op, make_job
from ktrdr_run.errors import InvalidJob
from ktrdr_run.render import ProgressView, print_record, record_json
from ktrdr_run.session import Session
from runner.protocol import (
    CancelAckEvent,
    ErrorEvent,
    Event,
    Job,
    OpRecord,
    ProgressEvent,
    StatusEvent,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INFRA = 3
EXIT_TIMED_OUT = 124
EXIT_CANCELLED = 130
STATE_EXIT = {
    "completed": EXIT_OK,
    "failed": EXIT_FAILED,
    "timed_out": EXIT_TIMED_OUT,
    "cancelled": EXIT_CANCELLED,
}


class UsageError(Exception):
    """Bad command-line input; exit code 2."""


# --- parsing helpers -------------------------------------------------------------------


def parse_pairs(pairs: list[str], what: str) -> dict[str, Any]:
    """``k=v`` pairs; values are JSON when they parse as JSON (numbers, true, lists)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} {pair!r} is not key=value")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


def build_job(kind: str, params: dict[str, Any], args: argparse.Namespace) -> Job:
    """A validated job from the command line (params converted to their declared types)."""
    resources: dict[str, Any] = {}
    for name in ("cpus", "memory_gb", "gpus", "gpu"):
        value = getattr(args, name, None)
        if value is not None:
            resources[name] = value
    try:
        return make_job(
            kind,
            params,
            resources=resources,
            timeout_s=args.timeout_s,
            labels=parse_pairs(args.label or [], "--label"),
            job_id=args.job_id,
            data_dir=args.data_dir,
            lenient=True,
        )
    except InvalidJob as exc:
        message = str(exc)
        if exc.field == "job_id":
            message = f"--job-id {args.job_id!r}: use letters, digits, '-' and '_' (max 80)"
        raise UsageError(message) from None


# --- commands --------------------------------------------------------------------------


async def follow_to_end(op: Op, view: ProgressView | None) -> OpRecord:
    """Follow an op's events until its terminal state; Ctrl-C asks to cancel it once,
    a second Ctrl-C stops waiting."""
    loop = asyncio.get_running_loop()
    interrupted = 0
    follower = asyncio.current_task()
    pending: set[asyncio.Future[Any]] = set()

    def on_interrupt() -> None:
        nonlocal interrupted
        interrupted += 1
        if interrupted == 1:
            if view:
                view.line(f"{op.op_id}: cancelling (Ctrl-C again to stop waiting)")
            pending.add(asyncio.ensure_future(op.cancel(reason="Ctrl-C at the terminal")))
        elif follower is not None:
            follower.cancel()

    def show(event: Event) -> None:
        if view is None:
            return
        if isinstance(event, StatusEvent):
            view.status(event)
        elif isinstance(event, ProgressEvent):
            view.progress(event)
        elif isinstance(event, ErrorEvent):
            view.line(f"{op.op_id}: error: {event.message}")
        elif isinstance(event, CancelAckEvent):
            view.line(f"{op.op_id}: cancel acknowledged by the runner")

    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    try:
        return await op.wait(on_event=show)
    finally:
        loop.remove_signal_handler(signal.SIGINT)


Render = Callable[[Client, OpRecord], Awaitable[None]]


async def submit_and_report(
    job: Job,
    args: argparse.Namespace,
    config: Config,
    render: Render | None = None,
    milestone: Callable[[ProgressEvent], str | None] | None = None,
    render_states: Collection[str] = ("completed",),
) -> int:
    """Submit ``job``; with --detach return at once, else follow it and report the outcome
    (``render`` shows an op that ended in one of ``render_states`` its own way, while
    still connected)."""
    say = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    # submitting may create what a fresh server lacks, never change what exists
    session = Session(config, need_dispatcher=not args.detach, progress=say, setup="create")
    async with Client.over(session) as client:
        op = await client.submit_job(job)
        if args.detach:
            if args.json:
                print(json.dumps({"op_id": op.op_id}))
            else:
                print(op.op_id)
                if not await client.dispatchers():
                    print(
                        "note: no dispatcher is running; start one with `ktrdr-run dispatcher`",
                        file=sys.stderr,
                    )
            return EXIT_OK
        if args.json:
            record = await follow_to_end(op, None)
            print(record_json(record))
        else:
            with ProgressView(sys.stderr, op.op_id, milestone) as view:
                record = await follow_to_end(op, view)
            if render is not None and record.state in render_states:
                await render(client, record)
            else:
                print_record(record)
    return STATE_EXIT.get(record.state, EXIT_FAILED)


def add_job_options(parser: argparse.ArgumentParser) -> None:
    """Options every submitting command shares."""
    parser.add_argument("--job-id", help="idempotency key; also the op id (default: generated)")
    parser.add_argument("--cpus", type=float, help="CPUs to reserve (default: the kind's)")
    parser.add_argument("--memory-gb", dest="memory_gb", type=float, help="memory limit in GiB")
    parser.add_argument("--gpus", type=int, help="number of GPUs")
    parser.add_argument("--gpu", choices=["required", "preferred", "never"], help="GPU policy")
    parser.add_argument(
        "--timeout-s", dest="timeout_s", type=float, help="stop the op after this many seconds"
    )
    parser.add_argument("--label", action="append", metavar="K=V", help="label the op (repeatable)")
    parser.add_argument("--data-dir", dest="data_dir", help="data directory, mounted read-only at /data")
    parser.add_argument("--detach", action="store_true", help="submit and return the op id at once")
