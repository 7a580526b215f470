"""Connecting to NATS and setting up JetStream: idempotent, safe from several processes.

Streams and buckets are bound first and created only when missing; a stream whose
config drifted is updated, and the dispatcher's durable consumer is created-or-updated
with ``add_consumer`` so a stale consumer config is never silently kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any
from urllib.parse import urlparse

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from dispatcher.config import Config
from dispatcher.errors import NatsUnavailable
from runner.protocol import (
    ARTIFACTS_BUCKET,
    DEAD_LETTER_STREAM,
    DEAD_LETTER_SUBJECT_ROOT,
    DISPATCHER_CONSUMER,
    EVENTS_STREAM,
    HOSTS_BUCKET,
    JOBS_STREAM,
    JOBS_SUBJECT_ROOT,
    OPS_BUCKET,
    OPS_SUBJECT_ROOT,
    REJECTED_SUBJECT_ROOT,
    RESERVATIONS_BUCKET,
)

log = logging.getLogger("ktrdr.jetstream")


async def connect(url: str, *, name: str, connect_timeout_s: float = 2.0, retry: bool = True) -> NATS:
    """Connect to NATS. With ``retry=False`` one attempt only (used to probe for a server)."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats %s: %s", name, exc)

    options: dict[str, Any] = {
        "name": name,
        "connect_timeout": connect_timeout_s,
        "error_cb": on_error,
    }
    if retry:
        options.update(max_reconnect_attempts=-1, reconnect_time_wait=0.5)
    else:
        options.update(allow_reconnect=False, max_reconnect_attempts=0)
        await _check_listening(url, connect_timeout_s)
    try:
        return await asyncio.wait_for(nats.connect(url, **options), timeout=connect_timeout_s * 3)
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        raise NatsUnavailable(f"no NATS server answers at {url}: {exc or type(exc).__name__}") from None


