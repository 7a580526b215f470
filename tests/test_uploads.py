"""Artifact uploads through the dispatcher's upload service: real nats-server, no Docker.

The runner's client (runner.upload) against UploadService (dispatcher.uploads), and the
wire protocol driven by hand where a well-behaved client would never go.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore

from dispatcher.config import Config
from dispatcher.connection import connect
from dispatcher.jetstream import JetStreamHandles
from dispatcher.uploads import UploadService
from runner.protocol import ARTIFACTS_BUCKET, encode
from runner.sdk import artifact_name
from runner.upload import (
    OFFSET_HEADER,
    UPLOADS_SUBJECT_ROOT,
    ChunkReply,
    UploadError,
    UploadOpen,
    UploadReply,
    chunk_reply_decoder,
    open_subject,
    reply_decoder,
    upload_artifact,
)

pytestmark = [pytest.mark.nats]

OP = "op-uploads-1"
CHUNK = 1000
TYPE = "application/x-test"

StartService = Callable[..., Awaitable[UploadService]]


@pytest.fixture
async def nc(config: Config, js_handles: JetStreamHandles) -> AsyncIterator[NATS]:
    """A runner's connection (the buckets exist: js_handles made them)."""
    client = await connect(config.nats.url, name="test-runner")
    yield client
    await client.close()


@pytest.fixture
async def start_service(config: Config, js_handles: JetStreamHandles) -> AsyncIterator[StartService]:
    """Starts UploadServices, each on its own NATS connection; stops them afterwards."""
    started: list[tuple[UploadService, NATS]] = []

    async def start(**options: Any) -> UploadService:
        service_nc = await connect(config.nats.url, name=f"test-uploads-{len(started)}")
        store = await service_nc.jetstream().object_store(ARTIFACTS_BUCKET)
        options.setdefault("chunk_size", CHUNK)
        service = UploadService(service_nc, store, **options)
        await service.start()
        await service_nc.flush()
        started.append((service, service_nc))
        return service

    yield start
    for service, service_nc in started:
        await service.stop()
        await service_nc.close()


@pytest.fixture
def store(js_handles: JetStreamHandles) -> ObjectStore:
    return js_handles.artifacts


async def chunk_messages(nc: NATS) -> list[Msg]:
    """Every chunk sent from now on (a spy subscription beside the services)."""
    seen: list[Msg] = []

    async def spy(msg: Msg) -> None:
        seen.append(msg)

    await nc.subscribe(f"{UPLOADS_SUBJECT_ROOT}.*.*.*", cb=spy)
    await nc.flush()
    return seen


async def open_upload(nc: NATS, op_id: str, data: bytes, *, object_name: str = "") -> UploadReply:
    request = UploadOpen(object_name=object_name or artifact_name(data), size=len(data), content_type=TYPE)
    msg = await nc.request(open_subject(op_id), encode(request), timeout=5)
    return reply_decoder.decode(msg.data)


async def send_chunk(nc: NATS, subject: str, offset: int, data: bytes) -> ChunkReply:
    msg = await nc.request(subject, data, timeout=5, headers={OFFSET_HEADER: str(offset)})
    return chunk_reply_decoder.decode(msg.data)


async def assert_not_stored(store: ObjectStore, object_name: str) -> None:
    with pytest.raises(NotFoundError):
        await store.get_info(object_name)


