"""Errors of the runner package: one root, each with a message a user can act on."""

from __future__ import annotations

import re

import msgspec


class KtrdrRunnerError(Exception):
    """Root of every error the runner package raises."""


class InvalidParams(KtrdrRunnerError):
    """A job's params do not fit its kind. ``field`` names the offending field."""

    def __init__(self, kind: str, field: str, problem: str) -> None:
        self.kind = kind
        self.field = field
        self.problem = problem
        where = f"params.{field}" if field else "params"
        super().__init__(f"invalid params for {kind!r}: {where}: {problem}")

    @classmethod
    def from_validation(cls, kind: str, exc: msgspec.ValidationError) -> InvalidParams:
        """Translate msgspec's message ("Expected `int`, got `str` - at `$.x`")."""
        field, problem = describe_validation_error(exc)
        return cls(kind, field, problem)


def describe_validation_error(exc: Exception) -> tuple[str, str]:
    """Split msgspec's "Expected `int`, got `str` - at `$.a.b`" into ("a.b", problem).

    Unknown and missing fields are named in the field path too.
    """
    text = str(exc)
    match = re.search(r" - at `\$\.?(.*)`$", text)
    field = match.group(1) if match else ""
    problem = text[: match.start()] if match else text
    named = re.search(r"`(.+?)`", problem)
    if problem.startswith("Object contains unknown field"):
        field = ".".join(p for p in (field, named.group(1) if named else "") if p)
        problem = "unknown field"
    elif problem.startswith("Object missing required field"):
        field = ".".join(p for p in (field, named.group(1) if named else "") if p)
        problem = "required field is missing"
    return field, problem


class UnknownKind(KtrdrRunnerError):
    """No operation is registered under this kind."""

    def __init__(self, kind: str, known: list[str]) -> None:
        self.kind = kind
        self.known = known
        super().__init__(f"unknown kind {kind!r}; known kinds: {', '.join(known) or 'none'}")


class DataError(KtrdrRunnerError):
    """Input data is missing or unusable; the message names the file and the problem."""


class Cancelled(KtrdrRunnerError):
    """Raised by ``ctx.checkpoint()`` once the op has been asked to cancel."""
