"""A client session: NATS (existing, or embedded for the command's life), JetStream, and
a dispatcher (existing, or in-process for the command's life).

The plumbing under :class:`ktrdr_run.Client` and the CLI; use the Client::

    async with Session(load_config()) as session:
        op_id = await session.submit(job)
        async for event in session.follow(op_id):
            ...
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import logging
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlparse

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.client import Credentials, RawCredentials
from nats.js import api

from dispatcher.authority import Authority
from dispatcher.config import Config
from dispatcher.connection import connect, server_urls
from dispatcher.embedded import EmbeddedNats, embedded_server_name, is_local_url
from dispatcher.errors import ConfigError, NatsUnavailable, OpNotFound
from dispatcher.forwarder import Forwarder
from dispatcher.jetstream import JetStreamHandles, SetupMode, ensure_jetstream
from dispatcher.natsjwt import CredentialError, decode_jwt, read_creds
from dispatcher.opstore import OpStore
from dispatcher.runner_access import RunnerAccess
from ktrdr_run.errors import ClientError, RequestUnanswered, RequeueRefused
from runner.protocol import (
    DISPATCHER_PING_SUBJECT,
    EVENTS_STREAM,
    TERMINAL_STATES,
    CancelRequest,
    DispatcherInfo,
    Event,
    Job,
    OpRecord,
    RequeueReply,
    RequeueRequest,
    StatusEvent,
    encode,
    event_decoder,
    job_subject,
    msgspec,
    now,
    op_events_filter,
    op_subject,
    requeue_subject,
)
from runner.transport import redact_url

log = logging.getLogger("ktrdr.session")

CHANGED_ONLY_BY = "only `ktrdr-run dispatcher` or `ktrdr-run setup` changes it"
#: How long a request to the dispatchers (a requeue) waits for an answer.
REQUEST_TIMEOUT_S = 10.0


def submitter() -> str:
    """Who is submitting: user@host."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


