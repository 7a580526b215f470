"""The upload service: stores runners' artifacts in the object store on their behalf.

Runners hold no object-store credentials. They open an upload on ``ktrdr.uploads.<op_id>``
(one dispatcher of the queue group answers) and send its chunks to a subject only that
service instance listens on. The content must hash to its object name (``sha256-<hex>``)
or nothing is stored: a runner cannot put other content under another artifact's name.
The wire structs live in :mod:`runner.upload`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ObjectMeta
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore

from runner.protocol import encode, is_valid_id
from runner.upload import (
    CHUNK_HEADER_ROOM,
    OBJECT_NAME_RE,
    OFFSET_HEADER,
    UPLOADS_QUEUE,
    UPLOADS_SUBJECT_ROOT,
    ChunkReply,
    UploadReply,
    open_decoder,
)

GiB = 1 << 30
_WARN_WINDOW_S = 10.0
_WARN_BURST = 10  # refusal warnings per window; the rest are counted, not logged
_MAX_TEXT = 256  # longest content type or logical name accepted
_CHECK_TIMEOUT_S = 5.0  # may_upload and the object-store lookup
_STORE_TIMEOUT_S = 300.0


@dataclasses.dataclass(slots=True, eq=False)
class _Upload:
    """One upload in progress (or finished, kept to answer a resent last chunk)."""

    op_id: str
    object_name: str
    name: str
    size: int
    content_type: str
    buffer: bytearray = dataclasses.field(default_factory=bytearray)
    hasher: Any = dataclasses.field(default_factory=hashlib.sha256)
    touched: float = dataclasses.field(default_factory=time.monotonic)
    result: asyncio.Task[ChunkReply] | None = None  # set once every byte arrived


class UploadService:
    """Answers upload requests of runners and stores their artifacts in ``object_store``.

    ``may_upload(op_id)`` (optional) says whether an op may upload now (it is running).
    An upload that sees no chunk for ``idle_timeout_s`` is dropped. At most
    ``max_uploads`` uploads and ``max_buffered_bytes`` declared bytes are held at once;
    beyond, opens are refused as busy (the runner tries again).
    """

    def __init__(
        self,
        nc: NATS,
        object_store: ObjectStore,
        *,
        max_bytes: int = GiB,
        idle_timeout_s: float = 60.0,
        may_upload: Callable[[str], Awaitable[bool]] | None = None,
        logger: logging.Logger | None = None,
        chunk_size: int = 512 * 1024,
        max_uploads: int = 64,
        max_buffered_bytes: int = 2 * GiB,
    ) -> None:
        self._nc = nc
        self._store = object_store
        self._max_bytes = max_bytes
        self._idle_timeout_s = idle_timeout_s
        self._may_upload = may_upload
        self._log = logger or logging.getLogger("ktrdr.uploads")
        self._chunk_size = chunk_size
        self._max_uploads = max_uploads
        self._max_buffered_bytes = max_buffered_bytes
        #: Names this instance in chunk subjects (one subject token).
        self.token = secrets.token_hex(6)
        self._uploads: dict[str, _Upload] = {}
        self._buffered = 0  # declared sizes of the uploads not yet finished
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._warn_window = 0.0
        self._warned = 0
        self._unlogged = 0

    @property
    def open_uploads(self) -> int:
        """Uploads still receiving chunks."""
        return sum(1 for upload in self._uploads.values() if upload.result is None)

    @property
    def buffered_bytes(self) -> int:
        """Bytes reserved by the uploads not yet stored (their declared sizes)."""
        return self._buffered

    async def start(self) -> None:
        """Subscribe to opens (queue group) and to this instance's chunk subjects."""
        root = UPLOADS_SUBJECT_ROOT
        self._subs = [
            await self._nc.subscribe(f"{root}.*", queue=UPLOADS_QUEUE, cb=self._on_open),
            await self._nc.subscribe(f"{root}.*.{self.token}.*", cb=self._on_chunk),
        ]
        with contextlib.suppress(Exception):  # once started, the server knows the interest
            await self._nc.flush(timeout=5)
        self._spawn(self._reap())

    async def stop(self) -> None:
        """Unsubscribe and drop every pending upload (stores in progress are cancelled)."""
        for sub in self._subs:
            with contextlib.suppress(Exception):  # a closed connection has no subscriptions left
                await sub.unsubscribe()
        self._subs = []
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._uploads.clear()
        self._buffered = 0

    async def _on_open(self, msg: Msg) -> None:
        op_id = msg.subject[len(UPLOADS_SUBJECT_ROOT) + 1 :]
        try:
            reply = await self._open(op_id, msg.data)
        except _Refused as refused:
            self._warn("op %s: upload refused: %s", op_id, refused)
            reply = UploadReply(ok=False, error=str(refused), busy=refused.busy)
        except Exception as exc:  # noqa: BLE001 - a callback must never raise
            self._log.exception("upload open on %s failed", msg.subject)
            reply = UploadReply(ok=False, error=f"the upload service failed: {exc!r}")
        await self._respond(msg, reply)

    async def _open(self, op_id: str, payload: bytes) -> UploadReply:
        if not is_valid_id(op_id):
            raise _Refused(f"{op_id[:80]!r} is not a valid op id")
        try:
            req = open_decoder.decode(payload)
        except msgspec.DecodeError as exc:
            raise _Refused(f"malformed upload request: {exc}") from None
        label = f"artifact {req.name or req.object_name} of op {op_id}"
        if not OBJECT_NAME_RE.fullmatch(req.object_name):
            raise _Refused(f"object name {req.object_name[:80]!r} is not sha256-<64 hex digits>")
        if req.size < 0:
            raise _Refused(f"{label}: size {req.size} is negative")
        if req.size > self._max_bytes:
            raise _Refused(f"{label} is {req.size} bytes; uploads are limited to {_human(self._max_bytes)}")
        if len(req.content_type) > _MAX_TEXT or len(req.name) > _MAX_TEXT:
            raise _Refused(f"{label}: content type and name are limited to {_MAX_TEXT} characters")
        if self._may_upload is not None:
            try:
                allowed = await asyncio.wait_for(self._may_upload(op_id), _CHECK_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - an unanswered check is a transient refusal
                raise _Refused(f"could not check that op {op_id} is running: {exc!r}", busy=True) from None
            if not allowed:
                raise _Refused(f"op {op_id} is not running")
        try:
            await asyncio.wait_for(self._store.get_info(req.object_name), _CHECK_TIMEOUT_S)
            return UploadReply(ok=True, exists=True)
        except NotFoundError:
            pass
        except Exception as exc:  # noqa: BLE001 - store outages are transient
            raise _Refused(f"the artifact store did not answer: {exc!r}", busy=True) from None
        if self.open_uploads >= self._max_uploads:
            raise _Refused(f"{self._max_uploads} uploads are open, the limit; try again", busy=True)
        if self._buffered + req.size > self._max_buffered_bytes:
            limit = _human(self._max_buffered_bytes)
            raise _Refused(f"uploads would buffer over {limit}, the limit; try again", busy=True)
        upload_id = secrets.token_hex(8)
        self._uploads[upload_id] = _Upload(
            op_id, req.object_name, req.name or req.object_name, req.size, req.content_type
        )
        self._buffered += req.size
        return UploadReply(
            ok=True,
            chunk_subject=f"{UPLOADS_SUBJECT_ROOT}.{op_id}.{self.token}.{upload_id}",
            chunk_size=max(1, min(self._chunk_size, self._nc.max_payload - CHUNK_HEADER_ROOM)),
        )

    async def _on_chunk(self, msg: Msg) -> None:
        op_id, _token, upload_id = msg.subject[len(UPLOADS_SUBJECT_ROOT) + 1 :].split(".")
        try:
            reply = self._chunk(op_id, upload_id, msg)
        except _Refused as refused:
            self._warn("op %s: upload chunk refused: %s", op_id, refused)
            reply = ChunkReply(ok=False, error=str(refused), unknown=refused.unknown)
        except Exception as exc:  # noqa: BLE001 - a callback must never raise
            self._log.exception("upload chunk on %s failed", msg.subject)
            reply = ChunkReply(ok=False, error=f"the upload service failed: {exc!r}")
        if reply is not None:
            await self._respond(msg, reply)

    def _chunk(self, op_id: str, upload_id: str, msg: Msg) -> ChunkReply | None:
        """The reply to a chunk; None when a task sends it (the last chunk)."""
        upload = self._uploads.get(upload_id)
        if upload is None:
            raise _Refused(
                f"no upload {upload_id} here (finished, dropped after {self._idle_timeout_s:g}s "
                "without a chunk, or the dispatcher restarted)",
                unknown=True,
            )
        if upload.op_id != op_id:
            raise _Refused(f"upload {upload_id} was not opened for op {op_id}")
        try:
            offset = int((msg.headers or {})[OFFSET_HEADER])
        except (KeyError, ValueError):
            raise _Refused(f"chunk has no integer {OFFSET_HEADER} header") from None
        data, received = msg.data, len(upload.buffer)
        upload.touched = time.monotonic()
        if upload.result is not None:
            if offset + len(data) != upload.size:
                raise _Refused(f"upload {upload_id} has every byte already")
            self._spawn(self._reply_when_done(msg, upload.result))  # last chunk resent: reply lost
            return None
        if offset < received and offset + len(data) == received:  # resent: its reply was lost
            return ChunkReply(ok=True, received=received)
        if offset != received:
            raise _Refused(f"chunk at offset {offset}, expected offset {received}")
        if received + len(data) > upload.size:
            self._drop(upload_id)
            raise _Refused(f"chunk ends at byte {received + len(data)}, beyond the size {upload.size}")
        upload.buffer += data
        upload.hasher.update(data)
        if len(upload.buffer) < upload.size:
            return ChunkReply(ok=True, received=len(upload.buffer))
        upload.result = self._spawn(self._finish(upload))
        self._spawn(self._reply_when_done(msg, upload.result))
        return None

    async def _finish(self, upload: _Upload) -> ChunkReply:
        """Verify the hash and store: the last chunk's reply."""
        data, upload.buffer = bytes(upload.buffer), bytearray()
        what = f"op {upload.op_id}: {upload.name} as {upload.object_name}"
        try:
            digest = "sha256-" + upload.hasher.hexdigest()
            if digest != upload.object_name:
                self._warn("%s refused: content hashes to %s", what, digest)
                error = f"{upload.name}: content hashes to {digest}, not {upload.object_name}; nothing stored"
                return ChunkReply(ok=False, error=error)
            meta = ObjectMeta(name=upload.object_name, description=upload.content_type)
            await asyncio.wait_for(self._store.put(upload.object_name, data, meta), _STORE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - the runner is told, the service goes on
            self._log.warning("%s: storing failed: %r", what, exc)
            return ChunkReply(ok=False, error=f"storing {upload.name} failed: {exc!r}")
        finally:
            self._buffered -= upload.size
            upload.touched = time.monotonic()
        self._log.info("%s: stored artifact (%d bytes)", what, len(data))
        return ChunkReply(ok=True, received=len(data), stored=True)

    async def _reply_when_done(self, msg: Msg, result: asyncio.Task[ChunkReply]) -> None:
        try:
            reply = await asyncio.shield(result)
        except Exception as exc:  # noqa: BLE001 - _finish answers its own failures; this is a bug
            reply = ChunkReply(ok=False, error=f"the upload service failed: {exc!r}")
        await self._respond(msg, reply)

    async def _reap(self) -> None:
        """Drop uploads idle for idle_timeout_s (and finished ones kept that long)."""
        while True:
            await asyncio.sleep(min(max(self._idle_timeout_s / 4, 0.01), 5.0))
            now = time.monotonic()
            for upload_id, upload in list(self._uploads.items()):
                if now - upload.touched < self._idle_timeout_s:
                    continue
                if upload.result is None:
                    came = f"{len(upload.buffer)} of {upload.size} bytes came"
                    idle = f"{self._idle_timeout_s:g}s without a chunk"
                    self._log.info(
                        "op %s: dropped the upload of %s after %s (%s)", upload.op_id, upload.name, idle, came
                    )
                    self._drop(upload_id)
                elif upload.result.done():
                    del self._uploads[upload_id]

    def _drop(self, upload_id: str) -> None:
        upload = self._uploads.pop(upload_id, None)
        if upload is not None and upload.result is None:
            self._buffered -= upload.size
            upload.buffer = bytearray()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _respond(self, msg: Msg, reply: UploadReply | ChunkReply) -> None:
        if not msg.reply:
            return
        try:  # not msg.respond: that would echo the request's headers
            await self._nc.publish(msg.reply, encode(reply))
        except Exception as exc:  # noqa: BLE001 - the requester times out and resends
            self._log.debug("could not answer %s: %r", msg.subject, exc)

    def _warn(self, fmt: str, *args: object) -> None:
        """At most _WARN_BURST warnings per _WARN_WINDOW_S: a looping runner cannot flood."""
        now = time.monotonic()
        if now - self._warn_window >= _WARN_WINDOW_S:
            if self._unlogged:
                self._log.warning("%d more upload refusals were not logged", self._unlogged)
            self._warn_window, self._warned, self._unlogged = now, 0, 0
        self._warned += 1
        if self._warned <= _WARN_BURST:
            self._log.warning(fmt, *args)
        else:
            self._unlogged += 1


class _Refused(Exception):
    """The reason becomes the reply's error; ``busy``: try again; ``unknown``: open again."""

    def __init__(self, reason: str, *, busy: bool = False, unknown: bool = False) -> None:
        super().__init__(reason)
        self.busy = busy
        self.unknown = unknown


def _human(size: int) -> str:
    """``size`` bytes as people read it: 1 GiB, 512 KiB, 1000 bytes."""
    for unit, scale in (("GiB", GiB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"
