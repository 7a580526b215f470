"""Setting up JetStream: idempotent, safe from several processes.

Only the service configures JetStream. ``ktrdr-run dispatcher`` and ``ktrdr-run setup``
call :func:`ensure_jetstream` in mode "apply": they create what is missing and update
every stream, bucket and the dispatchers' durable consumer whose settings differ from
their config. Commands that submit work use "create" (a fresh server has nothing yet, so
they may create, but never change what exists); every other command uses "bind" and only
looks up. In every mode the differences found are reported in ``handles.drift``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext, api
from nats.js.errors import APIError, BadRequestError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from dispatcher.config import Config
from dispatcher.errors import JetStreamSetupError, NatsUnavailable
from runner.protocol import (
    ARTIFACTS_BUCKET,
    DEAD_LETTER_STREAM,
    DEAD_LETTER_SUBJECT_ROOT,
    DISPATCHER_CONSUMER,
    DISPATCHERS_BUCKET,
    EVENTS_STREAM,
    HOSTS_BUCKET,
    JOBS_STREAM,
    JOBS_SUBJECT_ROOT,
    OPS_BUCKET,
    OPS_SUBJECT_ROOT,
    REJECTED_SUBJECT_ROOT,
    RESERVATIONS_BUCKET,
)
from runner.transport import redact_url

log = logging.getLogger("ktrdr.jetstream")

SetupMode = Literal["bind", "create", "apply"]


# The server cannot place a stream on that many servers: "no suitable peers for
# placement", "insufficient resources", "replicas > 1 not supported in non-clustered mode".
_NO_PLACEMENT = frozenset({10005, 10023, 10074})
_STREAM_NAME_IN_USE = 10058
_TEMPORARILY_UNAVAILABLE = 10008  # "JetStream system temporarily unavailable": no meta leader
#: How long setting up JetStream waits for a cluster to elect its leaders.
ELECTION_WAIT_S = 20.0
CLUSTER_REPLICAS = 3


def server_cluster(nc: NATS) -> str:
    """The name of the cluster the connected server belongs to ("" = a single server)."""
    info = getattr(nc, "_server_info", None) or {}  # nats-py keeps the server's INFO private
    return str(info.get("cluster") or "") if info.get("jetstream") else ""


def wanted_replicas(nc: NATS, config: Config) -> int:
    """How many replicas streams, buckets and the object store get: ``[nats] replicas``,
    or with 0 (auto) 3 when the connected server is part of a cluster, else 1 (a cluster
    with fewer than 3 JetStream servers is found out when it refuses to place 3)."""
    if config.nats.replicas:
        return config.nats.replicas
    return CLUSTER_REPLICAS if server_cluster(nc) else 1


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


SETUP_HINT = "start `ktrdr-run dispatcher` or run `ktrdr-run setup`"

_STREAM_NOUNS = {JOBS_STREAM: "jobs", EVENTS_STREAM: "events", DEAD_LETTER_STREAM: "dead-lettered jobs"}
# Stream settings that come from the config: (stream, field) -> the TOML key.
_STREAM_SETTINGS = {
    (JOBS_STREAM, "duplicate_window"): "[nats] dedupe_window_s",
    (EVENTS_STREAM, "max_age"): "[retention] events_s",
    (DEAD_LETTER_STREAM, "max_age"): "[retention] dead_letter_s",
}


def _duration(seconds: Any) -> str:
    """``1209600.0`` -> ``14d``; 0 / None -> ``forever``."""
    if not seconds:
        return "forever"
    value = float(seconds)
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if value >= 120 and value % size == 0:  # under 2 minutes: in seconds
            return f"{int(value // size)}{unit}"
    return f"{value:g}s"


def _plain(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def _same(current: Any, wanted: Any) -> bool:
    if isinstance(wanted, float):  # durations: the server keeps nanoseconds
        return round(float(current or 0) * 1e9) == round(wanted * 1e9)
    if isinstance(wanted, list):
        return sorted(current or []) == sorted(wanted)
    return bool(current == wanted)


@dataclasses.dataclass(frozen=True)
class _Want:
    """One setting ktrdr-run sets on a stream or consumer, and how to say it differs."""

    field: str  # the api.StreamConfig / api.ConsumerConfig attribute
    value: Any
    says: str  # "keeps events for {}"
    fmt: Callable[[Any], str] = _plain
    setting: str = ""  # the config key it comes from; "" when ktrdr-run itself fixes it

    def drift(self, label: str, current: Any) -> str:
        source = (
            f"this config says {self.fmt(self.value)} ({self.setting})"
            if self.setting
            else (f"ktrdr-run expects {self.fmt(self.value)}")
        )
        return f"{label} {self.says.format(self.fmt(current))} on the server; {source}"

    def change(self, label: str, current: Any) -> str:
        where = f" ({self.setting})" if self.setting else ""
        return f"{label} now {self.says.format(self.fmt(self.value))}, was {self.fmt(current)}{where}"


def _stream_wants(wanted: api.StreamConfig) -> list[_Want]:
    assert wanted.name is not None
    noun = _STREAM_NOUNS.get(wanted.name, "messages")
    says = {
        "subjects": ("has subjects {}", _plain),
        "retention": ("has retention {}", _plain),
        "storage": ("has storage {}", _plain),
        "duplicate_window": ("de-duplicates job ids over {}", _duration),
        "max_age": (f"keeps {noun} for {{}}", _duration),
        "discard": ("has discard policy {}", _plain),
        "allow_direct": ("has direct get {}", _plain),
    }
    return [
        _Want(field, getattr(wanted, field), text, fmt, _STREAM_SETTINGS.get((wanted.name, field), ""))
        for field, (text, fmt) in says.items()
        if getattr(wanted, field) not in (None, 0)  # unset: the server picks (duplicate_window 0 = 2m)
    ]


def _kv_wants(history: int, msg_ttl: bool) -> list[_Want]:
    wants = [_Want("max_msgs_per_subject", history, "keeps {} revision(s) per key")]
    if msg_ttl:
        wants.append(_Want("allow_msg_ttl", True, "has per-message TTLs {}"))
    return wants


def _consumer_wants(wanted: api.ConsumerConfig) -> list[_Want]:
    def times(value: Any) -> str:
        return "unlimited" if value is None or value < 0 else str(value)

    return [
        _Want("filter_subject", wanted.filter_subject, "takes jobs from {}"),
        _Want("ack_policy", wanted.ack_policy, "has ack policy {}"),
        _Want("deliver_policy", wanted.deliver_policy, "has deliver policy {}"),
        _Want("ack_wait", wanted.ack_wait, "waits {} for an ack", _duration, "[dispatcher] ack_wait_s"),
        _Want("max_deliver", wanted.max_deliver, "delivers a job at most {} times", times),
        _Want("max_ack_pending", wanted.max_ack_pending, "allows {} unacknowledged jobs", times),
    ]


def _replace_config(config: Any, **changes: Any) -> Any:
    """A copy of a stream (or consumer) config with ``changes`` applied."""
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
    """The bound streams and buckets, ready to use, and what setting them up found.

    ``drift``: one line per setting whose value on the server differs from the config
    (in "apply" mode: the value it had before it was updated). ``created`` / ``updated``:
    what this call created or changed (always empty in "bind" mode). ``replicas``: how
    many replicas this call wanted for each stream, bucket and the object store.
    """

    def __init__(
        self,
        js: JetStreamContext,
        ops: KeyValue,
        hosts: KeyValue,
        reservations: KeyValue,
        artifacts: ObjectStore,
        dispatchers: KeyValue,
        *,
        drift: list[str] | None = None,
        created: list[str] | None = None,
        updated: list[str] | None = None,
        replicas: int = 1,
    ):
        self.js = js
        self.ops = ops
        self.hosts = hosts
        self.reservations = reservations
        self.artifacts = artifacts
        self.dispatchers = dispatchers
        self.drift: list[str] = drift or []
        self.created: list[str] = created or []
        self.updated: list[str] = updated or []
        self.replicas = replicas


def _server_url(nc: NATS) -> str:
    """Where ``nc`` is connected, without credentials."""
    url = nc.connected_url
    if url is None:
        return "?"
    return f"{url.scheme or 'nats'}://{url.hostname}:{url.port or 4222}"


class _CannotPlace(Exception):
    """The cluster refused a change for lack of servers to place the replicas on."""

    def __init__(self, error: APIError) -> None:
        super().__init__(str(error))
        self.error = error


class _Setup:
    """One pass over the contract in one mode, collecting drift, creations and updates."""

    def __init__(self, js: JetStreamContext, mode: SetupMode, *, replicas: int, auto: bool) -> None:
        self.js = js
        self.mode = mode
        #: Replicas wanted; with ``auto`` it drops to 1 when the cluster cannot place more.
        self.replicas = replicas
        self.auto = auto
        self.drift: list[str] = []
        self.created: list[str] = []
        self.updated: list[str] = []
        self.missing: list[str] = []

    def _replicas_want(self) -> _Want:
        setting = "[nats] replicas" if not self.auto else "[nats] replicas = 0: 3 on a cluster"
        return _Want("num_replicas", self.replicas, "has {} replica(s)", setting=setting)

    def _cannot_place(self, label: str, exc: APIError) -> None:
        """The cluster refused to place ``label`` on ``self.replicas`` servers: in auto mode
        it has fewer than 3 JetStream servers, so everything gets 1; otherwise say so."""
        said = exc.description or str(exc)
        if not self.auto or self.replicas == 1:
            raise JetStreamSetupError(
                f"the NATS cluster cannot place {label} on {self.replicas} servers ({said}): "
                f"[nats] replicas = {self.replicas} needs that many JetStream servers up"
            ) from None
        log.warning(
            "the NATS cluster cannot place %s on %d servers (%s): fewer than %d JetStream servers; "
            "streams, buckets and the object store get 1 replica",
            label,
            self.replicas,
            said,
            CLUSTER_REPLICAS,
        )
        self.replicas = 1

    async def stream(
        self, label: str, stream: str, wants: list[_Want], create: Callable[[int], Awaitable[object]]
    ) -> bool:
        """Bind ``stream`` (creating it where the mode allows, with ``self.replicas``
        replicas); False when it is missing."""
        for _ in range(4):
            try:
                info = await self.js.stream_info(stream)
            except NotFoundError:
                if self.mode == "bind":
                    self.missing.append(label)
                    return False
                try:
                    await create(self.replicas)
                except APIError as exc:
                    if exc.err_code in _NO_PLACEMENT:
                        self._cannot_place(label, exc)
                        continue  # again, with fewer replicas
                    if isinstance(exc, BadRequestError) and exc.err_code in (None, _STREAM_NAME_IN_USE):
                        continue  # another process created it meanwhile: bind and compare
                    if isinstance(exc, nats.js.errors.ServiceUnavailableError):
                        raise
                    raise JetStreamSetupError(
                        f"the NATS server refuses to create {label}: {exc.description or exc}"
                    ) from None
                self.created.append(label)
                log.info("created %s (%d replica(s))", label, self.replicas)
                return True
            current = info.config
            every = [*wants, self._replicas_want()]
            diffs = [
                (w, getattr(current, w.field)) for w in every if not _same(getattr(current, w.field), w.value)
            ]
            if diffs and self.mode == "apply":
                changes = {w.field: w.value for w, _ in diffs}
                max_age = changes.get("max_age")
                if max_age and "duplicate_window" not in changes and current.duplicate_window:
                    # the server refuses a duplicate window longer than the max age
                    changes["duplicate_window"] = min(current.duplicate_window, max_age)
                try:
                    await self._apply(
                        label, diffs, self.js.update_stream(_replace_config(current, **changes))
                    )
                except _CannotPlace as cannot:
                    self._cannot_place(label, cannot.error)
                    continue  # compare again, now wanting 1 replica
            self.drift.extend(w.drift(label, value) for w, value in diffs)
            return True
        raise NatsUnavailable(f"could not create or bind {label}")

    async def consumer(self, wanted: api.ConsumerConfig) -> None:
        """Compare the dispatchers' durable consumer; create (and in "apply" update) it."""
        assert wanted.durable_name is not None
        label = f"consumer {wanted.durable_name}"
        try:
            current: api.ConsumerConfig | None = (
                await self.js.consumer_info(JOBS_STREAM, wanted.durable_name)
            ).config
        except NotFoundError:
            current = None
        if current is None:
            if self.mode != "bind":  # dispatchers create it when they start; nobody else needs it
                await self.js.add_consumer(JOBS_STREAM, wanted)
                self.created.append(label)
            return
        diffs = [(w, getattr(current, w.field)) for w in _consumer_wants(wanted)]
        diffs = [(w, value) for w, value in diffs if not _same(value, w.value)]
        self.drift.extend(w.drift(label, value) for w, value in diffs)
        if diffs and self.mode == "apply":
            await self._apply(label, diffs, self.js.add_consumer(JOBS_STREAM, wanted))

    async def _apply(self, label: str, diffs: list[tuple[_Want, Any]], change: Awaitable[Any]) -> None:
        """Make the change that brings ``label`` to the config, and record what changed."""
        try:
            await change
        except APIError as exc:
            if exc.err_code in _NO_PLACEMENT:
                raise _CannotPlace(exc) from None
            raise JetStreamSetupError(
                f"the NATS server refuses to change {label}: {exc.description or exc}"
            ) from None
        self.updated.extend(w.change(label, value) for w, value in diffs)
        log.info("updated %s", label)


