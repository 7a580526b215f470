"""Errors a ktrdr-run client sees.

Every error the client raises derives from :class:`KtrdrError` (the project's root), so
``except KtrdrError`` catches them all. :class:`ClientError` is the root of the errors
only the client raises; NATS and object-store errors are translated into these at the
edge, each with a message that says what to do.
"""

from __future__ import annotations

from dispatcher.errors import (
    ConfigError,
    JetStreamSetupError,
    KtrdrError,
    NatsUnavailable,
    OpNotFound,
)

__all__ = [
    "ArtifactCorrupt",
    "ArtifactNotFound",
    "ClientError",
    "ConfigError",
    "InvalidJob",
    "JetStreamSetupError",
    "KtrdrError",
    "NatsUnavailable",
    "NoDispatcher",
    "OpNotFound",
    "RequestUnanswered",
    "RequeueRefused",
    "WaitTimeout",
]


class ClientError(KtrdrError):
    """Root of the errors raised by the client itself."""


class InvalidJob(ClientError):
    """The job cannot be submitted: ``field`` names the offending field."""

    def __init__(self, message: str, field: str = "") -> None:
        self.field = field
        super().__init__(message)


class ArtifactNotFound(ClientError):
    """No artifact has this name (expired, or never stored)."""

    def __init__(self, name: str, detail: str = "") -> None:
        self.name = name
        extra = f" ({detail})" if detail else ""
        super().__init__(
            f"no artifact {name!r} in the artifact store{extra}; artifacts expire after "
            "[retention] artifacts_s (see `ktrdr-run ops show OP` for an op's artifact names)"
        )


class ArtifactCorrupt(ClientError):
    """An artifact's bytes do not hash to the sha256 its name promises."""

    def __init__(self, name: str, actual: str) -> None:
        self.name = name
        self.actual = actual
        super().__init__(
            f"artifact {name!r} is corrupt: its content hashes to sha256-{actual}; "
            "nothing was written. Fetch it again; if it stays corrupt, rerun the op"
        )


class WaitTimeout(ClientError):
    """``wait(timeout_s=...)`` ran out; the op goes on."""

    def __init__(self, op_id: str, timeout_s: float, state: str) -> None:
        self.op_id = op_id
        self.state = state
        super().__init__(
            f"op {op_id} is still {state} after {timeout_s:g} s of waiting; it goes on "
            f"(follow it with `ktrdr-run ops logs -f {op_id}`, stop it with `ktrdr-run ops cancel {op_id}`)"
        )


class NoDispatcher(ClientError):
    """An op is queued and no dispatcher answers: nothing would ever run it."""

    def __init__(self, op_id: str, waited_s: float) -> None:
        self.op_id = op_id
        super().__init__(
            f"op {op_id} is queued but no dispatcher has answered for {waited_s:.0f} s: start one with "
            "`ktrdr-run dispatcher` (the job stays queued until one runs it), or use "
            "Client(local=True) to run ops in this process"
        )


class RequeueRefused(ClientError):
    """A dispatcher refused to requeue an op; ``error_type`` says why in one word
    (OpCompleted, OpNotEnded, OpNotFound, NeverAdmitted, PartOfSweep, HasChildren,
    Conflict, InvalidRequest)."""

    def __init__(self, op_id: str, error_type: str, message: str) -> None:
        self.op_id = op_id
        self.error_type = error_type
        super().__init__(message)


class RequestUnanswered(ClientError):
    """A request to the dispatchers got no answer: none runs, or none answered in time."""

    def __init__(self, what: str, *, timed_out_s: float | None = None) -> None:
        if timed_out_s is None:
            detail = (
                "no dispatcher is running to take it: start one with `ktrdr-run dispatcher` "
                "and try again (nothing was changed)"
            )
        else:
            detail = (
                f"no dispatcher answered within {timed_out_s:g} s; it may still have been done: "
                "check with `ktrdr-run ops show` before trying again"
            )
        super().__init__(f"{what}: {detail}")
