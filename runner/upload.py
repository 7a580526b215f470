"""Artifact uploads over core NATS request/reply: the wire structs and the runner's client.

A runner has no write access to the artifact object store; a dispatcher's upload service
(``dispatcher/uploads.py``) stores for it, after checking the content hashes to its name.

Subjects::

    ktrdr.uploads.<op_id>                          open (request: UploadOpen, reply: UploadReply);
                                                   dispatchers answer in queue group "ktrdr-uploads"
    ktrdr.uploads.<op_id>.<token>.<upload_id>      chunks (request: raw bytes, header
                                                   Ktrdr-Offset; reply: ChunkReply), sent to the
                                                   one service instance (token) that opened it

Chunks go one at a time; the reply to the chunk that completes the declared size says
whether the object was stored. A chunk resent after a lost reply is answered again, not
appended twice.
"""

from __future__ import annotations

import asyncio
import re
import time
from typing import Final, TypeVar

import msgspec
import nats.errors
from msgspec import Struct
from nats.aio.client import Client as NATS

from runner.errors import KtrdrRunnerError
from runner.protocol import encode, is_valid_id

UPLOADS_SUBJECT_ROOT: Final = "ktrdr.uploads"
UPLOADS_QUEUE: Final = "ktrdr-uploads"
OFFSET_HEADER: Final = "Ktrdr-Offset"
OBJECT_NAME_PATTERN: Final = r"^sha256-[0-9a-f]{64}$"
OBJECT_NAME_RE: Final = re.compile(OBJECT_NAME_PATTERN)

#: One request waits at most this long before it is sent again (the whole upload has its
#: own deadline): a reply lost in a NATS outage costs one retry, not the upload.
REQUEST_TIMEOUT_S: Final = 5.0
#: How often an upload the dispatcher lost (it restarted, or dropped it as idle) is begun again.
MAX_RESTARTS: Final = 3
CHUNK_HEADER_ROOM: Final = 1024  # bytes of a chunk message left for its subject and headers

_T = TypeVar("_T")


def open_subject(op_id: str) -> str:
    """The subject an upload for ``op_id`` is opened on."""
    return f"{UPLOADS_SUBJECT_ROOT}.{op_id}"


class UploadOpen(Struct, frozen=True):
    """A request to upload one artifact of ``size`` bytes stored as ``object_name``
    (``sha256-<hex digest of the content>``); ``name`` is its logical name, for logs."""

    object_name: str
    size: int
    content_type: str = "application/octet-stream"
    name: str = ""


class UploadReply(Struct, frozen=True, omit_defaults=True):
    """The answer to an :class:`UploadOpen`.

    ``exists``: the object is already stored, send nothing. ``busy``: the refusal is
    transient (the service is at a limit), open again later. Otherwise send chunks of at
    most ``chunk_size`` bytes to ``chunk_subject``.
    """

    ok: bool
    error: str = ""
    exists: bool = False
    busy: bool = False
    chunk_subject: str = ""
    chunk_size: int = 0


class ChunkReply(Struct, frozen=True, omit_defaults=True):
    """The answer to one chunk. ``received``: the bytes the service holds now; ``stored``:
    the last chunk arrived, the content hashed to its name and is stored; ``unknown``: the
    service has no such upload (dropped as idle, or restarted): open it again."""

    ok: bool
    error: str = ""
    received: int = 0
    stored: bool = False
    unknown: bool = False


open_decoder: Final = msgspec.json.Decoder(UploadOpen)
reply_decoder: Final = msgspec.json.Decoder(UploadReply)
chunk_reply_decoder: Final = msgspec.json.Decoder(ChunkReply)


class UploadError(KtrdrRunnerError):
    """An artifact could not be uploaded; the message says why."""


class _Unanswered(Exception):
    """No reply before the upload's deadline."""


class _Lost(Exception):
    """The service instance no longer has the upload: begin it again."""