async def ensure_jetstream(nc: NATS, config: Config, *, mode: SetupMode = "bind") -> JetStreamHandles:
    """Bind every stream, bucket and the object store of the contract; what else happens
    depends on ``mode``:

    - ``"bind"``: only look up; change nothing. Anything missing raises
      JetStreamSetupError saying how to set it up. For read-only commands.
    - ``"create"``: create what is missing (a fresh server has nothing), never change what
      exists. For commands that submit work.
    - ``"apply"``: create what is missing and update every setting that differs from
      ``config``, including the dispatchers' durable consumer. Only for the service
      (``ktrdr-run dispatcher``) and ``ktrdr-run setup``.

    Settings that differ from ``config`` are listed in ``handles.drift`` in every mode.
    Replicas (:func:`wanted_replicas`) are one of them: "apply" raises an R1 stream to R3
    once the server is part of a cluster.
    """
    js = nc.jetstream()
    setup = _Setup(js, mode, replicas=wanted_replicas(nc, config), auto=not config.nats.replicas)
    deadline = asyncio.get_running_loop().time() + ELECTION_WAIT_S
    while True:
        setup.drift, setup.missing = [], []  # what was created or updated so far stays said
        try:
            handles = await _set_up(nc, js, config, setup)
            break
        except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
            js_enabled = bool((getattr(nc, "_server_info", None) or {}).get("jetstream"))
            electing = js_enabled and getattr(exc, "err_code", None) in (None, _TEMPORARILY_UNAVAILABLE)
            if electing and asyncio.get_running_loop().time() < deadline:
                # a cluster electing a (meta or stream) leader answers nothing, or "temporarily
                # unavailable", for a few seconds: every step is idempotent, so go again
                log.info("JetStream at %s not answering (%s); retrying", _server_url(nc), exc)
                await asyncio.sleep(0.5)
                continue
            if electing or isinstance(exc, nats.errors.TimeoutError):
                raise NatsUnavailable(
                    f"JetStream at {_server_url(nc)} did not answer within {ELECTION_WAIT_S:g}s ({exc}): "
                    "on a cluster, is a majority of its servers up?"
                ) from None
            raise NatsUnavailable(
                f"the NATS server at {_server_url(nc)} has no JetStream enabled ({exc}); start it with -js"
            ) from None
    for line in setup.drift:
        log.debug("drift: %s", line)
    return handles