class Session:
    """Connection to ktrdr-run's NATS, with an embedded server / dispatcher when needed."""

    def __init__(
        self,
        config: Config,
        *,
        need_dispatcher: bool = True,
        progress: Callable[[str], None] | None = None,
        setup: SetupMode = "bind",
        embedded: bool = True,
        on_disconnected: Callable[[], Awaitable[None]] | None = None,
        on_reconnected: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self.need_dispatcher = need_dispatcher
        # whether a missing local NATS may be started for this session's life
        self.allow_embedded = embedded
        self._callbacks: dict[str, Any] = {
            "on_disconnected": on_disconnected,
            "on_reconnected": on_reconnected,
        }
        # how JetStream is set up (see ensure_jetstream): only the service applies config
        self.setup: SetupMode = setup
        self._say = progress or (lambda _line: None)
        self._note = progress or (lambda line: print(line, file=sys.stderr, flush=True))
        self.nc: NATS | None = None
        self.handles: JetStreamHandles | None = None
        self.store: OpStore | None = None
        self.embedded: EmbeddedNats | None = None
        self.forwarder: Forwarder | None = None
        #: The deployment's trust chain when this state directory holds it.
        self.authority: Authority | None = None
        #: The name a submitter credential (``[nats] creds``) publishes jobs under.
        self.submitter_name = ""
        self.may_dispatch = True
        self._dispatcher: Any = None
        self._dispatcher_task: asyncio.Task[None] | None = None
        self._fleet: Any = None

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- setup ----------------------------------------------------------------------------

    def _configured_identity(self) -> tuple[str, str]:
        """``(role, name)`` of the configured credentials file (``("", "")`` without one)."""
        if not self.config.nats.creds:
            return "", ""
        try:
            token, _key = read_creds(Path(self.config.nats.creds).expanduser().read_text())
            claims = decode_jwt(token)
        except (OSError, CredentialError) as exc:
            raise ConfigError(f"[nats] creds: {exc}") from None
        tags = claims.get("nats", {}).get("tags") or []
        role = next((tag.removeprefix("role:") for tag in tags if str(tag).startswith("role:")), "")
        return role, str(claims.get("name", ""))

    def _credentials(self) -> Credentials | None:
        """What this session connects with: the configured file, else the deployment's own
        credentials when this state directory holds its authority, else none."""
        cfg = self.config.nats
        if cfg.creds:
            path = Path(cfg.creds).expanduser()
            if not path.is_file():
                raise ConfigError(f"[nats] creds: no credentials file at {path}")
            return str(path)
        if self.authority is not None:
            return RawCredentials(self.authority.mint("dispatcher", "ktrdr-run"))
        return None

    def runner_access(self) -> RunnerAccess:
        """How a dispatcher running on this session gives its containers NATS access."""
        return RunnerAccess(
            authority=self.authority,
            expose=self.forwarder.expose if self.forwarder is not None else None,
        )

    def _embedded_port(self) -> int | None:
        """The port of the embedded server this session is on (its own, or one another
        command of this state directory started), None on any other server."""
        if self.embedded is not None:
            return self.embedded.port
        cfg = self.config.nats
        if not self._may_embed():
            return None
        port = urlparse(cfg.url).port or 4222
        conf = self._embedded_store() / "nats-server.conf"
        try:
            text = conf.read_text()
        except OSError:
            return None
        return port if embedded_server_name(port) in text and f"127.0.0.1:{port}" in text else None

    def _may_embed(self) -> bool:
        """Whether ``[nats] url`` may be an embedded server: one local URL (a list names a
        cluster's nodes, never started here)."""
        cfg = self.config.nats
        return cfg.embedded and len(server_urls(cfg.url)) == 1 and is_local_url(cfg.url)

    def _embedded_store(self) -> Path:
        cfg = self.config.nats
        return Path(cfg.store_dir).expanduser() if cfg.store_dir else self.config.state_path() / "nats"

    async def open(self) -> None:
        """Connect (or start NATS), bind JetStream, and make sure a dispatcher runs."""
        cfg = self.config.nats
        self.authority = Authority.find(self.config.state_path())
        role, name = self._configured_identity()
        # a submitter's credential may publish jobs only under its own name
        self.submitter_name = name if role == "submitter" else ""
        # people's credentials cannot run a dispatcher (no record writes)
        self.may_dispatch = role in ("", "dispatcher")
        try:
            self.nc = await connect(
                cfg.url,
                name="ktrdr-run-cli",
                connect_timeout_s=cfg.connect_timeout_s,
                retry=False,
                credentials=self._credentials(),
                **self._callbacks,
            )
        except NatsUnavailable:
            if not (self.allow_embedded and self._may_embed()):
                raise
            port = urlparse(cfg.url).port or 4222
            store = self._embedded_store()
            self._say(f"no NATS at {redact_url(cfg.url)}: starting an embedded nats-server (store {store})")
            # secure by default: operator mode with this deployment's own trust chain
            self.authority = Authority.load_or_create(self.config.state_path())
            self.embedded = EmbeddedNats(
                store,
                port,
                sync_always=cfg.embedded_sync == "always",
                trust=self.authority.trust_block(),
            )
            await self.embedded.start()
            try:
                self.nc = await connect(
                    self.embedded.url,
                    name="ktrdr-run-cli",
                    connect_timeout_s=cfg.connect_timeout_s,
                    credentials=self._credentials(),
                    **self._callbacks,
                )
            except BaseException:
                await self.close()
                raise
        embedded_port = self._embedded_port()
        # containers reach an embedded server (loopback only) through this process
        self.forwarder = Forwarder(embedded_port) if embedded_port is not None else None
        try:
            await self._bind()
        except BaseException:
            await self.close()  # stop an embedded server this session started
            raise

    async def _bind(self) -> None:
        assert self.nc is not None
        self.handles = await ensure_jetstream(self.nc, self.config, mode=self.setup)
        for line in self.handles.created if self.setup == "apply" else ():
            self._say(f"JetStream: created {line}")
        for line in self.handles.updated:
            self._say(f"JetStream: updated {line}")
        if self.setup != "apply":
            for line in self.handles.drift:
                self._note(f"note: {line} — {CHANGED_ONLY_BY}")
        self.store = OpStore(self.handles.ops, self.handles.js)
        if self.need_dispatcher and not await self.dispatchers():
            if self.may_dispatch:
                await self._start_dispatcher()
            else:
                self._note("note: no dispatcher answers; the op waits in the queue until one starts")

    async def _start_dispatcher(self) -> None:
        from dispatcher.fleet import build_fleet
        from dispatcher.images import ensure_runner_image
        from dispatcher.service import Dispatcher

        assert self.nc is not None and self.handles is not None
        self._fleet, client = await build_fleet(self.config)
        say = self._say

        def image() -> str:
            if client is None:
                raise ConfigError("no local Docker engine to build the runner image on")
            return ensure_runner_image(client, config=self.config.images, progress=say)

        await asyncio.to_thread(image)  # build before the first op, with visible progress
        self._say("no dispatcher answering: running one in this process for this command's own ops")
        self._dispatcher = Dispatcher(
            self.config,
            self.nc,
            self.handles,
            self._fleet,
            image,
            image_source=client,
            own_only=True,
            check_reachability=True,
            runner_access=self.runner_access(),
        )
        self._dispatcher_task = asyncio.create_task(self._dispatcher.run())

    async def close(self) -> None:
        """Stop what this session started; an in-process dispatcher finishes its ops first."""
        if self._dispatcher is not None and self._dispatcher_task is not None:
            self._dispatcher.stop()
            with contextlib.suppress(Exception):
                await self._dispatcher_task
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()
        if self._fleet is not None:
            self._fleet.close()
        if self.forwarder is not None:
            await self.forwarder.close()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)

    # -- operations -----------------------------------------------------------------------

    async def dispatchers(self, timeout_s: float = 0.3) -> list[DispatcherInfo]:
        """Every dispatcher that answers a ping within ``timeout_s``."""
        assert self.nc is not None
        inbox = self.nc.new_inbox()
        answers: list[DispatcherInfo] = []

        async def collect(msg: Any) -> None:
            with contextlib.suppress(msgspec.DecodeError):
                answers.append(msgspec.json.decode(msg.data, type=DispatcherInfo))

        sub = await self.nc.subscribe(inbox, cb=collect)
        await self.nc.publish(DISPATCHER_PING_SUBJECT, b"", reply=inbox)
        await asyncio.sleep(timeout_s)
        await sub.unsubscribe()
        return answers

    async def submit(self, job: Job) -> str:
        """Publish a job (idempotent by job_id); returns the op id. With an in-process
        dispatcher (no service answered) that dispatcher runs this job, and only it."""
        assert self.handles is not None
        if self._dispatcher is not None:  # one-shot: the in-process dispatcher runs just this
            await self._dispatcher.submit_own(job)
            return job.job_id
        ack = await self.handles.js.publish(
            job_subject(job.kind, self.submitter_name), encode(job), headers={"Nats-Msg-Id": job.job_id}
        )
        if ack.duplicate:
            log.info("job %s was already submitted; following the existing op", job.job_id)
        return job.job_id

    async def follow(self, op_id: str, *, until_terminal: bool = True) -> AsyncIterator[Event]:
        """Every event of the op from its start, then live ones; ends after the terminal
        status event when ``until_terminal``."""
        assert self.handles is not None
        sub = await self.handles.js.subscribe(
            op_events_filter(op_id),
            stream=EVENTS_STREAM,  # named: no lookup by subject
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.ALL,
        )
        try:
            async for msg in sub.messages:
                try:
                    event = event_decoder.decode(msg.data)
                except msgspec.DecodeError:
                    continue
                yield event
                if until_terminal and isinstance(event, StatusEvent) and event.state in TERMINAL_STATES:
                    # an earlier run's end (the op was requeued since) is not the end
                    if not await self._status_after(op_id, msg.metadata.sequence.stream):
                        return
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _status_after(self, op_id: str, seq: int) -> bool:
        """Whether the op has a status event later than stream sequence ``seq``."""
        assert self.handles is not None
        try:
            last = await self.handles.js.get_last_msg(EVENTS_STREAM, op_subject(op_id, "status"))
        except Exception:  # noqa: BLE001 - unreadable now: the event seen is the last one known
            return False
        return int(last.seq or 0) > seq

    async def requeue(
        self, op_id: str, reason: str = "", timeout_s: float = REQUEST_TIMEOUT_S
    ) -> RequeueReply:
        """Ask the dispatchers to run an ended op again as its next attempt. Raises
        :class:`RequeueRefused` with their reason, :class:`RequestUnanswered` when none
        answers."""
        assert self.nc is not None
        request = RequeueRequest(op_id=op_id, reason=reason, requested_by=submitter())
        what = f"requeue of op {op_id}"
        try:
            msg = await self.nc.request(
                requeue_subject(self.submitter_name), encode(request), timeout=timeout_s
            )
        except nats.errors.NoRespondersError:
            raise RequestUnanswered(what) from None
        except (TimeoutError, nats.errors.TimeoutError):
            raise RequestUnanswered(what, timed_out_s=timeout_s) from None
        try:
            reply = msgspec.json.decode(msg.data, type=RequeueReply)
        except msgspec.DecodeError as exc:  # a dispatcher of another version, or not one at all
            raise ClientError(f"{what}: the dispatcher's answer is unreadable ({exc})") from None
        if not reply.requeued:
            raise RequeueRefused(op_id, reply.error_type, reply.error)
        return reply

    async def record(self, op_id: str) -> OpRecord:
        """The op's record; OpNotFound if there is none."""
        assert self.store is not None
        return (await self.store.get(op_id))[0]

    async def records(self) -> list[OpRecord]:
        """Every op record, newest first."""
        assert self.store is not None
        records = await self.store.list()
        return sorted(records, key=lambda r: min(r.timestamps.values(), default=0.0), reverse=True)

    async def cancel(self, op_id: str, reason: str = "", requested_by: str = "") -> OpRecord | None:
        """Publish a cancel request; returns the record as it was (None if unknown)."""
        assert self.handles is not None
        try:
            record = await self.record(op_id)
        except OpNotFound:
            record = None
        request = CancelRequest(
            op_id=op_id, ts=now(), reason=reason, requested_by=requested_by or submitter()
        )
        await self.handles.js.publish(op_subject(op_id, "cancel"), encode(request))
        return record
