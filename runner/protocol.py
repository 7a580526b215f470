"""The wire contract of ktrdr-run: every subject, stream, bucket and message struct.

Everyone imports this module: the runner inside the container, the dispatcher, the CLI
and the dashboard. Systems not written in Python read the JSON Schema that
``ktrdr-run schema`` prints from it.

Subjects::

    ktrdr.jobs.<kind>            job messages (stream KTRDR_JOBS, work queue,
                                 de-duplicated by the Nats-Msg-Id header = job_id)
    ktrdr.ops.<op_id>.<event>    events of one op (stream KTRDR_EVENTS, replayable):
                                 status, progress, log, result, error, cancel_ack,
                                 heartbeat, and the cancel request itself (cancel)
    ktrdr.rejected.<kind>        error events for job messages that carry no usable job_id
    ktrdr.dispatchers.ping       core request/reply: every live dispatcher answers

Rules: new fields always get defaults; decoders of events and records ignore unknown
fields so older readers keep working; the job message forbids unknown fields so a typo
in a hand-written job ("timeout" for "timeout_s") is an error, not a silent default.
"""

from __future__ import annotations

import hashlib
import re
import time
import typing
import uuid
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta, Struct

# --- names -----------------------------------------------------------------------------

JOBS_STREAM: Final = "KTRDR_JOBS"
EVENTS_STREAM: Final = "KTRDR_EVENTS"
DEAD_LETTER_STREAM: Final = "KTRDR_DEAD"
OPS_BUCKET: Final = "ktrdr_ops"
HOSTS_BUCKET: Final = "ktrdr_hosts"
RESERVATIONS_BUCKET: Final = "ktrdr_reservations"
ARTIFACTS_BUCKET: Final = "ktrdr_artifacts"
DISPATCHERS_BUCKET: Final = "ktrdr_dispatchers"
DISPATCHER_CONSUMER: Final = "ktrdr-dispatcher"

JOBS_SUBJECT_ROOT: Final = "ktrdr.jobs"
OPS_SUBJECT_ROOT: Final = "ktrdr.ops"
REJECTED_SUBJECT_ROOT: Final = "ktrdr.rejected"
DEAD_LETTER_SUBJECT_ROOT: Final = "ktrdr.dead"
DISPATCHER_PING_SUBJECT: Final = "ktrdr.dispatchers.ping"
#: Operator requests to the dispatchers (request/reply, not stored): ``.<submitter>`` when
#: a named credential sends one, as for jobs.
REQUEUE_SUBJECT: Final = "ktrdr.ctl.requeue"

EVENT_KINDS: Final = (
    "status",
    "progress",
    "log",
    "result",
    "error",
    "cancel_ack",
    "heartbeat",
    "trial",
    "cancel",
)

# Container labels a restarted dispatcher uses to find its containers.
LABEL_OP_ID: Final = "ktrdr.op_id"
LABEL_KIND: Final = "ktrdr.kind"
LABEL_DISPATCHER: Final = "ktrdr.dispatcher"
LABEL_ATTEMPT: Final = "ktrdr.attempt"
# Which ktrdr-run deployment (JetStream domain) a container belongs to: dispatchers reap
# only their own deployment's containers on an engine several deployments share.
LABEL_CLUSTER: Final = "ktrdr.cluster"
# A warm pool container (value: its shape). It carries LABEL_OP_ID with an empty value
# (so the dispatcher's exit watcher sees it); once assigned it is renamed to
# container_name(op, attempt), which is how an op's pool container is found again.
LABEL_POOL: Final = "ktrdr.pool"

# The runner's exit code when it could not reach NATS within its ready deadline.
EXIT_RUNNER_UNREACHABLE: Final = 69
# A warm runner's exit code when its standard input closed before any op arrived (its
# dispatcher went away): the op it may have been meant for never started.
EXIT_NOT_ASSIGNED: Final = 75
# What a warm runner prints (on standard error) once its imports are done.
POOL_READY_LINE: Final = "ktrdr-runner: warm, waiting for an op"

# Environment variable that carries the RunnerSpec into the container.
SPEC_ENV: Final = "KTRDR_SPEC"

# "(?!\n)$": Python's "$" also matches before a trailing newline (no subject token, no key)
_ID_BODY: Final = r"[A-Za-z0-9][A-Za-z0-9_-]{0,79}"
ID_PATTERN: Final = rf"^{_ID_BODY}(?!\n)$"
KIND_PATTERN: Final = r"^[a-z][a-z0-9_]{0,39}(?!\n)$"
_ID_RE = re.compile(ID_PATTERN)


