"""``ktrdr-run submit --manifest FILE`` and ``ktrdr-run manifest status FILE``: a batch of
jobs from one file, each under its stable id (see :mod:`ktrdr_run.manifest`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dispatcher.config import Config
from dispatcher.errors import OpNotFound
from ktrdr_run.client import Client
from ktrdr_run.errors import RequeueRefused
from ktrdr_run.manifest import Planned, load_manifest
from ktrdr_run.session import Session
from runner.protocol import REQUEUABLE_STATES, TERMINAL_STATES, OpRecord

EXIT_OK = 0
EXIT_FAILED = 1


async def _records(client: Client, planned: list[Planned]) -> dict[str, OpRecord]:
    found: dict[str, OpRecord] = {}
    for item in planned:
        try:
            found[item.job.job_id] = await client.record(item.job.job_id)
        except OpNotFound:
            pass
    return found


def _rows(planned: list[Planned], records: dict[str, OpRecord]) -> list[dict[str, Any]]:
    rows = []
    for item in planned:
        record = records.get(item.job.job_id)
        rows.append(
            {
                "entry": item.label,
                "op_id": item.job.job_id,
                "state": record.state if record else "not submitted",
                "host": record.host if record else "",
                "attempts": record.attempts if record else 0,
                "error": (record.error.message if record and record.error else ""),
            }
        )
    return rows


def _print_table(rows: list[dict[str, Any]]) -> None:
    width = max([len("ENTRY")] + [len(r["entry"]) for r in rows])
    ids = max([len("OP")] + [len(r["op_id"]) for r in rows])
    print(f"{'ENTRY':<{width}}  {'OP':<{ids}}  {'STATE':<13} {'HOST':<16} ATTEMPTS")
    for r in rows:
        host = r["host"][:16]
        print(f"{r['entry']:<{width}}  {r['op_id']:<{ids}}  {r['state']:<13} {host:<16} {r['attempts']}")
        if r["error"] and r["state"] != "completed":
            print(f"  {r['error']}")


def _summary(records: dict[str, OpRecord], total: int) -> str:
    counts: dict[str, int] = {}
    for record in records.values():
        counts[record.state] = counts.get(record.state, 0) + 1
    waiting = total - len(records)
    parts = [f"{n} {state}" for state, n in sorted(counts.items())] + (
        [f"{waiting} unseen"] if waiting else []
    )
    return f"{total} ops: " + ", ".join(parts)


async def _follow(client: Client, planned: list[Planned], records: dict[str, OpRecord], quiet: bool) -> None:
    """Until every op of the manifest is terminal, one progress line per change."""
    ids = {item.job.job_id for item in planned}
    said = ""
    async for batch in client.watch_ops():
        for record in batch:
            if record.op_id in ids:
                records[record.op_id] = record
        line = _summary(records, len(ids))
        if line != said and not quiet:
            print(line, file=sys.stderr, flush=True)
            said = line
        if len(records) == len(ids) and all(r.state in TERMINAL_STATES for r in records.values()):
            return


def _report(args: argparse.Namespace, planned: list[Planned], records: dict[str, OpRecord]) -> int:
    rows = _rows(planned, records)
    if args.json:
        print(json.dumps({"manifest": str(args.manifest), "ops": rows}))
    else:
        _print_table(rows)
    finished = [r["state"] for r in rows]
    ended = all(state in TERMINAL_STATES for state in finished)
    return EXIT_OK if not ended or all(state == "completed" for state in finished) else EXIT_FAILED


async def submit_manifest(args: argparse.Namespace, config: Config) -> int:
    """Submit the manifest's jobs that no op exists for yet; follow them all to the end
    unless ``--detach``; exit 1 if any did not complete."""
    planned = load_manifest(Path(args.manifest))  # every entry checked before anything is sent
    say = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    session = Session(config, need_dispatcher=not args.detach, progress=say, setup="create")
    async with Client.over(session) as client:
        records = await _records(client, planned)
        new = [item for item in planned if item.job.job_id not in records]
        for item in new:
            await client.submit_job(item.job)
        if not args.json:
            print(
                f"manifest {args.manifest}: {len(planned)} job(s), {len(new)} submitted, "
                f"{len(planned) - len(new)} already there",
                file=sys.stderr,
            )
        if not args.detach:
            await _follow(client, planned, records, quiet=args.json)
        records = await _records(client, planned)
    return _report(args, planned, records)


async def manifest_status(args: argparse.Namespace, config: Config) -> int:
    """Every entry's op and state (reads only); ``--wait`` follows them to the end and
    exits 1 if any did not complete."""
    planned = load_manifest(Path(args.manifest))
    async with Client.over(Session(config, need_dispatcher=False, setup="bind")) as client:
        records = await _records(client, planned)
        if args.wait:
            await _follow(client, planned, records, quiet=args.json)
            records = await _records(client, planned)
    return _report(args, planned, records)


async def retry_failed(args: argparse.Namespace, config: Config) -> int:
    """``ops retry-failed --manifest FILE``: requeue every op of the manifest that failed,
    was cancelled or timed out (each its next attempt); completed, live and unsubmitted
    entries are left as they are. Exit 1 if a requeue was refused, or (with ``--wait``)
    if any op did not complete."""
    planned = load_manifest(Path(args.manifest))
    refused: list[str] = []
    async with Client.over(Session(config, need_dispatcher=False, setup="bind")) as client:
        records = await _records(client, planned)
        ended = [
            item
            for item in planned
            if (record := records.get(item.job.job_id)) is not None and record.state in REQUEUABLE_STATES
        ]
        for item in ended:
            try:
                await client.requeue(item.job.job_id, args.reason or "")
            except RequeueRefused as exc:
                refused.append(f"{item.label}: {exc}")
        if not args.json:
            print(
                f"manifest {args.manifest}: {len(ended) - len(refused)} op(s) requeued, "
                f"{len(refused)} refused, "
                f"{len(planned) - len(ended)} left as they are (completed, not ended, or not submitted)",
                file=sys.stderr,
            )
            for line in refused:
                print(f"  refused: {line}", file=sys.stderr)
        records = await _records(client, planned)
        if args.wait:
            await _follow(client, planned, records, quiet=args.json)
            records = await _records(client, planned)
    code = _report(args, planned, records)
    return EXIT_FAILED if refused else code


def add_manifest_parser(sub: Any) -> None:
    """``ktrdr-run manifest status FILE [--json] [--wait]``."""
    group = sub.add_parser("manifest", help="a batch of jobs from one file").add_subparsers(
        dest="manifest_command", required=True
    )
    p = group.add_parser("status", help="every entry's op and state")
    p.add_argument("manifest", help="the manifest file (TOML, [[jobs]])")
    p.add_argument("--wait", action="store_true", help="follow every op to its end; exit 1 if any failed")
    p.set_defaults(handler=manifest_status)
