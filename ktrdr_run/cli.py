"""The ``ktrdr-run`` command line.

Exit codes: 0 the op completed (or the command succeeded); 1 the op failed (or an
artifact is corrupt); 2 bad usage or input (no such op or artifact); 3 infrastructure
unavailable (no Docker, no NATS, no dispatcher); 124 the op timed out (or a wait ran
out); 130 the op was cancelled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Awaitable
from pathlib import Path

from dispatcher.config import Config, load_config
from dispatcher.errors import ConfigError, KtrdrError, OpNotFound
from ktrdr_run.cli_args import global_options_parser
from ktrdr_run.cli_auth import add_auth_parsers
from ktrdr_run.cli_backtest import add_backtest_parser
from ktrdr_run.cli_certs import add_certs_parsers
from ktrdr_run.cli_hosts import add_hosts_parsers
from ktrdr_run.cli_hosts_add import add_hosts_add_parser
from ktrdr_run.cli_manifest import add_manifest_parser, submit_manifest
from ktrdr_run.cli_ops import add_ops_parsers
from ktrdr_run.cli_submit import (
    EXIT_CANCELLED,
    EXIT_FAILED,
    EXIT_INFRA,
    EXIT_OK,
    EXIT_TIMED_OUT,
    EXIT_USAGE,
    UsageError,
    add_job_options,
    build_job,
    parse_pairs,
    submit_and_report,
)
from ktrdr_run.cli_sweep import add_sweep_parser, join_dash_value
from ktrdr_run.cli_train import add_train_parser
from ktrdr_run.errors import ArtifactCorrupt, ArtifactNotFound, InvalidJob, RequeueRefused, WaitTimeout
from ktrdr_run.manifest import ManifestError
from ktrdr_run.session import Session
from runner import registry
from runner.protocol import (
    schema,
)


async def cmd_submit(args: argparse.Namespace, config: Config) -> int:
    if args.manifest:
        if args.kind or args.param or args.job_id:
            raise UsageError("--manifest: the jobs come from the file; give no KIND, --param or --job-id")
        return await submit_manifest(args, config)
    if not args.kind:
        raise UsageError("give the op's KIND, or --manifest FILE")
    job = build_job(args.kind, parse_pairs(args.param or [], "--param"), args)
    return await submit_and_report(job, args, config)


async def cmd_dispatcher(args: argparse.Namespace, config: Config) -> int:
    from dispatcher import diagnostics
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
                runner_access=session.runner_access(),
            )
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, dispatcher.stop)
            diagnostics.install(loop)
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
            lambda: ensure_runner_image(
                client, config=config.images, progress=say, force=args.force, flavor=args.flavor
            )
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


async def cmd_images_export(args: argparse.Namespace, config: Config) -> int:
    """Write the runner image (built first if missing) as a ``docker load`` tarball."""
    from dispatcher.engine import connect_docker
    from dispatcher.images import ImageBuildError, ensure_runner_image, export_runner_image

    to_stdout = args.file == "-"
    if to_stdout and args.json:
        raise UsageError("--json: with FILE '-' stdout carries the image; name a file to get JSON")
    if to_stdout and sys.stdout.isatty():
        raise UsageError("FILE '-' writes the image tarball to stdout: redirect it (> FILE, | ssh ...)")
    target = Path(args.file)
    if not to_stdout and target.is_dir():
        raise UsageError(f"FILE {args.file!r} is a directory: name the tarball to write")
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731 - stdout may be the tarball
    client = await asyncio.to_thread(connect_docker, config.docker.url, timeout_s=config.docker.timeout_s)
    try:
        tag = await asyncio.to_thread(
            lambda: ensure_runner_image(client, config=config.images, progress=say, flavor=args.flavor)
        )
        say(f"exporting {tag} to {'stdout' if to_stdout else target}")
        out = sys.stdout.buffer if to_stdout else target
        done = await asyncio.to_thread(export_runner_image, client, tag, out, compress=args.gzip or None)
    except ImageBuildError as exc:
        raise KtrdrError(str(exc)) from None
    except BrokenPipeError:
        raise KtrdrError(f"exporting {tag}: the reader of stdout went away") from None
    finally:
        client.close()
    where = "stdout" if to_stdout else str(target)
    say(
        f"wrote {tag} ({done.image_id[:19]}) to {where}: {done.bytes / 1e6:.0f} MB"
        f"{', gzip' if done.compressed else ''}, sha256 {done.sha256}; on the other host: docker load -i FILE"
    )
    if args.json:
        print(json.dumps({"image": tag, "id": done.image_id, "file": where, "bytes": done.bytes,
                          "sha256": done.sha256, "compressed": done.compressed}))  # fmt: skip
    elif not to_stdout:
        print(tag)
    return EXIT_OK


async def cmd_dashboard(args: argparse.Namespace, config: Config) -> int:
    from tui.app import run_dashboard

    return await run_dashboard(config, read_only=args.read_only)


def cmd_schema(args: argparse.Namespace, config: Config) -> int:
    print(json.dumps(schema(), indent=2))
    return EXIT_OK


# --- argument parser -------------------------------------------------------------------


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
    p.add_argument("kind", nargs="?", help=f"operation kind ({', '.join(registry.kinds())})")
    p.add_argument("--param", "-p", action="append", metavar="K=V", help="op parameter (repeatable)")
    p.add_argument("--manifest", metavar="FILE", help="submit every job of a manifest ([[jobs]] in TOML)")
    add_job_options(p)
    p.set_defaults(handler=cmd_submit)

    add_ops_parsers(sub)
    add_manifest_parser(sub)
    add_backtest_parser(sub)
    add_sweep_parser(sub)
    add_train_parser(sub)

    p = sub.add_parser("dispatcher", help="run the dispatcher service")
    p.add_argument("--burst", action="store_true", help="exit once the queue is empty and ops are done")
    p.set_defaults(handler=cmd_dispatcher)

    p = sub.add_parser(
        "setup", help="create/update JetStream's streams, buckets and consumer as the config says"
    )
    p.set_defaults(handler=cmd_setup)

    images = sub.add_parser("images", help="runner images").add_subparsers(
        dest="images_command", required=True
    )
    p = images.add_parser("build", help="build the runner image (if its code changed, or --force)")
    p.add_argument("--force", action="store_true")
    p.add_argument("--keep-old", action="store_true", help="keep superseded runner images")
    p.add_argument(
        "--flavor",
        choices=["cpu", "cuda", "slim"],
        default="cpu",
        help="cpu (default; torch for the CPU), cuda (CUDA torch for GPU hosts; needs PyPI), slim (no torch)",
    )
    p.set_defaults(handler=cmd_images_build)
    p = images.add_parser(
        "export",
        help="write the runner image as a tarball for `docker load` on a host with no registry",
        description="Builds the image first if it is missing. The loaded image keeps its tag. "
        "FILE ending in .gz or .tgz (or --gzip) is gzipped; '-' writes to stdout.",
    )
    p.add_argument("file", metavar="FILE", help="the tarball to write ('-': stdout)")
    p.add_argument(
        "--flavor", choices=["cpu", "cuda", "slim"], default="cpu", help="which image (default cpu)"
    )
    p.add_argument("--gzip", action="store_true", help="gzip it whatever FILE is called")
    p.set_defaults(handler=cmd_images_export)

    add_hosts_add_parser(add_hosts_parsers(sub))
    add_auth_parsers(sub)
    add_certs_parsers(sub)

    p = sub.add_parser("dashboard", help="live dashboard of ops and hosts (Textual)")
    p.add_argument("--read-only", action="store_true", help="disable cancelling from the dashboard")
    p.set_defaults(handler=cmd_dashboard)

    p = sub.add_parser("schema", help="print the JSON Schema of jobs, events and op records")
    p.set_defaults(handler=cmd_schema)
    return parser


#: The exit code of each error, first match wins.
ERROR_EXIT: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], int], ...] = (
    (
        (UsageError, ConfigError, OpNotFound, ArtifactNotFound, InvalidJob, ManifestError, RequeueRefused),
        EXIT_USAGE,
    ),
    (ArtifactCorrupt, EXIT_FAILED),
    (WaitTimeout, EXIT_TIMED_OUT),
    (KtrdrError, EXIT_INFRA),
)


def parse_command_line(argv: list[str]) -> argparse.Namespace:
    """The parsed command line (``--maximize -max_drawdown`` read as a value, which
    argparse alone would take for an option)."""
    return build_parser().parse_args(join_dash_value(argv, "--maximize"))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ktrdr-run`` console script."""
    args = parse_command_line(sys.argv[1:] if argv is None else argv)
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
    except (UsageError, KtrdrError) as exc:
        label = "config error" if isinstance(exc, ConfigError) else "error"
        print(f"{label}: {exc}", file=sys.stderr)
        return next(code for kinds, code in ERROR_EXIT if isinstance(exc, kinds))
    except KeyboardInterrupt:
        return EXIT_CANCELLED
