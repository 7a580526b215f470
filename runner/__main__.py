"""Container entrypoint: ``python -m runner``.

Normally the dispatcher hands the op over in the ``KTRDR_SPEC`` environment variable (and
the op's NATS credentials on standard input) and the runner reports over JetStream.
``python -m runner --stdout KIND [k=v ...]`` runs an op with no NATS at all and prints
its result as JSON (used by the overhead benchmark and for checking a host by hand).
``python -m runner --pool WAIT_S [KIND,...]`` is a warm pool container: it does its
imports (those of the ops of KINDs; all kinds' without) ahead of time, says so, then
waits up to WAIT_S for one op on standard input (the spec as one JSON line, then the
op's credentials), runs it, and exits.
"""

from __future__ import annotations

import json
import os
import sys


def _stdout_mode(argv: list[str]) -> int:
    from runner import registry
    from runner.errors import KtrdrRunnerError
    from runner.sdk import local_context

    if not argv:
        print("usage: python -m runner --stdout KIND [key=value ...]", file=sys.stderr)
        return 2
    kind, pairs = argv[0], argv[1:]
    params: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep:
            print(f"parameter {pair!r} is not key=value", file=sys.stderr)
            return 2
        try:
            params[key] = json.loads(raw)
        except ValueError:
            params[key] = raw
    try:
        op = registry.get(kind)
        ctx, _sink = local_context(kind)
        result = op.fn(ctx, op.parse_params(params, strict=False))
    except KtrdrRunnerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, default=str))
    return 0


def _pool_mode(argv: list[str]) -> int:
    import asyncio
    import logging

    from runner.errors import UnknownKind
    from runner.protocol import EXIT_NOT_ASSIGNED, POOL_READY_LINE, spec_decoder
    from runner.transport import EXIT_BAD_SPEC, read_secret, run_op, warm_up

    try:
        wait_s = float(argv[0]) if argv else 3600.0
        kinds = [k for k in (argv[1] if len(argv) > 1 else "").split(",") if k]
        warm_up(kinds)
    except (ValueError, UnknownKind) as exc:
        print(f"usage: python -m runner --pool WAIT_S [KIND,...] ({exc})", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    print(POOL_READY_LINE, file=sys.stderr, flush=True)
    try:
        assignment = read_secret(sys.stdin.fileno(), timeout_s=wait_s)
    except (TimeoutError, OSError, UnicodeDecodeError):
        return EXIT_NOT_ASSIGNED
    spec_line, _, creds = assignment.partition("\n")
    if not spec_line:  # the dispatcher went away before it had an op for this container
        return EXIT_NOT_ASSIGNED
    try:
        spec = spec_decoder.decode(spec_line)
    except Exception as exc:  # noqa: BLE001 - any malformed spec is reported plainly
        print(f"error: the assigned op is not a valid runner spec: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    return asyncio.run(run_op(spec, creds=creds))


def main(argv: list[str] | None = None) -> int:
    """Run one op; the exit code tells the dispatcher how it ended."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--stdout"]:
        return _stdout_mode(args[1:])
    if args[:1] == ["--pool"]:
        return _pool_mode(args[1:])

    import asyncio
    import logging

    from runner.protocol import SPEC_ENV, spec_decoder
    from runner.transport import EXIT_BAD_SPEC, run_op

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    raw = os.environ.get(SPEC_ENV)
    if not raw:
        print(f"error: {SPEC_ENV} is not set; run with --stdout KIND for a local run", file=sys.stderr)
        return EXIT_BAD_SPEC
    try:
        spec = spec_decoder.decode(raw)
    except Exception as exc:  # noqa: BLE001 - any malformed spec is reported plainly
        print(f"error: {SPEC_ENV} is not a valid runner spec: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    creds = ""
    if spec.creds_stdin:
        from runner.transport import EXIT_RUNNER_UNREACHABLE, read_secret

        try:
            creds = read_secret(sys.stdin.fileno(), timeout_s=spec.ready_s)
        except (TimeoutError, OSError, UnicodeDecodeError) as exc:
            print(f"runner: no NATS credentials on standard input ({exc})", file=sys.stderr, flush=True)
            return EXIT_RUNNER_UNREACHABLE
    return asyncio.run(run_op(spec, creds=creds))


def exit_now(code: int) -> None:
    """Flush what was written and end the process without the interpreter's teardown.

    By now the op's outcome is acknowledged and NATS drained; what is left is unloading
    every module (pandas, pyarrow, torch), which under the container's CPU quota took
    ~0.4 s of the op's time for nothing."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