async def upload_artifact(
    nc: NATS,
    op_id: str,
    object_name: str,
    data: bytes,
    content_type: str,
    *,
    name: str = "",
    timeout_s: float,
) -> None:
    """Upload ``data`` as ``object_name`` through a dispatcher's upload service.

    Returns once it is stored (or was stored already). Requests that time out (a NATS
    outage, a restarting dispatcher) are sent again until ``timeout_s`` has passed.
    Raises :class:`UploadError` when no dispatcher answered in time or one refused.
    """
    label = f"artifact {name or object_name} of op {op_id}"
    if not is_valid_id(op_id):
        raise UploadError(f"cannot upload {label}: {op_id!r} is not a valid op id")
    deadline = time.monotonic() + timeout_s
    request = encode(
        UploadOpen(object_name=object_name, size=len(data), content_type=content_type, name=name)
    )
    try:
        for _ in range(MAX_RESTARTS + 1):
            reply = await _open(nc, op_id, request, deadline, label)
            if reply.exists:
                return
            try:
                await _send_chunks(nc, reply, data, deadline, label)
                return
            except _Lost:
                continue
    except _Unanswered as exc:
        raise UploadError(
            f"uploading {label} ({len(data)} bytes): no dispatcher answered uploads "
            f"within {timeout_s:g}s ({exc})"
        ) from None
    raise UploadError(f"uploading {label}: the dispatcher lost the upload {MAX_RESTARTS + 1} times")


async def _open(nc: NATS, op_id: str, request: bytes, deadline: float, label: str) -> UploadReply:
    delay_s = 0.1
    while True:
        busy = False
        try:
            reply = _decode(reply_decoder, await _request(nc, open_subject(op_id), request, deadline), label)
        except nats.errors.NoRespondersError:
            reason = "no upload service is subscribed"
        else:
            if reply.ok:
                return reply
            if not reply.busy:
                raise UploadError(f"uploading {label}: refused: {reply.error}")
            busy, reason = True, reply.error
        if (remaining_s := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(delay_s, remaining_s))
            delay_s = min(delay_s * 2, 1.0)
        if time.monotonic() >= deadline:
            if busy:
                raise UploadError(f"uploading {label}: refused: {reason}")
            raise _Unanswered(reason)


async def _send_chunks(nc: NATS, opened: UploadReply, data: bytes, deadline: float, label: str) -> None:
    chunk_size = min(opened.chunk_size, nc.max_payload - CHUNK_HEADER_ROOM)
    if chunk_size <= 0 or not opened.chunk_subject:
        raise UploadError(f"uploading {label}: the dispatcher's reply names no chunk subject or size")
    view = memoryview(data)
    offset = 0
    while True:  # at least one chunk, empty for empty content: it completes the upload
        end = min(offset + chunk_size, len(data))
        headers = {OFFSET_HEADER: str(offset)}
        try:
            raw = await _request(nc, opened.chunk_subject, bytes(view[offset:end]), deadline, headers)
        except nats.errors.NoRespondersError:
            raise _Lost from None  # the instance that opened it is gone
        reply = _decode(chunk_reply_decoder, raw, label)
        if reply.unknown:
            raise _Lost
        if not reply.ok:
            raise UploadError(f"uploading {label}: refused: {reply.error}")
        if end >= len(data):
            if not reply.stored:
                raise UploadError(f"uploading {label}: the dispatcher took every byte but stored nothing")
            return
        offset = end


async def _request(
    nc: NATS, subject: str, payload: bytes, deadline: float, headers: dict[str, str] | None = None
) -> bytes:
    """The reply to one request, sent again on timeouts until ``deadline``."""
    last = "no reply"
    while (remaining_s := deadline - time.monotonic()) > 0:
        try:
            msg = await nc.request(
                subject, payload, timeout=min(REQUEST_TIMEOUT_S, remaining_s), headers=headers
            )
            return msg.data
        except nats.errors.NoRespondersError:
            raise
        except nats.errors.ConnectionClosedError:
            raise UploadError("cannot upload: the NATS connection is closed") from None
        except nats.errors.TimeoutError:
            last = "requests timed out"
        except nats.errors.Error as exc:  # reconnecting, outbound buffer full: wait a little
            last = str(exc) or type(exc).__name__
            await asyncio.sleep(min(0.2, max(deadline - time.monotonic(), 0)))
    raise _Unanswered(last)


def _decode(decoder: msgspec.json.Decoder[_T], raw: bytes, label: str) -> _T:
    try:
        return decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise UploadError(f"uploading {label}: malformed reply from the dispatcher: {exc}") from None
