"""What the dispatcher knows about one running op, and how an ended op is classified.

:func:`classify` is a pure function: from what the container did (exit code, OOM flag,
log tail) and what the runner said (result, error, cancel ack), one terminal state and
the fields that go with it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec

from dispatcher.engine import ContainerExit, DockerEngine
from dispatcher.opstore import Owner
from dispatcher.placement import Reservation
from dispatcher.warm import WarmContainer
from runner.protocol import (
    EXIT_RUNNER_UNREACHABLE,
    CancelAckEvent,
    CancelIntent,
    CancelRequest,
    ErrorEvent,
    ErrorInfo,
    Job,
    ProgressSnapshot,
    ResultEvent,
    now,
)
from runner.transport import redact_url


@dataclass
class OpRun:
    """One attempt of an op this dispatcher owns: started here, or taken over from a
    dispatcher that died. The job message is not held while the op runs: once the op is
    claimed, its record and this dispatcher's lease carry it."""

    op_id: str
    job: Job
    reservation: Reservation
    engine: DockerEngine
    owner: Owner
    attempt: int = 1
    #: Attempts spent before an operator requeued the op: retries count from here.
    attempt_base: int = 0
    container_id: str = ""
    started_ts: float = 0.0
    running_ts: float = 0.0
    logs_since: float = 0.0
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    progress: ProgressSnapshot | None = None
    progress_dirty: asyncio.Event = field(default_factory=asyncio.Event)
    result: ResultEvent | None = None
    error: ErrorEvent | None = None
    cancel_ack: CancelAckEvent | None = None
    cancel_requested: CancelRequest | None = None
    forced: bool = False
    timed_out: bool = False
    removed: bool = False
    runner_url: str = ""
    #: Whether the runner was heard from in this attempt (any event of the attempt).
    seen_runner: bool = False
    #: time.monotonic() of the last sign of life (or of the start, before the first one).
    last_seen: float = field(default_factory=time.monotonic)
    #: Why the dispatcher ended the attempt early ("" while it runs): runner_unreachable,
    #: lost (heartbeat silence), host_down, ownership_lost.
    abort_reason: str = ""
    abort_message: str = ""
    aborted: asyncio.Event = field(default_factory=asyncio.Event)
    #: The warm pool container taken for this attempt when it was placed (None: a fresh one).
    warm: WarmContainer | None = None

    def abort(self, reason: str, message: str) -> None:
        """End the attempt early; the supervisor acts on the first reason given."""
        if not self.abort_reason:
            self.abort_reason, self.abort_message = reason, message
            self.aborted.set()

    def note(self, event: Any) -> None:
        """Keep an outcome event the runner published."""
        if isinstance(event, ResultEvent):
            self.result = event
        elif isinstance(event, ErrorEvent):
            self.error = event
        elif isinstance(event, CancelAckEvent):
            self.cancel_ack = event


def classify(run: OpRun, ending: ContainerExit, exit_code: int) -> tuple[str, dict[str, Any]]:
    """The op's terminal state and the record fields that go with it.

    Order matters: a timeout we enforced wins; then a cancel the runner acknowledged; then
    a clean result (an op that finished before a cancel took effect completed); then a
    cancel we had to force; then the failures: a stop nobody here asked for, the kernel's
    OOM kill (told apart from our own kill by the engine's OOMKilled flag), the op's own
    error, a bare exit code.
    """
    fields: dict[str, Any] = {"exit_code": exit_code, "log_tail": ending.log_tail}
    if run.progress is not None:
        fields["progress"] = run.progress
    requested = run.cancel_requested
    intent = CancelIntent(
        requested_at=requested.ts if requested else now(),
        reason=requested.reason if requested else "",
        requested_by=requested.requested_by if requested else "",
        acked=run.cancel_ack is not None,
        forced=run.forced and run.cancel_ack is None,
    )
    if run.abort_reason == "runner_unreachable" or (
        not run.seen_runner and exit_code == EXIT_RUNNER_UNREACHABLE and run.result is None
    ):
        said = next((line for line in reversed(ending.log_tail) if "cannot reach NATS" in line), "")
        message = run.abort_message or f"the runner could not reach NATS at {redact_url(run.runner_url)}"
        if said and said not in message:
            message = f"{message} (the runner said: {said.removeprefix('runner: ')})"
        fields["error"] = ErrorInfo(reason="runner_unreachable", message=message)
        return "failed", fields
    if run.timed_out:
        timeout = run.job.timeout_s or 0.0
        fields["error"] = ErrorInfo(reason="timeout", message=f"timed out after {timeout:g}s")
        return "timed_out", fields
    if run.cancel_ack is not None and requested is not None:
        intent = msgspec.structs.replace(intent, partial_saved=run.cancel_ack.partial_saved)
        return "cancelled", {**fields, "cancel": intent, "artifacts": run.cancel_ack.artifacts}
    if exit_code == 0 and run.result is not None:
        return "completed", {**fields, "result": run.result.result, "artifacts": run.result.artifacts}
    if requested is not None:
        return "cancelled", {**fields, "cancel": intent}
    if run.cancel_ack is not None:  # a SIGTERM nobody here asked for
        fields["error"] = ErrorInfo(
            reason="stopped_externally",
            message="the container was stopped from outside ktrdr-run (it received SIGTERM)",
        )
    elif ending.oom_killed:
        fields["error"] = ErrorInfo(
            reason="oom_killed",
            message="the kernel killed the op: it ran out of memory (raise resources.memory_gb)",
        )
    elif run.error is not None:
        fields["error"] = ErrorInfo(
            reason=run.error.reason,
            message=run.error.message,
            error_type=run.error.error_type,
            field=run.error.field,
            traceback=run.error.traceback,
        )
    elif exit_code == 0:
        fields["error"] = ErrorInfo(
            reason="no_result", message="the runner exited without publishing a result"
        )
    else:
        last = ending.log_tail[-1] if ending.log_tail else ""
        message = f"container exited with code {exit_code}" + (f": {last}" if last else "")
        fields["error"] = ErrorInfo(reason="exit_nonzero", message=message)
    return "failed", fields