async def _set_up(nc: NATS, js: JetStreamContext, config: Config, setup: _Setup) -> JetStreamHandles:
    """One pass of :func:`ensure_jetstream` over every stream, bucket and the object store."""

    async def add_stream(wanted: api.StreamConfig, replicas: int) -> object:
        return await js.add_stream(dataclasses.replace(wanted, num_replicas=replicas))

    for wanted in _stream_configs(config):
        assert wanted.name is not None
        await setup.stream(
            f"stream {wanted.name}",
            wanted.name,
            _stream_wants(wanted),
            functools.partial(add_stream, wanted),
        )
    # history 1: when a finished record's TTL runs out, no older revision resurfaces;
    # per-message TTLs: finished op records, and dispatchers' presence entries
    buckets = [
        (OPS_BUCKET, True),
        (HOSTS_BUCKET, False),
        (RESERVATIONS_BUCKET, False),
        (DISPATCHERS_BUCKET, True),
    ]

    async def add_bucket(bucket: str, replicas: int) -> object:
        return await js.create_key_value(
            api.KeyValueConfig(bucket=bucket, history=1, storage=api.StorageType.FILE, replicas=replicas)
        )

    for bucket, msg_ttl in buckets:
        await setup.stream(
            f"KV {bucket}", f"KV_{bucket}", _kv_wants(1, msg_ttl), functools.partial(add_bucket, bucket)
        )
    artifacts_s = config.retention.artifacts_s

    async def add_object_store(replicas: int) -> object:
        return await js.create_object_store(
            ARTIFACTS_BUCKET,
            config=api.ObjectStoreConfig(
                bucket=ARTIFACTS_BUCKET, ttl=artifacts_s, storage=api.StorageType.FILE, replicas=replicas
            ),
        )

    await setup.stream(
        f"object store {ARTIFACTS_BUCKET}",
        f"OBJ_{ARTIFACTS_BUCKET}",
        [_Want("max_age", artifacts_s, "keeps artifacts for {}", _duration, "[retention] artifacts_s")],
        add_object_store,
    )
    if setup.missing:
        url = _server_url(nc)
        total = len(_stream_configs(config)) + len(buckets) + 1
        where = redact_url(url)
        if len(setup.missing) == total:
            raise JetStreamSetupError(f"no ktrdr-run streams on the NATS server at {where}: {SETUP_HINT}")
        raise JetStreamSetupError(
            f"the NATS server at {where} lacks ktrdr-run's {', '.join(setup.missing)}: {SETUP_HINT}"
        )
    await setup.consumer(dispatcher_consumer_config(config))
    return JetStreamHandles(
        js,
        ops=await js.key_value(OPS_BUCKET),
        hosts=await js.key_value(HOSTS_BUCKET),
        reservations=await js.key_value(RESERVATIONS_BUCKET),
        artifacts=await js.object_store(ARTIFACTS_BUCKET),
        dispatchers=await js.key_value(DISPATCHERS_BUCKET),
        drift=setup.drift,
        created=setup.created,
        updated=setup.updated,
        replicas=setup.replicas,
    )