#: A submitter's name as it appears in a job subject (one subject token).
SUBMITTER_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"


def job_subject(kind: str, submitter: str = "") -> str:
    """The subject a job of ``kind`` is published to; with ``submitter``, the subject a
    named submitter's credential allows (``ktrdr.jobs.<kind>.<name>``): its name there
    is who submitted it, whatever the message says."""
    return f"{JOBS_SUBJECT_ROOT}.{kind}.{submitter}" if submitter else f"{JOBS_SUBJECT_ROOT}.{kind}"


def parse_job_subject(subject: str) -> tuple[str, str]:
    """``(kind, submitter)`` of a job subject (submitter "" when it names none)."""
    kind, _, submitter = subject[len(JOBS_SUBJECT_ROOT) + 1 :].partition(".")
    return kind, submitter


def op_subject(op_id: str, event: str) -> str:
    """The subject of one event kind of one op."""
    return f"{OPS_SUBJECT_ROOT}.{op_id}.{event}"


def container_name(op_id: str, attempt: int) -> str:
    """The name of the container that runs attempt ``attempt`` of op ``op_id``."""
    return f"ktrdr-{op_id}-a{attempt}"


_CONTAINER_NAME = re.compile(rf"^/?ktrdr-({_ID_BODY})-a([0-9]{{1,3}})$")


def op_of_container(name: str, labels: dict[str, str]) -> tuple[str, str]:
    """``(op id, attempt)`` a container runs, from its labels or, for a warm pool
    container (whose labels were set before it had an op), from its name; ``("", "")``
    for a pool container not assigned yet."""
    if labels.get(LABEL_OP_ID):
        return labels[LABEL_OP_ID], labels.get(LABEL_ATTEMPT, "")
    match = _CONTAINER_NAME.match(name)
    return (match.group(1), match.group(2)) if match and LABEL_POOL in labels else ("", "")


def runner_inbox(op_id: str) -> str:
    """The inbox prefix of one op's runner: its replies arrive under it, and its
    credentials let it hear nothing else."""
    return f"_INBOX_{op_id}"


def op_events_filter(op_id: str) -> str:
    """A subject filter matching every event of one op."""
    return f"{OPS_SUBJECT_ROOT}.{op_id}.>"


def rejected_subject(kind: str) -> str:
    """Where error events go for jobs whose job_id is unusable (kind may be 'unknown')."""
    token = kind if re.fullmatch(KIND_PATTERN, kind or "") else "unknown"
    return f"{REJECTED_SUBJECT_ROOT}.{token}"


def is_valid_id(value: str) -> bool:
    """Whether ``value`` is usable as a job id / op id (a subject token and a KV key)."""
    return bool(_ID_RE.fullmatch(value))


def new_job_id() -> str:
    """A fresh job id that sorts by submission time (UTC): ``20261202-024755-1a2b3c4d``."""
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


def now() -> float:
    """Wall-clock time as Unix seconds; every timestamp on the wire uses it."""
    return time.time()


# --- job message -----------------------------------------------------------------------

GpuPolicy = Literal["required", "preferred", "never"]


HostName = Annotated[str, Meta(min_length=1, max_length=253)]
LabelKey = Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}$")]
LabelValue = Annotated[str, Meta(max_length=253)]


