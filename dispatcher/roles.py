"""Who may do what on NATS: the least-privilege permission set of each role.

- ``dispatcher``: everything the service does (its account's whole subject space).
- ``submitter``: publish jobs, cancel requests and requeue requests (under its own
  name), ask whether a dispatcher answers, and read what an observer reads; no KV
  writes, no stream or consumer management beyond the ephemeral consumers that reading
  needs.
- ``observer``: read op records, hosts, dispatchers, events and artifacts; publish
  nothing but its reads.
- ``runner``: one op's container: publish that op's own events (never ``status`` or
  ``cancel``), hear that op's cancel subject and its own inbox, read the event stream's
  last cancel for that op, read artifacts (a model op loads one), and hand its own
  artifacts to the dispatchers' upload service (never the object store itself).

JetStream reads go through its API subjects (``$JS.API.*``): stream info, direct and
message gets, and ephemeral consumers on the streams a role may read. Replies come to an
inbox: ``_INBOX.>`` for people's tools, a per-op inbox prefix for a runner, so one
container cannot read another's replies.
"""

from __future__ import annotations

import re
from typing import Literal

from dispatcher.natsjwt import Permissions
from runner.protocol import (
    ARTIFACTS_BUCKET,
    DEAD_LETTER_STREAM,
    DISPATCHER_CONSUMER,
    DISPATCHER_PING_SUBJECT,
    DISPATCHERS_BUCKET,
    EVENTS_STREAM,
    HOSTS_BUCKET,
    JOBS_STREAM,
    JOBS_SUBJECT_ROOT,
    OPS_BUCKET,
    OPS_SUBJECT_ROOT,
    RESERVATIONS_BUCKET,
    SUBMITTER_PATTERN,
    requeue_subject,
    runner_inbox,
)
from runner.upload import open_subject

Role = Literal["dispatcher", "submitter", "observer", "runner"]
PERSON_ROLES: tuple[Role, ...] = ("submitter", "observer")
#: The events a runner publishes for its own op.
RUNNER_EVENTS = ("progress", "log", "result", "error", "cancel_ack", "heartbeat")
#: The streams a reader may read (the event stream, the KV buckets, the object store).
READABLE_STREAMS = (
    EVENTS_STREAM,
    f"KV_{OPS_BUCKET}",
    f"KV_{HOSTS_BUCKET}",
    f"KV_{DISPATCHERS_BUCKET}",
    f"OBJ_{ARTIFACTS_BUCKET}",
)


def _read_api(streams: tuple[str, ...]) -> tuple[str, ...]:
    subjects = ["$JS.API.INFO", "$JS.API.STREAM.NAMES"]
    for stream in streams:
        subjects += [
            f"$JS.API.STREAM.INFO.{stream}",
            f"$JS.API.STREAM.MSG.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}.>",
            # ephemeral consumers that reading (watch, follow, object get) creates
            f"$JS.API.CONSUMER.CREATE.{stream}",
            f"$JS.API.CONSUMER.CREATE.{stream}.>",
            f"$JS.API.CONSUMER.INFO.{stream}.*",
            f"$JS.API.CONSUMER.DELETE.{stream}.*",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.*",
            f"$JS.ACK.{stream}.>",
            f"$JS.FC.{stream}.>",
        ]
    return tuple(subjects)


#: Every stream of the contract: people's tools look each one up (its configuration and
#: counts, no messages), and the dispatchers' consumer, to check the deployment is set up
#: before they bind.
ALL_STREAMS = (
    *READABLE_STREAMS,
    JOBS_STREAM,
    DEAD_LETTER_STREAM,
    f"KV_{RESERVATIONS_BUCKET}",
)


def _reader(extra_pub: tuple[str, ...] = ()) -> Permissions:
    return Permissions(
        pub_allow=(
            *_read_api(READABLE_STREAMS),
            *(f"$JS.API.STREAM.INFO.{stream}" for stream in ALL_STREAMS if stream not in READABLE_STREAMS),
            f"$JS.API.CONSUMER.INFO.{JOBS_STREAM}.{DISPATCHER_CONSUMER}",
            DISPATCHER_PING_SUBJECT,
            *extra_pub,
        ),
        sub_allow=("_INBOX.>",),
    )


def permissions(role: Role, op_id: str = "", name: str = "") -> Permissions:
    """The permission set of ``role`` (``op_id`` names a runner's op, ``name`` a
    submitter: the one token its jobs' subjects may carry)."""
    if role == "dispatcher":
        return Permissions(pub_allow=(">",), sub_allow=(">",), responses=True)
    if role == "observer":
        return _reader()
    if role == "submitter":
        if not re.fullmatch(SUBMITTER_PATTERN, name):
            raise ValueError(f"a submitter's name is one subject token ({SUBMITTER_PATTERN}), not {name!r}")
        # jobs only under its own name: the dispatcher takes submitted_by from the subject
        return _reader(
            (f"{JOBS_SUBJECT_ROOT}.*.{name}", f"{OPS_SUBJECT_ROOT}.*.cancel", requeue_subject(name))
        )
    if role == "runner":
        if not op_id:
            raise ValueError("a runner's permissions name its op")
        inbox = runner_inbox(op_id)
        return Permissions(
            pub_allow=(
                *(f"{OPS_SUBJECT_ROOT}.{op_id}.{event}" for event in RUNNER_EVENTS),
                # its artifacts, through the dispatchers' upload service (runner/upload.py)
                open_subject(op_id),
                f"{open_subject(op_id)}.>",
                # its own op's last cancel (a direct get by subject), nothing else of the stream
                f"$JS.API.DIRECT.GET.{EVENTS_STREAM}.{OPS_SUBJECT_ROOT}.{op_id}.cancel",
                *_read_api((f"OBJ_{ARTIFACTS_BUCKET}",)),
            ),
            sub_allow=(f"{OPS_SUBJECT_ROOT}.{op_id}.cancel", f"{inbox}.>"),
        )
    raise ValueError(f"unknown role {role!r}")
