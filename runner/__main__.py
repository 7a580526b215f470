"""Container entrypoint: ``python -m runner``.

Normally the dispatcher hands the op over in the ``KTRDR_SPEC`` environment variable (and
the op's NATS credentials on standard input) and the runner reports over JetStream.
``python -m runner --stdout KIND [k=v ...]`` runs an op with no NATS at all and prints
its result as JSON (used by the overhead benchmark and for checking a host by hand).
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


def main(argv: list[str] | None = None) -> int:
    """Run one op; the exit code tells the dispatcher how it ended."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["--stdout"]:
        return _stdout_mode(args[1:])

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


if __name__ == "__main__":
    sys.exit(main())