class Resources(Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """What an op asks of its host. A field left out (None) takes the kind's default;
    in an op record every field is resolved."""

    cpus: Annotated[float, Meta(gt=0, le=512)] | None = None
    memory_gb: Annotated[float, Meta(gt=0, le=4096)] | None = None
    gpus: Annotated[int, Meta(ge=0, le=64)] | None = None
    gpu: GpuPolicy | None = None
    #: Placement constraints: only GPUs with at least this much memory count (GB).
    gpu_memory_gb: Annotated[float, Meta(gt=0, le=4096)] | None = None
    #: Only these hosts (by name; empty: any).
    hosts: Annotated[tuple[HostName, ...], Meta(max_length=256)] = ()
    #: Only hosts whose labels have every one of these values.
    host_labels: Annotated[dict[LabelKey, LabelValue], Meta(max_length=64)] = {}
    #: Never these hosts.
    avoid_hosts: Annotated[tuple[HostName, ...], Meta(max_length=256)] = ()

    def resolved(self, defaults: Resources) -> Resources:
        """These resources with ``defaults`` filling what is left out (constraints are the
        job's own: a kind has none)."""
        return msgspec.structs.replace(
            self,
            cpus=self.cpus if self.cpus is not None else (defaults.cpus or 1.0),
            memory_gb=self.memory_gb if self.memory_gb is not None else (defaults.memory_gb or 1.0),
            gpus=self.gpus if self.gpus is not None else (defaults.gpus or 0),
            gpu=self.gpu or defaults.gpu or "never",
        )

    @property
    def constrained(self) -> bool:
        """Whether it names any placement constraint."""
        return bool(self.gpu_memory_gb or self.hosts or self.host_labels or self.avoid_hosts)


class Job(Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """A job message, as published to ``ktrdr.jobs.<kind>``.

    ``job_id`` is chosen by the client; it is the idempotency key (also sent as the
    ``Nats-Msg-Id`` header) and becomes the op id. ``data_dir`` is a directory on the
    dispatcher's host, mounted read-only at /data (default: the dispatcher's own).
    """

    job_id: Annotated[str, Meta(pattern=ID_PATTERN)]
    kind: Annotated[str, Meta(pattern=KIND_PATTERN)]
    params: dict[str, Any] = {}
    resources: Resources = Resources()
    # capped: credentials expire after it, and a server refuses an expiry past ~2^63 ns
    timeout_s: Annotated[float, Meta(gt=0, le=1e9)] | None = None
    labels: dict[str, str] = {}
    submitted_by: str = ""
    data_dir: str = ""
    #: The op that submitted this one (a sweep's chunk names its sweep); "" = none.
    parent_id: Annotated[str, Meta(pattern=rf"^(|{_ID_BODY})(?!\n)$")] = ""


# --- op record (KV ktrdr_ops, key = op id) ---------------------------------------------

OpState = Literal[
    "queued",
    "placing",
    "starting",
    "running",
    "completed",
    "failed",
    "cancelled",
    "timed_out",
    "lost",
]
TERMINAL_STATES: Final[frozenset[str]] = frozenset({"completed", "failed", "cancelled", "timed_out"})
ACTIVE_STATES: Final[frozenset[str]] = frozenset({"placing", "starting", "running"})
#: The ended states an operator may requeue an op from (``ktrdr-run ops requeue``).
REQUEUABLE_STATES: Final[frozenset[str]] = frozenset({"failed", "cancelled", "timed_out"})
ALL_STATES: Final[tuple[str, ...]] = typing.get_args(OpState)


class ProgressSnapshot(Struct, frozen=True):
    """The last progress an op reported."""

    percent: float = 0.0
    step: str = ""
    message: str = ""
    metrics: dict[str, float] = {}
    ts: float = 0.0


class ErrorInfo(Struct, frozen=True):
    """Why an op failed. ``reason`` is a stable code (invalid_job, op_error, exit_nonzero,
    oom_killed, infrastructure, timeout); ``message`` is for people."""

    reason: str
    message: str
    error_type: str = ""
    field: str = ""
    traceback: str = ""


class EndedAttempt(Struct, frozen=True, kw_only=True):
    """One earlier run of an op that an operator requeued: how it ended, and who asked
    for the run that followed."""

    attempt: int
    state: str
    host: str = ""
    container_id: str = ""
    exit_code: int | None = None
    error: ErrorInfo | None = None
    artifacts: dict[str, str] = {}
    timestamps: dict[str, float] = {}
    requeued_at: float = 0.0
    requeued_by: str = ""
    requeue_reason: str = ""


class CancelIntent(Struct, frozen=True):
    """A durable request to cancel an op."""

    requested_at: float
    reason: str = ""
    requested_by: str = ""
    acked: bool = False
    forced: bool = False
    #: The op stored what it had before it stopped (its artifacts are in the record).
    partial_saved: bool = False


class OpRecord(Struct, kw_only=True):
    """The state of one op, updated only by compare-and-set on the KV revision."""

    op_id: str
    kind: str
    state: OpState = "queued"
    params: dict[str, Any] = {}
    params_digest: str = ""
    resources: Resources = Resources()
    timeout_s: float | None = None
    labels: dict[str, str] = {}
    submitted_by: str = ""
    data_dir: str = ""
    host: str = ""
    container_id: str = ""
    image: str = ""
    dispatcher: str = ""
    attempts: int = 0
    timestamps: dict[str, float] = {}
    progress: ProgressSnapshot | None = None
    result: dict[str, Any] | None = None
    artifacts: dict[str, str] = {}
    error: ErrorInfo | None = None
    exit_code: int | None = None
    log_tail: list[str] = []
    cancel: CancelIntent | None = None
    #: When a requeued op may be placed again (Unix seconds; 0 = at once).
    retry_at: float = 0.0
    #: Event-stream sequence of the last status event of an earlier op that used this id:
    #: cancel requests at or below it belong to that op, not to this one.
    cancel_floor_seq: int = 0
    #: The op that submitted this one (a sweep's chunks name their sweep); "" = none.
    parent_id: str = ""
    #: The ops this one submitted (a sweep's chunks), in submission order.
    children: list[str] = []
    #: Earlier runs of this op, oldest first, each ended and then requeued by an operator
    #: (``ktrdr-run ops requeue``); the record itself is the latest run.
    history: list[EndedAttempt] = []

    @property
    def terminal(self) -> bool:
        """Whether the op has reached its one terminal state."""
        return self.state in TERMINAL_STATES

    @property
    def attempts_before_requeue(self) -> int:
        """The attempts spent before an operator last requeued the op (0 if never): the
        infrastructure retry budget counts only the attempts after them."""
        return self.history[-1].attempt if self.history else 0


# --- events (ktrdr.ops.<op_id>.<event>) ------------------------------------------------


class _Event(Struct, frozen=True, kw_only=True, tag_field="event"):
    op_id: str
    ts: float
    attempt: int = 0  # which attempt of the op sent it (0: not tied to one)


class StatusEvent(_Event, frozen=True, tag="status"):
    """A state transition of the op record, published by the dispatcher."""

    state: OpState
    host: str = ""
    container_id: str = ""
    message: str = ""


class ProgressEvent(_Event, frozen=True, tag="progress"):
    """Progress from the op: percent in [0, 100], a step name, free numeric metrics."""

    percent: float
    step: str = ""
    message: str = ""
    metrics: dict[str, float] = {}


class LogEvent(_Event, frozen=True, tag="log"):
    """One log line from the op (``source`` runner = the SDK, container = stdout/err)."""

    message: str
    level: str = "info"
    source: str = "runner"


class ResultEvent(_Event, frozen=True, tag="result"):
    """The op's result; ``artifacts`` maps an artifact name to its object-store name."""

    result: dict[str, Any]
    artifacts: dict[str, str] = {}


class ErrorEvent(_Event, frozen=True, tag="error"):
    """An op failed or a job was rejected. ``field`` names the offending field, if any."""

    reason: str
    message: str
    error_type: str = ""
    field: str = ""
    traceback: str = ""


class CancelAckEvent(_Event, frozen=True, tag="cancel_ack"):
    """The runner saw the cancel and is exiting. ``partial_saved``: the op stored what it
    had (a training checkpoint), listed in ``artifacts`` like a result's."""

    partial_saved: bool = False
    message: str = ""
    artifacts: dict[str, str] = {}


class HeartbeatEvent(_Event, frozen=True, tag="heartbeat"):
    """The runner is alive."""

    uptime_s: float = 0.0


class TrialEvent(_Event, frozen=True, tag="trial"):
    """One combination of a sweep, finished: published on the sweep's own subject.

    ``metrics`` are the 24 backtest metrics (None when the combination failed, with
    ``error`` saying why); ``child`` is the chunk op that ran it.
    """

    index: int
    params: dict[str, Any]
    metrics: dict[str, Any] | None = None
    error: str | None = None
    child: str = ""


class CancelRequest(_Event, frozen=True, tag="cancel"):
    """A request to cancel an op; anyone may publish it to ``ktrdr.ops.<id>.cancel``."""

    reason: str = ""
    requested_by: str = ""


Event = (
    StatusEvent
    | ProgressEvent
    | LogEvent
    | ResultEvent
    | ErrorEvent
    | CancelAckEvent
    | HeartbeatEvent
    | TrialEvent
    | CancelRequest
)

# --- operator requests (ktrdr.ctl.*, request/reply) ------------------------------------


class RequeueRequest(Struct, frozen=True, forbid_unknown_fields=True):
    """Run an ended (failed, cancelled, timed-out) op again as a new attempt of the same
    op. ``requested_by`` counts only on the open subject: a named credential's subject
    says who it is."""

    op_id: str
    reason: Annotated[str, Meta(max_length=1024)] = ""
    requested_by: Annotated[str, Meta(max_length=256)] = ""


class RequeueReply(Struct, frozen=True, omit_defaults=True):
    """A dispatcher's answer to a :class:`RequeueRequest`: ``requeued`` with the op's
    state after it, or ``error`` (a stable ``error_type`` and words for people)."""

    op_id: str
    requeued: bool
    state: str = ""
    error: str = ""
    error_type: str = ""


def requeue_subject(submitter: str = "") -> str:
    """Where a requeue request goes (with ``submitter``: what a named credential may use)."""
    return f"{REQUEUE_SUBJECT}.{submitter}" if submitter else REQUEUE_SUBJECT


# --- what the dispatcher hands the container -------------------------------------------


class RunnerSpec(Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Everything the runner needs but its credentials, passed as JSON in the KTRDR_SPEC
    environment variable."""

    op_id: str
    kind: str
    params: dict[str, Any] = {}
    nats_url: str = ""
    attempt: int = 1
    heartbeat_s: float = 5.0
    progress_interval_s: float = 0.25
    result_deadline_s: float = 60.0
    host: str = ""
    #: Connect to NATS within this many seconds or exit with EXIT_RUNNER_UNREACHABLE.
    ready_s: float = 15.0
    #: Ignore cancel requests stored at or below this event-stream sequence (an earlier op).
    cancel_after_seq: int = 0
    #: The op's NATS credentials come on standard input (a ``.creds`` text, then EOF),
    #: within ``ready_s``: never in the environment, which ``docker inspect`` shows.
    creds_stdin: bool = False


class DeadLetter(Struct, frozen=True):
    """A job message the dispatcher gave up on, published to ``ktrdr.dead.<kind>``."""

    subject: str
    reason: str
    data: str
    deliveries: int
    ts: float
    job_id: str = ""
    dispatcher: str = ""


def dead_letter_subject(kind: str) -> str:
    """Where a job message of ``kind`` goes when it keeps failing."""
    token = kind if re.fullmatch(KIND_PATTERN, kind or "") else "unknown"
    return f"{DEAD_LETTER_SUBJECT_ROOT}.{token}"


class HostReservation(Struct, frozen=True):
    """What one op holds on one host (KV ``ktrdr_reservations``, one key per host, a map
    op id → reservation, changed only by compare-and-set)."""

    cpus: float
    memory_bytes: int
    gpu_ids: list[str] = []
    dispatcher: str = ""
    ts: float = 0.0
    attempt: int = 0


HostReservations = dict[str, HostReservation]


class DispatcherInfo(Struct, frozen=True, omit_defaults=True):
    """A dispatcher's answer to a ping."""

    dispatcher_id: str
    host: str = ""
    running_ops: int = 0
    started_at: float = 0.0


# --- encoding helpers ------------------------------------------------------------------

_encoder = msgspec.json.Encoder()
event_decoder: Final = msgspec.json.Decoder(Event)
record_decoder: Final = msgspec.json.Decoder(OpRecord)
job_decoder: Final = msgspec.json.Decoder(Job)
spec_decoder: Final = msgspec.json.Decoder(RunnerSpec)


def encode(value: Any) -> bytes:
    """Encode any contract struct (or builtin value) as JSON bytes."""
    return _encoder.encode(value)


def params_digest(params: dict[str, Any]) -> str:
    """A stable sha256 digest of a params mapping (keys sorted)."""
    canonical = msgspec.json.encode(params, order="sorted")
    return "sha256:" + hashlib.sha256(canonical).hexdigest()


def schema() -> dict[str, Any]:
    """The JSON Schema of the job message, the events and the op record."""
    (job, event, record, cancel), components = msgspec.json.schema_components(
        [Job, Event, OpRecord, CancelRequest]
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "ktrdr-run wire contract",
        "subjects": {
            "job": f"{JOBS_SUBJECT_ROOT}.<kind>  (header Nats-Msg-Id: <job_id>)",
            "events": f"{OPS_SUBJECT_ROOT}.<op_id>.<event>  event in {list(EVENT_KINDS)}",
            "cancel": f"{OPS_SUBJECT_ROOT}.<op_id>.cancel",
            "requeue": f"{REQUEUE_SUBJECT}[.<submitter>]  (request/reply: RequeueRequest -> RequeueReply)",
            "rejected": f"{REJECTED_SUBJECT_ROOT}.<kind>",
            "op_records": f"KV bucket {OPS_BUCKET}, key = op_id",
        },
        "job": job,
        "event": event,
        "op_record": record,
        "cancel_request": cancel,
        "$defs": components,
    }