async def test_round_trip_of_a_multi_chunk_artifact(
    start_service: StartService, nc: NATS, store: ObjectStore, caplog: pytest.LogCaptureFixture
) -> None:
    service = await start_service()
    chunks = await chunk_messages(nc)
    data = os.urandom(3 * CHUNK + CHUNK // 2)
    with caplog.at_level(logging.INFO, logger="ktrdr.uploads"):
        await upload_artifact(nc, OP, artifact_name(data), data, TYPE, name="model.pt", timeout_s=10)

    stored = await store.get(artifact_name(data))
    assert stored.data == data
    assert stored.info.description == TYPE
    assert len(chunks) == 4
    offsets = [m.headers.get(OFFSET_HEADER) if m.headers else None for m in chunks]
    assert offsets == ["0", "1000", "2000", "3000"]
    assert all(m.subject.split(".")[2:4] == [OP, service.token] for m in chunks)
    assert (service.open_uploads, service.buffered_bytes) == (0, 0)
    [line] = [r.getMessage() for r in caplog.records if "stored artifact" in r.getMessage()]
    assert OP in line and artifact_name(data) in line and f"{len(data)} bytes" in line


async def test_an_empty_artifact_is_stored(start_service: StartService, nc: NATS, store: ObjectStore) -> None:
    await start_service()
    await upload_artifact(nc, OP, artifact_name(b""), b"", TYPE, timeout_s=10)
    info = await store.get_info(artifact_name(b""))
    assert (info.size, info.description) == (0, TYPE)


async def test_an_existing_object_is_not_sent_again(
    start_service: StartService, nc: NATS, store: ObjectStore
) -> None:
    await start_service()
    data = os.urandom(2500)
    await upload_artifact(nc, OP, artifact_name(data), data, TYPE, timeout_s=10)
    chunks = await chunk_messages(nc)

    reply = await open_upload(nc, OP, data)
    assert reply.ok and reply.exists and not reply.chunk_subject
    await upload_artifact(nc, OP, artifact_name(data), data, TYPE, timeout_s=10)
    assert chunks == []


async def test_content_that_does_not_hash_to_its_name_is_refused(
    start_service: StartService, nc: NATS, store: ObjectStore
) -> None:
    service = await start_service()
    claimed = artifact_name(b"the genuine model weights")
    mismatch = r"refused: .*content hashes to sha256-[0-9a-f]{64}, not " + claimed
    with pytest.raises(UploadError, match=mismatch):
        await upload_artifact(nc, OP, claimed, b"something else entirely!!", TYPE, timeout_s=10)
    await assert_not_stored(store, claimed)
    assert service.buffered_bytes == 0


async def test_an_upload_over_the_size_limit_is_refused_naming_the_limit(
    start_service: StartService, nc: NATS, store: ObjectStore
) -> None:
    await start_service(max_bytes=2000)
    data = os.urandom(2001)
    with pytest.raises(UploadError, match=r"refused: .*2001 bytes; uploads are limited to 2000 bytes"):
        await upload_artifact(nc, OP, artifact_name(data), data, TYPE, timeout_s=10)
    await assert_not_stored(store, artifact_name(data))


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (b"not json at all", "malformed upload request"),
        (b'{"object_name": "sha256-00", "size": "big"}', "malformed upload request"),
        (b'{"size": 1}', "malformed upload request"),
        (encode(UploadOpen(object_name="model.pt", size=1)), "is not sha256-<64 hex digits>"),
        (encode(UploadOpen(object_name=artifact_name(b"x"), size=-1)), "is negative"),
    ],
)
async def test_a_malformed_open_gets_an_error_and_the_service_goes_on(
    start_service: StartService, nc: NATS, store: ObjectStore, payload: bytes, problem: str
) -> None:
    await start_service()
    msg = await nc.request(open_subject(OP), payload, timeout=5)
    reply = reply_decoder.decode(msg.data)
    assert not reply.ok and not reply.busy and problem in reply.error

    data = os.urandom(1500)
    await upload_artifact(nc, OP, artifact_name(data), data, TYPE, timeout_s=10)
    assert (await store.get(artifact_name(data))).data == data


async def test_chunks_that_do_not_fit_are_refused(start_service: StartService, nc: NATS) -> None:
    service = await start_service()
    data = os.urandom(1500)
    opened = await open_upload(nc, OP, data)
    assert opened.ok and opened.chunk_subject.startswith(f"{UPLOADS_SUBJECT_ROOT}.{OP}.{service.token}.")

    unknown = await send_chunk(nc, f"{UPLOADS_SUBJECT_ROOT}.{OP}.{service.token}.nosuchid", 0, data)
    assert not unknown.ok and unknown.unknown and "no upload nosuchid" in unknown.error

    # the op id in the subject is the one the upload was opened for, whatever anyone says
    _root, _uploads, _op, token, upload_id = opened.chunk_subject.split(".")
    other_op = await send_chunk(nc, f"{UPLOADS_SUBJECT_ROOT}.op-other.{token}.{upload_id}", 0, data[:1000])
    assert not other_op.ok and "not opened for op op-other" in other_op.error

    no_offset = await nc.request(opened.chunk_subject, data[:1000], timeout=5)
    assert f"no integer {OFFSET_HEADER}" in chunk_reply_decoder.decode(no_offset.data).error

    skipped = await send_chunk(nc, opened.chunk_subject, 1000, data[1000:])
    assert not skipped.ok and "expected offset 0" in skipped.error

    first = await send_chunk(nc, opened.chunk_subject, 0, data[:1000])
    assert first.ok and first.received == 1000
    resent = await send_chunk(nc, opened.chunk_subject, 0, data[:1000])  # its reply was lost
    assert resent.ok and resent.received == 1000

    too_long = await send_chunk(nc, opened.chunk_subject, 1000, data[1000:] + b"extra")
    assert not too_long.ok and "beyond the size 1500" in too_long.error
    assert (service.open_uploads, service.buffered_bytes) == (0, 0)


async def test_a_resent_last_chunk_is_answered_again(
    start_service: StartService, nc: NATS, store: ObjectStore
) -> None:
    service = await start_service()
    data = os.urandom(1200)
    opened = await open_upload(nc, OP, data)
    assert (await send_chunk(nc, opened.chunk_subject, 0, data[:1000])).ok
    last = await send_chunk(nc, opened.chunk_subject, 1000, data[1000:])
    again = await send_chunk(nc, opened.chunk_subject, 1000, data[1000:])  # the first reply was lost
    assert last == again == ChunkReply(ok=True, received=1200, stored=True)
    assert (await store.get(artifact_name(data))).data == data
    beyond = await send_chunk(nc, opened.chunk_subject, 0, data[:1000])
    assert not beyond.ok and "has every byte already" in beyond.error
    assert (service.open_uploads, service.buffered_bytes) == (0, 0)