async def _check_listening(url: str, timeout_s: float) -> None:
    """Fail at once when nothing listens at ``url`` (nats.connect would retry for seconds)."""
    parsed = urlparse(url if "://" in url else f"nats://{url}")
    try:
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parsed.hostname or "127.0.0.1", parsed.port or 4222), timeout_s
        )
    except (OSError, TimeoutError) as exc:
        raise NatsUnavailable(f"no NATS server answers at {url}: {exc or type(exc).__name__}") from None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def _stream_configs(config: Config) -> list[api.StreamConfig]:
    nats_cfg = config.nats
    return [
        api.StreamConfig(
            name=JOBS_STREAM,
            subjects=[f"{JOBS_SUBJECT_ROOT}.>"],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            duplicate_window=nats_cfg.dedupe_window_s,
            discard=api.DiscardPolicy.OLD,
        ),
        api.StreamConfig(
            name=EVENTS_STREAM,
            subjects=[f"{OPS_SUBJECT_ROOT}.>", f"{REJECTED_SUBJECT_ROOT}.>"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_age=config.retention.events_s,
            allow_direct=True,
        ),
        api.StreamConfig(
            name=DEAD_LETTER_STREAM,
            subjects=[f"{DEAD_LETTER_SUBJECT_ROOT}.>"],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            max_age=config.retention.dead_letter_s,
        ),
    ]


_COMPARED_FIELDS = ("subjects", "retention", "storage", "duplicate_window", "max_age", "discard")


async def _ensure_stream(js: JetStreamContext, wanted: api.StreamConfig) -> None:
    for _ in range(3):
        try:
            info = await js.stream_info(wanted.name)  # type: ignore[arg-type]
        except NotFoundError:
            try:
                await js.add_stream(wanted)
                log.info("created stream %s", wanted.name)
                return
            except BadRequestError:
                continue  # another process created it meanwhile: bind and compare
        current = info.config
        drift = [
            f
            for f in _COMPARED_FIELDS
            if getattr(wanted, f) is not None and getattr(current, f) != getattr(wanted, f)
        ]
        if drift:
            await js.update_stream(wanted)
            log.info("updated stream %s (%s changed)", wanted.name, ", ".join(drift))
        return
    raise NatsUnavailable(f"could not create or bind stream {wanted.name}")


async def _ensure_kv(js: JetStreamContext, bucket: str, history: int, ttl_s: float | None) -> KeyValue:
    try:
        kv = await js.key_value(bucket)
        stream = f"KV_{bucket}"
        current = (await js.stream_info(stream)).config
        if current.max_msgs_per_subject != history:
            await js.update_stream(_replace_config(current, max_msgs_per_subject=history))
            log.info("updated KV %s history to %d", bucket, history)
        return kv
    except BucketNotFoundError:
        try:
            return await js.create_key_value(
                api.KeyValueConfig(bucket=bucket, history=history, ttl=ttl_s, storage=api.StorageType.FILE)
            )
        except BadRequestError:
            return await js.key_value(bucket)


async def _ensure_object_store(js: JetStreamContext, bucket: str, ttl_s: float) -> ObjectStore:
    try:
        store = await js.object_store(bucket)
        current = (await js.stream_info(f"OBJ_{bucket}")).config
        if current.max_age != ttl_s:
            await js.update_stream(_replace_config(current, max_age=ttl_s))
            log.info("updated object store %s retention to %gs", bucket, ttl_s)
        return store
    except (BucketNotFoundError, NotFoundError):
        try:
            return await js.create_object_store(
                bucket, config=api.ObjectStoreConfig(bucket=bucket, ttl=ttl_s, storage=api.StorageType.FILE)
            )
        except BadRequestError:
            return await js.object_store(bucket)


def _replace_config(config: api.StreamConfig, **changes: Any) -> api.StreamConfig:
    """A copy of a stream config with ``changes`` applied."""
    return dataclasses.replace(config, **changes)


def dispatcher_consumer_config(config: Config) -> api.ConsumerConfig:
    """The one durable pull consumer all dispatchers share on the job stream."""
    return api.ConsumerConfig(
        durable_name=DISPATCHER_CONSUMER,
        filter_subject=f"{JOBS_SUBJECT_ROOT}.>",
        ack_policy=api.AckPolicy.EXPLICIT,
        deliver_policy=api.DeliverPolicy.ALL,
        ack_wait=config.dispatcher.ack_wait_s,
        max_deliver=-1,
        max_ack_pending=10_000,
    )


class JetStreamHandles:
    """The bound streams and buckets, ready to use."""

    def __init__(
        self,
        js: JetStreamContext,
        ops: KeyValue,
        hosts: KeyValue,
        reservations: KeyValue,
        artifacts: ObjectStore,
    ):
        self.js = js
        self.ops = ops
        self.hosts = hosts
        self.reservations = reservations
        self.artifacts = artifacts


async def ensure_jetstream(nc: NATS, config: Config, *, with_consumer: bool = False) -> JetStreamHandles:
    """Bind (creating where missing) every stream and bucket of the contract."""
    js = nc.jetstream()
    try:
        for stream in _stream_configs(config):
            await _ensure_stream(js, stream)
        # history 1: when a finished record's TTL runs out, no older revision resurfaces
        ops = await _ensure_kv(js, OPS_BUCKET, history=1, ttl_s=None)
        hosts = await _ensure_kv(js, HOSTS_BUCKET, history=1, ttl_s=None)
        reservations = await _ensure_kv(js, RESERVATIONS_BUCKET, history=1, ttl_s=None)
        artifacts = await _ensure_object_store(js, ARTIFACTS_BUCKET, config.retention.artifacts_s)
        if with_consumer:
            await js.add_consumer(JOBS_STREAM, dispatcher_consumer_config(config))
    except nats.js.errors.ServiceUnavailableError as exc:
        raise NatsUnavailable(
            f"the NATS server at {nc.connected_url.netloc if nc.connected_url else '?'} has no JetStream "
            f"enabled ({exc}); start it with -js"
        ) from None
    return JetStreamHandles(js, ops, hosts, reservations, artifacts)
