"""The ``ktrdr-run`` command line.

Exit codes: 0 the op completed (or the command succeeded); 1 the op failed; 2 bad usage
or input; 3 infrastructure unavailable (no Docker, no NATS); 124 the op timed out;
130 the op was cancelled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

import msgspec

from dispatcher.config import Config, load_config
from dispatcher.errors import ConfigError, KtrdrError, OpNotFound
from ktrdr_run.cli_args import global_options_parser
from ktrdr_run.cli_backtest import add_backtest_parser
from ktrdr_run.cli_hosts import add_hosts_parsers
from ktrdr_run.session import Session, submitter
from runner import registry
from runner.errors import KtrdrRunnerError
from runner.protocol import (
    CancelAckEvent,
    ErrorEvent,
    Job,
    LogEvent,
    OpRecord,
    ProgressEvent,
    StatusEvent,
    is_valid_id,
    schema,
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
    from runner.protocol import new_job_id

    try:
        op = registry.get(kind)
        typed = op.parse_params(params, strict=False)
    except KtrdrRunnerError as exc:
        raise UsageError(str(exc)) from None
    job_id = args.job_id or new_job_id()
    if not is_valid_id(job_id):
        raise UsageError(f"--job-id {job_id!r}: use letters, digits, '-' and '_' (max 80)")
    resources: dict[str, Any] = {}
    for name in ("cpus", "memory_gb", "gpus", "gpu"):
        value = getattr(args, name, None)
        if value is not None:
            resources[name] = value
    try:
        return msgspec.convert(
            {
                "job_id": job_id,
                "kind": kind,
                "params": msgspec.to_builtins(typed),
                "resources": resources,
                "timeout_s": args.timeout_s,
                "labels": parse_pairs(args.label or [], "--label"),
                "submitted_by": submitter(),
                "data_dir": str(Path(args.data_dir).expanduser().resolve()) if args.data_dir else "",
            },
            Job,
        )
    except msgspec.ValidationError as exc:
        raise UsageError(f"invalid job: {exc}") from None


# --- rendering -------------------------------------------------------------------------


class ProgressView:
    """A one-line progress bar on a terminal; a line per step elsewhere."""

    def __init__(self, stream: TextIO, op_id: str) -> None:
        self.stream = stream
        self.op_id = op_id
        self.tty = stream.isatty()
        self._last_step = ""
        self._drawn = False

    def status(self, event: StatusEvent) -> None:
        self._clear()
        where = f" on {event.host}" if event.host else ""
        extra = f" ({event.message})" if event.message else ""
        print(f"{self.op_id}: {event.state}{where}{extra}", file=self.stream, flush=True)

    def progress(self, event: ProgressEvent) -> None:
        metrics = " ".join(f"{k}={v:.4g}" for k, v in list(event.metrics.items())[:4])
        text = f"{event.message} {metrics}".strip()
        if self.tty:
            filled = int(event.percent / 100 * 30)
            bar = "#" * filled + "." * (30 - filled)
            self.stream.write(f"\r[{bar}] {event.percent:5.1f}% {text[:60]:<60}")
            self.stream.flush()
            self._drawn = True
        elif event.step != self._last_step or event.percent >= 100:
            print(f"{self.op_id}: {event.percent:5.1f}% {event.step} {text}".rstrip(), file=self.stream)
        self._last_step = event.step

    def line(self, text: str) -> None:
        self._clear()
        print(text, file=self.stream, flush=True)

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r" + " " * 100 + "\r")
            self._drawn = False


def record_json(record: OpRecord) -> str:
    """The op record as one JSON object."""
    return msgspec.json.encode(record).decode()


def render_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value)


def print_record(record: OpRecord, out: TextIO = sys.stdout) -> None:
    """A readable summary of an op record."""
    print(f"op {record.op_id}  kind={record.kind}  state={record.state}", file=out)
    if record.host:
        print(f"  host={record.host}  image={record.image}  attempts={record.attempts}", file=out)
    if record.exit_code is not None:
        print(f"  exit_code={record.exit_code}", file=out)
    start = record.timestamps.get("queued")
    end = max(record.timestamps.values(), default=None)
    if start and end:
        print(f"  duration={end - start:.2f}s", file=out)
    if record.result:
        print("  result:", file=out)
        for key, value in record.result.items():
            print(f"    {key:<24} {render_value(value)}", file=out)
    if record.artifacts:
        print("  artifacts:", file=out)
        for name, digest in record.artifacts.items():
            print(f"    {name:<24} {digest}", file=out)
    if record.error:
        print(f"  error ({record.error.reason}): {record.error.message}", file=out)
        if record.error.field:
            print(f"    field: {record.error.field}", file=out)
    if record.cancel:
        forced = " (forced)" if record.cancel.forced else ""
        print(f"  cancelled{forced}: {record.cancel.reason or 'no reason given'}", file=out)
    if record.state == "failed" and record.log_tail:
        print("  last log lines:", file=out)
        for line in record.log_tail[-10:]:
            print(f"    {line}", file=out)


# --- commands --------------------------------------------------------------------------


async def follow_to_end(session: Session, op_id: str, view: ProgressView | None) -> OpRecord:
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
                view.line(f"{op_id}: cancelling (Ctrl-C again to stop waiting)")
            pending.add(asyncio.ensure_future(session.cancel(op_id, reason="Ctrl-C at the terminal")))
        elif follower is not None:
            follower.cancel()

    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    try:
        async for event in session.follow(op_id):
            if view is None:
                continue
            if isinstance(event, StatusEvent):
                view.status(event)
            elif isinstance(event, ProgressEvent):
                view.progress(event)
            elif isinstance(event, ErrorEvent):
                view.line(f"{op_id}: error: {event.message}")
            elif isinstance(event, CancelAckEvent):
                view.line(f"{op_id}: cancel acknowledged by the runner")
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    return await session.record(op_id)


async def cmd_submit(args: argparse.Namespace, config: Config) -> int:
    job = build_job(args.kind, parse_pairs(args.param or [], "--param"), args)
    return await submit_and_report(job, args, config)


async def submit_and_report(
    job: Job, args: argparse.Namespace, config: Config, render: Callable[[OpRecord], None] | None = None
) -> int:
    """Submit ``job``; with --detach return at once, else follow it and report the outcome."""
    say = None if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    # submitting may create what a fresh server lacks, never change what exists
    async with Session(config, need_dispatcher=not args.detach, progress=say, setup="create") as session:
        op_id = await session.submit(job)
        if args.detach:
            if args.json:
                print(json.dumps({"op_id": op_id}))
            else:
                print(op_id)
                if not await session.dispatchers():
                    print(
                        "note: no dispatcher is running; start one with `ktrdr-run dispatcher`",
                        file=sys.stderr,
                    )
            return EXIT_OK
        view = None if args.json else ProgressView(sys.stderr, op_id)
        record = await follow_to_end(session, op_id, view)
    if args.json:
        print(record_json(record))
    elif render is not None and record.state == "completed":
        render(record)
    else:
        print_record(record)
    return STATE_EXIT.get(record.state, EXIT_FAILED)


async def cmd_ops_list(args: argparse.Namespace, config: Config) -> int:
    async with Session(config, need_dispatcher=False) as session:
        records = await session.records()
    if args.state:
        records = [r for r in records if r.state == args.state]
    records = records[: args.limit]
    if args.json:
        print(msgspec.json.encode(records).decode())
        return EXIT_OK
    print(f"{'OP':<28} {'KIND':<12} {'STATE':<10} {'HOST':<14} {'PROGRESS':>8}  SUBMITTED")
    for r in records:
        submitted = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(min(r.timestamps.values(), default=0)))
        pct = f"{r.progress.percent:.0f}%" if r.progress else ""
        print(f"{r.op_id:<28} {r.kind:<12} {r.state:<10} {r.host[:14]:<14} {pct:>8}  {submitted}")
    return EXIT_OK


async def cmd_ops_show(args: argparse.Namespace, config: Config) -> int:
    async with Session(config, need_dispatcher=False) as session:
        record = await session.record(args.op_id)
    if args.json:
        print(record_json(record))
    else:
        print_record(record)
    return EXIT_OK


async def cmd_ops_logs(args: argparse.Namespace, config: Config) -> int:
    async with Session(config, need_dispatcher=False) as session:
        record = await session.record(args.op_id)
        follow = args.follow and not record.terminal

        async def replay() -> None:
            async for event in session.follow(args.op_id, until_terminal=True):
                if isinstance(event, LogEvent):
                    if args.json:
                        print(msgspec.json.encode(event).decode(), flush=True)
                    else:
                        stamp = time.strftime("%H:%M:%S", time.localtime(event.ts))
                        print(f"{stamp} {event.level:<7} {event.message}", flush=True)

        if follow:
            await replay()
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(replay(), timeout=1.0)
        record = await session.record(args.op_id)
    if record.log_tail and not args.json:
        print("--- container output (last lines) ---")
        for line in record.log_tail:
            print(line)
    return EXIT_OK


async def cmd_ops_cancel(args: argparse.Namespace, config: Config) -> int:
    async with Session(config, need_dispatcher=False) as session:
        record = await session.record(args.op_id)
        if record.terminal:
            message = f"op {args.op_id} already finished ({record.state}); nothing to cancel"
            print(
                json.dumps({"op_id": args.op_id, "state": record.state, "cancelled": False})
                if args.json
                else message
            )
            return EXIT_OK
        await session.cancel(args.op_id, reason=args.reason or "")
        if not args.wait:
            print(
                json.dumps({"op_id": args.op_id, "requested": True})
                if args.json
                else f"cancel requested for {args.op_id}"
            )
            return EXIT_OK
        async for _event in session.follow(args.op_id):
            pass
        record = await session.record(args.op_id)
    print(record_json(record) if args.json else f"{args.op_id}: {record.state}")
    return EXIT_OK


async def cmd_dispatcher(args: argparse.Namespace, config: Config) -> int:
    from dispatcher.fleet import build_fleet
    from dispatcher.images import ensure_runner_image
    from dispatcher.service import Dispatcher

    async with Session(config, need_dispatcher=False, progress=print, setup="apply") as session:
        assert session.nc is not None and session.handles is not None
        fleet, client = await build_fleet(config)

        def image() -> str:
            if client is None:
                raise ConfigError("no local Docker engine to build the runner image on")
            return ensure_runner_image(client, config=config.images, progress=print)

        try:
            await asyncio.to_thread(image)
            dispatcher = Dispatcher(
                config,
                session.nc,
                session.handles,
                fleet,
                image,
                image_source=client,
                check_reachability=True,
            )
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, dispatcher.stop)
            await dispatcher.run(burst=args.burst)
        finally:
            fleet.close()
    return EXIT_OK


async def cmd_setup(args: argparse.Namespace, config: Config) -> int:
    """Create and update JetStream's streams, buckets and the dispatchers' consumer as
    ``config`` says (what ``ktrdr-run dispatcher`` does when it starts), and say what changed.

    The session prints each creation and update ("JetStream: updated stream ..."): on
    stdout, or on stderr with --json (stdout then has one JSON object).
    """
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else print
    async with Session(config, need_dispatcher=False, progress=say, setup="apply") as session:
        assert session.nc is not None and session.handles is not None
        url = session.nc.connected_url
        where = f"{url.hostname}:{url.port}" if url else "?"
        created, updated = session.handles.created, session.handles.updated
    if args.json:
        print(json.dumps({"server": where, "created": created, "updated": updated}))
    elif not created and not updated:
        print(f"JetStream on {where} is set up as this config says; nothing changed")
    return EXIT_OK


async def cmd_images_build(args: argparse.Namespace, config: Config) -> int:
    from dispatcher.engine import connect_docker
    from dispatcher.images import ensure_runner_image, prune_runner_images

    client = await asyncio.to_thread(connect_docker, config.docker.url, timeout_s=config.docker.timeout_s)
    try:
        say = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else print
        tag = await asyncio.to_thread(
            lambda: ensure_runner_image(client, config=config.images, progress=say, force=args.force)
        )
        pruned = [] if args.keep_old else await asyncio.to_thread(prune_runner_images, client, tag)
    finally:
        client.close()
    if args.json:
        print(json.dumps({"image": tag, "pruned": pruned}))
    else:
        for old in pruned:
            print(f"removed superseded image {old}", file=sys.stderr)
        print(tag)
    return EXIT_OK


async def cmd_dashboard(args: argparse.Namespace, config: Config) -> int:
    from tui.app import run_dashboard

    return await run_dashboard(config, read_only=args.read_only)


def cmd_schema(args: argparse.Namespace, config: Config) -> int:
    print(json.dumps(schema(), indent=2))
    return EXIT_OK


# --- argument parser -------------------------------------------------------------------


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
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    """The ``ktrdr-run`` argument parser.

    The global options ``--config`` and ``-v/--verbose`` are accepted before or after the
    subcommand, at any nesting level (``ktrdr-run ops list --config X``, ``ktrdr-run -v
    ops -v list``). The top-level parser holds their real defaults; every subcommand parser
    (whoever adds it: the subparsers action below hands them on, so cli_hosts' and
    cli_backtest's subcommands get them too) has them as ``parents`` with
    ``default=argparse.SUPPRESS``, so a default never overwrites a value given earlier.
    ``--config`` given at several levels: the last one wins. ``-v`` counts add up over all
    levels (``-v ops list -v`` is ``-vv``). See :mod:`ktrdr_run.cli_args`.
    """

    parser = global_options_parser(prog="ktrdr-run", description="Run trading research ops in containers.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("submit", help="submit an op and follow it to the end")
    p.add_argument("kind", help=f"operation kind ({', '.join(registry.kinds())})")
    p.add_argument("--param", "-p", action="append", metavar="K=V", help="op parameter (repeatable)")
    add_job_options(p)
    p.set_defaults(handler=cmd_submit)

    ops = sub.add_parser("ops", help="list and inspect ops").add_subparsers(dest="ops_command", required=True)
    p = ops.add_parser("list", help="list ops, newest first")
    p.add_argument("--state", help="only ops in this state")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_ops_list)
    p = ops.add_parser("show", help="show one op record")
    p.add_argument("op_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_ops_show)
    p = ops.add_parser("logs", help="an op's log events and last container output")
    p.add_argument("op_id")
    p.add_argument("--follow", "-f", action="store_true", help="keep printing until the op ends")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_ops_logs)
    p = ops.add_parser("cancel", help="ask an op to cancel")
    p.add_argument("op_id")
    p.add_argument("--reason", default="")
    p.add_argument("--wait", action="store_true", help="wait until the op has ended")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_ops_cancel)

    add_backtest_parser(sub, add_job_options)

    p = sub.add_parser("dispatcher", help="run the dispatcher service")
    p.add_argument("--burst", action="store_true", help="exit once the queue is empty and ops are done")
    p.set_defaults(handler=cmd_dispatcher)

    p = sub.add_parser(
        "setup", help="create/update JetStream's streams, buckets and consumer as the config says"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=cmd_setup)

    images = sub.add_parser("images", help="runner images").add_subparsers(
        dest="images_command", required=True
    )
    p = images.add_parser("build", help="build the runner image (if its code changed, or --force)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--keep-old", action="store_true", help="keep superseded runner images")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_images_build)

    add_hosts_parsers(sub)

    p = sub.add_parser("dashboard", help="live dashboard of ops and hosts (Textual)")
    p.add_argument("--read-only", action="store_true", help="disable cancelling from the dashboard")
    p.set_defaults(handler=cmd_dashboard)

    p = sub.add_parser("schema", help="print the JSON Schema of jobs, events and op records")
    p.set_defaults(handler=cmd_schema)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ktrdr-run`` console script."""
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        config = None if getattr(args, "own_config", False) else load_config(args.config)
        result = args.handler(args, config)
        if isinstance(result, Awaitable):
            result = asyncio.run(result)  # type: ignore[arg-type]
        return int(result)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OpNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KtrdrError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INFRA
    except KeyboardInterrupt:
        return EXIT_CANCELLED
