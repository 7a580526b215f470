"""``ktrdr-run ops ...`` and ``ktrdr-run artifacts ...``: read ops and their results.

Every command here only reads, except ``ops cancel`` (it publishes a cancel request) and
``ops requeue`` / ``ops retry-failed`` (they ask a dispatcher to run ended ops again):
they bind to what the dispatcher set up and create or change nothing themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from dispatcher.config import Config
from ktrdr_run.cli_manifest import retry_failed
from ktrdr_run.cli_submit import STATE_EXIT
from ktrdr_run.client import Client, write_whole
from ktrdr_run.render import print_ops, print_record, record_json, run_lines
from ktrdr_run.session import Session
from runner.protocol import LogEvent

EXIT_OK = 0


def reader(config: Config) -> Client:
    """A client for commands that only read (binds; never creates or changes streams)."""
    return Client.over(Session(config, need_dispatcher=False, setup="bind"))


async def cmd_ops_list(args: argparse.Namespace, config: Config) -> int:
    async with reader(config) as client:
        records = await client.ops(state=args.state, kind=args.kind, limit=args.limit)
    if args.json:
        print(msgspec.json.encode(records).decode())
    else:
        print_ops(records)
    return EXIT_OK


async def cmd_ops_show(args: argparse.Namespace, config: Config) -> int:
    async with reader(config) as client:
        record = await client.record(args.op_id)
    if args.json:
        print(record_json(record))
    else:
        print_record(record)
    return EXIT_OK


async def cmd_ops_logs(args: argparse.Namespace, config: Config) -> int:
    async with reader(config) as client:
        op = client.op(args.op_id)
        record = await op.record()
        follow = args.follow and not record.terminal

        async def replay() -> None:
            async for event in op.events(until_terminal=True):
                if isinstance(event, LogEvent):
                    if args.json:
                        print(msgspec.json.encode(event).decode(), flush=True)
                    else:
                        stamp = time.strftime("%H:%M:%S", time.localtime(event.ts))
                        print(f"{stamp} {event.level:<7} {event.message}", flush=True)

        if follow:
            await replay()
        else:  # what is stored now: stop once the replay goes quiet
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(replay(), timeout=1.0)
        record = await op.record()
    if record.log_tail and not args.json:
        print("--- container output (last lines) ---")
        for line in record.log_tail:
            print(line)
    return EXIT_OK


async def cmd_ops_cancel(args: argparse.Namespace, config: Config) -> int:
    async with reader(config) as client:
        record = await client.record(args.op_id)
        if record.terminal:
            message = f"op {args.op_id} already finished ({record.state}); nothing to cancel"
            print(
                json.dumps({"op_id": args.op_id, "state": record.state, "cancelled": False})
                if args.json
                else message
            )
            return EXIT_OK
        op = client.op(args.op_id)
        await op.cancel(args.reason or "")
        if not args.wait:
            print(
                json.dumps({"op_id": args.op_id, "requested": True})
                if args.json
                else f"cancel requested for {args.op_id}"
            )
            return EXIT_OK
        record = await op.wait(args.wait_timeout_s)
    print(record_json(record) if args.json else f"{args.op_id}: {record.state}")
    return EXIT_OK


async def cmd_ops_requeue(args: argparse.Namespace, config: Config) -> int:
    """Run an ended op again as its next attempt; with ``--wait``, exit as that run ended."""
    async with reader(config) as client:
        op = await client.requeue(args.op_id, args.reason or "")
        record = await op.record()
        if not args.json:
            print(f"op {args.op_id} requeued")
            for line in run_lines(record):
                print(f"  {line}")
        if not args.wait:
            if args.json:
                print(record_json(record))
            return EXIT_OK
        record = await op.wait(args.wait_timeout_s)
    print(record_json(record) if args.json else f"{args.op_id}: {record.state}")
    return STATE_EXIT.get(record.state, EXIT_OK)


async def cmd_ops_artifacts(args: argparse.Namespace, config: Config) -> int:
    """Write each artifact of an op under its name and extension, each verified."""
    async with reader(config) as client:
        written = await client.save_artifacts(args.op_id, args.output)
        record = await client.record(args.op_id)
    if args.json:
        print(
            json.dumps(
                {
                    name: {"path": str(path), "object": record.artifacts[name], "bytes": path.stat().st_size}
                    for name, path in written.items()
                }
            )
        )
        return EXIT_OK
    if not written:
        print(f"op {args.op_id} has no artifacts", file=sys.stderr)
    for name, path in written.items():
        print(f"{path}  ({path.stat().st_size:,} bytes, {record.artifacts[name]} verified)")
    return EXIT_OK


async def cmd_artifacts_get(args: argparse.Namespace, config: Config) -> int:
    """One artifact by its store name, verified, to a file (or stdout with ``-o -``)."""
    async with reader(config) as client:
        data = await client.artifact(args.name)
    if args.output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return EXIT_OK
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, data)
    if args.json:
        print(json.dumps({"path": str(path), "object": args.name, "bytes": len(data)}))
    else:
        print(f"{path}  ({len(data):,} bytes, {args.name} verified)")
    return EXIT_OK


def add_ops_parsers(sub: Any) -> None:
    """Register ``ops ...`` and ``artifacts ...``."""
    ops = sub.add_parser("ops", help="list and inspect ops").add_subparsers(dest="ops_command", required=True)
    p = ops.add_parser("list", help="list ops, newest first")
    p.add_argument("--state", help="only ops in this state")
    p.add_argument("--kind", help="only ops of this kind")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(handler=cmd_ops_list)
    p = ops.add_parser("show", help="show one op record")
    p.add_argument("op_id")
    p.set_defaults(handler=cmd_ops_show)
    p = ops.add_parser("logs", help="an op's log events and last container output")
    p.add_argument("op_id")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the op ends")
    p.set_defaults(handler=cmd_ops_logs)
    p = ops.add_parser("cancel", help="ask an op to cancel")
    p.add_argument("op_id")
    p.add_argument("--reason", default="")
    p.add_argument("--wait", action="store_true", help="wait until the op has ended")
    p.add_argument(
        "--wait-timeout-s", dest="wait_timeout_s", type=float, default=300.0, help="with --wait (default 300)"
    )
    p.set_defaults(handler=cmd_ops_cancel)
    p = ops.add_parser("requeue", help="run a failed, cancelled or timed-out op again (its next attempt)")
    p.add_argument("op_id")
    p.add_argument("--reason", default="", help="why (kept in the op's history)")
    p.add_argument(
        "--wait", action="store_true", help="wait until the new attempt has ended; exit as it ended"
    )
    p.add_argument(
        "--wait-timeout-s",
        dest="wait_timeout_s",
        type=float,
        default=None,
        help="with --wait (default: none)",
    )
    p.set_defaults(handler=cmd_ops_requeue)
    p = ops.add_parser("retry-failed", help="requeue every failed, cancelled or timed-out op of a manifest")
    p.add_argument("--manifest", required=True, help="the manifest file (TOML, [[jobs]])")
    p.add_argument("--reason", default="", help="why (kept in each op's history)")
    p.add_argument("--wait", action="store_true", help="follow every op to its end; exit 1 if any failed")
    p.set_defaults(handler=retry_failed)
    p = ops.add_parser("artifacts", help="save an op's artifacts (sha256-verified) into a directory")
    p.add_argument("op_id")
    p.add_argument("-o", "--output", default=".", help="directory (default: the current one)")
    p.set_defaults(handler=cmd_ops_artifacts)

    artifacts = sub.add_parser("artifacts", help="the artifact store").add_subparsers(
        dest="artifacts_command", required=True
    )
    p = artifacts.add_parser("get", help="save one artifact by its store name (sha256-...)")
    p.add_argument("name", help="the store name, as `ops show` lists it")
    p.add_argument("-o", "--output", required=True, help="file to write ('-': standard output)")
    p.set_defaults(handler=cmd_artifacts_get)