class Signal(logging.Handler):
    """Sets ``event`` when a record containing ``text`` is logged."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


async def test_an_abandoned_upload_is_dropped(start_service: StartService, nc: NATS) -> None:
    logger = logging.getLogger("ktrdr.uploads.test-abandoned")
    logger.setLevel(logging.INFO)
    dropped = Signal("dropped the upload")
    logger.addHandler(dropped)
    try:
        service = await start_service(idle_timeout_s=0.3, logger=logger)
        data = os.urandom(2500)
        opened = await open_upload(nc, OP, data)
        assert (await send_chunk(nc, opened.chunk_subject, 0, data[:1000])).ok
        assert (service.open_uploads, service.buffered_bytes) == (1, 2500)
        await asyncio.wait_for(dropped.event.wait(), timeout=5)
    finally:
        logger.removeHandler(dropped)
    assert (service.open_uploads, service.buffered_bytes) == (0, 0)
    late = await send_chunk(nc, opened.chunk_subject, 1000, data[1000:2000])
    assert not late.ok and late.unknown


class StallsOnce:
    """A runner's connection that stalls before its first chunk (a frozen runner)."""

    def __init__(self, nc: NATS, stall_s: float) -> None:
        self.nc = nc
        self.stall_s = stall_s
        self.max_payload = nc.max_payload

    async def request(self, subject: str, payload: bytes, **options: Any) -> Msg:
        if options.get("headers") and self.stall_s:
            await asyncio.sleep(self.stall_s)
            self.stall_s = 0
        return await self.nc.request(subject, payload, **options)


async def test_an_upload_the_service_dropped_is_begun_again(
    start_service: StartService, nc: NATS, store: ObjectStore, caplog: pytest.LogCaptureFixture
) -> None:
    service = await start_service(idle_timeout_s=0.1)
    data = os.urandom(2500)
    stalling = cast(NATS, StallsOnce(nc, stall_s=0.6))
    with caplog.at_level(logging.INFO, logger="ktrdr.uploads"):
        await upload_artifact(stalling, OP, artifact_name(data), data, TYPE, timeout_s=10)
    assert [r for r in caplog.records if "dropped the upload" in r.getMessage()]
    assert (await store.get(artifact_name(data))).data == data
    assert service.buffered_bytes == 0


async def test_two_service_instances_each_keep_their_own_uploads(
    start_service: StartService, nc: NATS, store: ObjectStore
) -> None:
    services = [await start_service(), await start_service()]
    chunks = await chunk_messages(nc)
    tokens_used: set[str] = set()
    for _ in range(40):  # the queue group picks at random: go on until both answered
        data = os.urandom(2500)
        await upload_artifact(nc, OP, artifact_name(data), data, TYPE, timeout_s=10)
        assert (await store.get(artifact_name(data))).data == data
        tokens_used |= {m.subject.split(".")[3] for m in chunks}
        if len(tokens_used) == 2:
            break
    assert tokens_used == {s.token for s in services}
    # all chunks of one upload go to the instance that opened it
    by_upload: dict[str, set[str]] = {}
    for m in chunks:
        by_upload.setdefault(m.subject.split(".")[4], set()).add(m.subject.split(".")[3])
    assert all(len(tokens) == 1 for tokens in by_upload.values())


async def test_an_op_that_is_not_running_may_not_upload(
    start_service: StartService, nc: NATS, store: ObjectStore
) -> None:
    async def may_upload(op_id: str) -> bool:
        return op_id == OP

    await start_service(may_upload=may_upload)
    data = os.urandom(100)
    with pytest.raises(UploadError, match="refused: op op-finished is not running"):
        await upload_artifact(nc, "op-finished", artifact_name(data), data, TYPE, timeout_s=10)
    await assert_not_stored(store, artifact_name(data))
    await upload_artifact(nc, OP, artifact_name(data), data, TYPE, timeout_s=10)
    assert (await store.get(artifact_name(data))).data == data


async def test_a_busy_service_is_tried_again_until_the_deadline(
    start_service: StartService, nc: NATS
) -> None:
    service = await start_service(max_uploads=1)
    held = os.urandom(500)
    assert (await open_upload(nc, OP, held)).ok
    data = os.urandom(100)
    with pytest.raises(UploadError, match="refused: 1 uploads are open, the limit"):
        await upload_artifact(nc, OP, artifact_name(data), data, TYPE, timeout_s=1)
    assert service.open_uploads == 1


async def test_the_client_says_when_no_dispatcher_answers(nc: NATS) -> None:
    data = b"nobody listens"
    started = asyncio.get_running_loop().time()
    with pytest.raises(UploadError, match=r"no dispatcher answered uploads within 1s"):
        await upload_artifact(nc, OP, artifact_name(data), data, TYPE, name="trades.csv", timeout_s=1)
    assert asyncio.get_running_loop().time() - started < 3
