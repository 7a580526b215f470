"""Admission of a job message: decode, validate against its kind, check where its data
is, resolve its resources. A job that can never run is :class:`Rejected` with the field
and the problem; nothing here touches Docker."""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import msgspec

from dispatcher.config import Config
from dispatcher.engine import RUNNER_USER
from runner import registry
from runner.errors import DataError, InvalidParams, UnknownKind, describe_validation_error
from runner.protocol import SUBMITTER_PATTERN, Job, Resources, is_valid_id, job_decoder, parse_job_subject


class Rejected(Exception):  # control flow inside the dispatcher, not an error name
    """A job message that can never run."""

    def __init__(
        self, message: str, *, field: str = "", error_type: str = "InvalidJob", job: Job | None = None
    ) -> None:
        super().__init__(message)
        self.field = field
        self.error_type = error_type
        #: The decoded job, when the message decoded at all.
        self.job = job


def resolve_resources(job: Job, op: registry.Operation) -> Resources:
    """The job's resources, with the kind's defaults for what it left out."""
    return job.resources.resolved(
        msgspec.structs.replace(op.default_resources, gpu=op.default_resources.gpu or op.gpu)
    )


@dataclass(frozen=True, slots=True)
class Admitted:
    """A job that passed admission: the job, its kind's operation, and the host data
    directory it mounts ("" = none), resolved once."""

    job: Job
    op: registry.Operation
    data_dir: str
    #: The artifacts the op will read, by params field (``params.strategy_params.model``).
    reads: dict[str, str]


def validate_job(subject: str, data: bytes, config: Config, *, own_job: bool = False) -> Admitted:
    """Decode and validate a job message against its kind (and, where the dispatcher can
    see them, the op's input data); Rejected says what is wrong and where.

    ``own_job``: the job was published by this same command (a one-shot dispatcher), so
    the data directory its user named needs no allowed root.

    Blocking (a preflight may read a data file): run it off the event loop."""
    subject_kind, submitter = parse_job_subject(subject)
    try:
        job = job_decoder.decode(data)
    except msgspec.ValidationError as exc:
        where, problem = describe_validation_error(exc)
        raise Rejected(f"invalid job: {where or 'message'}: {problem}", field=where) from None
    except msgspec.DecodeError as exc:
        raise Rejected(f"job message is not valid JSON: {exc}", error_type="NotJSON") from None
    except RecursionError:
        raise Rejected("job message is nested too deeply", error_type="NotJSON") from None
    if job.kind != subject_kind:
        raise Rejected(f"kind {job.kind!r} does not match the subject {subject!r}", field="kind", job=job)
    if submitter:
        # the subject's name is the one the server let this publisher use
        if not re.fullmatch(SUBMITTER_PATTERN, submitter):
            raise Rejected(f"subject {subject!r}: submitter name is not one token", field="subject", job=job)
        job = msgspec.structs.replace(job, submitted_by=submitter)
    try:
        op = registry.get(job.kind)
        params = op.parse_params(job.params)
    except UnknownKind as exc:
        raise Rejected(str(exc), field="kind", error_type="UnknownKind", job=job) from None
    except InvalidParams as exc:
        where = f"params.{exc.field}" if exc.field else "params"
        raise Rejected(str(exc), field=where, error_type="InvalidParams", job=job) from None
    try:
        data_dir = resolve_data_dir(job, config, own_job=own_job)
    except Rejected as exc:
        exc.job = job
        raise
    if op.preflight is not None:
        try:
            op.preflight(params, Path(data_dir) if data_dir else None)
        except DataError as exc:
            raise Rejected(str(exc), field="data", error_type="DataError", job=job) from None
        except InvalidParams as exc:
            where = f"params.{exc.field}" if exc.field else "params"
            raise Rejected(str(exc), field=where, error_type="InvalidParams", job=job) from None
    reads = {f"params.{field}": name for field, name in (op.reads(params) if op.reads else {}).items()}
    return Admitted(job, op, data_dir, reads)


def data_roots(config: Config) -> list[Path]:
    """The directories a job's ``data_dir`` must lie under: ``[dispatcher] data_roots``, or
    by default the dispatcher's own ``data_dir`` alone (none when neither is set)."""
    raw = config.dispatcher.data_roots or ([config.dispatcher.data_dir] if config.dispatcher.data_dir else [])
    return [Path(r).expanduser().resolve() for r in raw]


def default_data_dir(config: Config) -> str:
    """The data directory a job that names none mounts, resolved as its op's would be
    ("" = none, or when it would be refused)."""
    try:
        return resolve_data_dir(Job(job_id="default", kind="probe"), config)
    except Rejected:
        return ""


def resolve_data_dir(job: Job, config: Config, *, own_job: bool = False) -> str:
    """The host directory to mount read-only at /data for this job ("" = none).

    The confinement comes first, on the path with its links resolved: a directory outside
    the allowed roots is refused without saying whether it exists or what it holds.
    """
    raw = job.data_dir or config.dispatcher.data_dir
    if not raw:
        return ""
    if "\x00" in raw:
        raise Rejected("data_dir must not contain a NUL byte", field="data_dir")
    path = Path(raw)
    with contextlib.suppress(RuntimeError):  # ~name of a user this host does not know: as written
        path = path.expanduser()
    if not path.is_absolute():
        raise Rejected("data_dir must be an absolute path on the dispatcher's host", field="data_dir")
    try:
        path = path.resolve()
    except (RuntimeError, OSError):  # a link loop: judged as written (it is no directory either)
        path = Path(os.path.normpath(path))
    if job.data_dir and not own_job:
        roots = data_roots(config)
        if not roots:
            raise Rejected(
                "data_dir: this dispatcher allows no job data directories; its operator sets "
                "[dispatcher] data_dir (the default root) or data_roots",
                field="data_dir",
            )
        if not any(path == root or root in path.parents for root in roots):
            raise Rejected(
                f"data_dir is outside the allowed data roots ({', '.join(map(str, roots))})", field="data_dir"
            )
    if not path.is_dir():
        raise Rejected(f"data_dir {raw!r} is not a directory on the dispatcher's host", field="data_dir")
    if path.stat().st_mode & (stat.S_IROTH | stat.S_IXOTH) != (stat.S_IROTH | stat.S_IXOTH):
        raise Rejected(
            f"data_dir {raw!r} is not readable by the container user {RUNNER_USER} "
            f"(mode {stat.filemode(path.stat().st_mode)}); run: chmod o+rx {path}",
            field="data_dir",
        )
    return str(path)


def peek_ids(subject: str, raw: bytes) -> tuple[str, str]:
    """Best-effort job_id and kind from a message that failed validation."""
    kind, _ = parse_job_subject(subject)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # not JSON, or nested too deeply to read
        return "", kind
    if not isinstance(data, dict):
        return "", kind
    job_id = data.get("job_id")
    return (job_id if isinstance(job_id, str) and is_valid_id(job_id) else ""), kind
