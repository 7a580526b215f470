"""The Python client: submit ops, follow them, fetch their results and artifacts.

Async, in the spirit of Ray's ``JobSubmissionClient``; :class:`ktrdr_run.SyncClient` wraps
it for notebooks and scripts::

    async with Client() as client:               # ./ktrdr-run.toml or $KTRDR_RUN_CONFIG
        op = await client.submit("backtest", {"strategy": "sma_cross", "symbol": "DEMO"})
        async for event in op.events():          # from the op's start, then live
            print(event)
        record = await op.wait()
        paths = await client.save_artifacts(op.op_id, "out/")

Reads never write: only ``submit`` publishes a job and ``cancel`` a cancel request, the
same messages the CLI publishes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import mimetypes
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Self

import msgspec
from nats.js.errors import KeyNotFoundError, NotFoundError, ObjectNotFoundError

from discovery.health import HostSnapshot, read_snapshot
from dispatcher.config import Config, load_config
from ktrdr_run.errors import (
    ArtifactCorrupt,
    ArtifactNotFound,
    InvalidJob,
    NatsUnavailable,
    NoDispatcher,
    OpNotFound,
    WaitTimeout,
)
from ktrdr_run.session import Session, submitter
from runner import registry
from runner.errors import InvalidParams, KtrdrRunnerError
from runner.protocol import (
    Event,
    Job,
    OpRecord,
    is_valid_id,
    new_job_id,
)

log = logging.getLogger("ktrdr.client")

#: File extensions for the media types ops store artifacts as.
EXTENSIONS = {
    "application/vnd.apache.parquet": ".parquet",
    "application/x-parquet": ".parquet",
    "application/json": ".json",
    "text/csv": ".csv",
    "text/plain": ".txt",
    "text/html": ".html",
    "application/x-pytorch": ".pt",
    "application/zip": ".zip",
    "image/png": ".png",
}
#: How long an op may sit queued with no dispatcher answering before wait() gives up.
NO_DISPATCHER_GRACE_S = 15.0


def make_job(
    kind: str,
    params: dict[str, Any] | None = None,
    *,
    resources: dict[str, Any] | None = None,
    timeout_s: float | None = None,
    labels: dict[str, str] | None = None,
    job_id: str | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    lenient: bool = False,
) -> Job:
    """A validated job; :class:`InvalidJob` names the bad field and what is wrong.

    ``lenient`` accepts strings for numbers and booleans (what a command line produces).
    """
    try:
        op = registry.get(kind)
        typed = op.parse_params(params or {}, strict=not lenient)
    except InvalidParams as exc:
        raise InvalidJob(str(exc), f"params.{exc.field}" if exc.field else "params") from None
    except KtrdrRunnerError as exc:  # an unknown kind
        raise InvalidJob(str(exc), "kind") from None
    job_id = job_id or new_job_id()
    if not is_valid_id(job_id):
        raise InvalidJob(f"job_id {job_id!r}: use letters, digits, '-' and '_' (max 80)", "job_id")
    try:
        return msgspec.convert(
            {
                "job_id": job_id,
                "kind": kind,
                "params": msgspec.to_builtins(typed),
                "resources": resources or {},
                "timeout_s": timeout_s,
                "labels": {k: str(v) for k, v in (labels or {}).items()},
                "submitted_by": submitter(),
                "data_dir": str(Path(data_dir).expanduser().resolve()) if data_dir else "",
            },
            Job,
        )
    except msgspec.ValidationError as exc:
        field = str(exc).rpartition("at `$.")[2].rstrip("`") if "at `$." in str(exc) else ""
        raise InvalidJob(f"invalid job: {exc}", field) from None


def artifact_extension(content_type: str, data: bytes) -> str:
    """The file extension for an artifact: from its media type, else from its bytes."""
    if content_type in EXTENSIONS:
        return EXTENSIONS[content_type]
    if data[:4] == b"PAR1" and data[-4:] == b"PAR1":
        return ".parquet"
    if data[:2] == b"PK":
        return ".zip"
    guessed = mimetypes.guess_extension(content_type) if content_type else None
    return guessed or ".bin"


def write_whole(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a ``.partial`` file and a rename: a reader never
    sees a half-written file under the final name."""
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)


def _verify(name: str, data: bytes) -> None:
    """Check content-addressed bytes against their name (``sha256-<hex>``)."""
    if not name.startswith("sha256-"):
        return
    actual = hashlib.sha256(data).hexdigest()
    if actual != name.removeprefix("sha256-"):
        raise ArtifactCorrupt(name, actual)


class Op:
    """A handle on one op: follow it, wait for it, cancel it, read its record."""

    def __init__(self, client: Client, op_id: str) -> None:
        self.client = client
        self.op_id = op_id

    def __repr__(self) -> str:
        return f"Op({self.op_id!r})"

    async def record(self) -> OpRecord:
        """The op's record now; :class:`OpNotFound` if there is none (yet)."""
        return await self.client.record(self.op_id)

    async def events(self, *, until_terminal: bool = True) -> AsyncIterator[Event]:
        """Every event of the op from its start, then live ones; ends after the terminal
        status event (unless ``until_terminal`` is False)."""
        async for event in self.client.session.follow(self.op_id, until_terminal=until_terminal):
            yield event

    async def wait(
        self,
        timeout_s: float | None = None,
        *,
        on_event: Callable[[Event], Any] | None = None,
        no_dispatcher_s: float = NO_DISPATCHER_GRACE_S,
    ) -> OpRecord:
        """Wait for the op's terminal state and return its record.

        Raises :class:`WaitTimeout` after ``timeout_s`` (the op goes on) and
        :class:`NoDispatcher` when the op has stayed queued for ``no_dispatcher_s`` with
        no dispatcher answering. ``on_event`` sees every event on the way.
        """
        check_every_s = min(5.0, max(no_dispatcher_s / 3, 0.2))
        started = time.monotonic()
        follow = asyncio.ensure_future(self._follow(on_event))
        try:
            unanswered_since: float | None = None
            while not follow.done():
                left = None if timeout_s is None else timeout_s - (time.monotonic() - started)
                if left is not None and left <= 0:
                    raise WaitTimeout(self.op_id, timeout_s or 0.0, await self._state())
                step = check_every_s if left is None else min(check_every_s, left)
                done, _ = await asyncio.wait({follow}, timeout=step)
                if done:
                    break
                if await self._state() == "queued" and not await self.client.dispatchers():
                    unanswered_since = unanswered_since or time.monotonic()
                    if time.monotonic() - unanswered_since >= no_dispatcher_s:
                        raise NoDispatcher(self.op_id, time.monotonic() - unanswered_since)
                else:
                    unanswered_since = None
            follow.result()
        finally:
            follow.cancel()
        return await self.record()

    async def _follow(self, on_event: Callable[[Event], Any] | None) -> None:
        async for event in self.events():
            if on_event is not None:
                result = on_event(event)
                if isinstance(result, Awaitable):
                    await result

    async def _state(self) -> str:
        try:
            return (await self.record()).state
        except OpNotFound:  # published, and no dispatcher has accepted it yet
            return "queued"
        except Exception as exc:  # noqa: BLE001 - the state only words an error message
            log.debug("op %s: record unreadable while waiting: %s", self.op_id, exc)
            return "unknown"

    async def cancel(self, reason: str = "") -> OpRecord | None:
        """Ask the op to cancel; returns its record as it was (None if unknown yet)."""
        return await self.client.cancel(self.op_id, reason)

    async def artifact(self, name: str) -> bytes:
        """One of the op's artifacts by its name in the op (``trades``, ``equity_curve``)."""
        record = await self.record()
        if name not in record.artifacts:
            known = ", ".join(sorted(record.artifacts)) or "none"
            why = "" if record.state == "completed" else f"; it is {record.state}"
            if record.error is not None:
                why += f": {record.error.message}"
            raise ArtifactNotFound(name, f"op {self.op_id} has artifacts: {known}{why}")
        return await self.client.artifact(record.artifacts[name])

    async def save_artifacts(self, directory: str | os.PathLike[str]) -> dict[str, Path]:
        """Write every artifact of the op into ``directory``; see Client.save_artifacts."""
        return await self.client.save_artifacts(self.op_id, directory)


class Client:
    """A connection to ktrdr-run: submit ops and read everything about them.

    ``config``: a :class:`Config`, a path to a TOML file, or None for the default file.
    ``nats_url`` overrides the config's. ``local=True`` behaves like the one-shot CLI: a
    missing local NATS is started and, when no dispatcher answers, one runs in this
    process for this client's own ops. Without it the client needs a running NATS, and
    ops wait in the queue for a dispatcher.
    """

    def __init__(
        self,
        config: Config | str | os.PathLike[str] | None = None,
        *,
        nats_url: str | None = None,
        local: bool = False,
        progress: Callable[[str], None] | None = None,
        on_disconnected: Callable[[], Awaitable[None]] | None = None,
        on_reconnected: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if not isinstance(config, Config):
            config = load_config(Path(config) if config is not None else None)
        if nats_url:
            config = msgspec.structs.replace(config, nats=msgspec.structs.replace(config.nats, url=nats_url))
        self.config = config
        self.local = local
        self._session = Session(
            config,
            need_dispatcher=local,
            progress=progress,
            setup="create" if local else "bind",
            embedded=local,
            on_disconnected=on_disconnected,
            on_reconnected=on_reconnected,
        )
        self._open = False

    @classmethod
    def over(cls, session: Session) -> Client:
        """A client over a session built with options of its own (the CLI's); an open
        session is used as it is (and closing the client closes it)."""
        client = cls.__new__(cls)
        client.config = session.config
        client.local = session.allow_embedded
        client._session = session
        client._open = session.nc is not None
        return client

    @property
    def session(self) -> Session:
        """The connected session (for the CLI); connect() first."""
        if not self._open:
            raise NatsUnavailable("the client is not connected: use `async with Client() as c` or connect()")
        return self._session

    @property
    def connected(self) -> bool:
        """Whether the NATS connection is up now."""
        nc = self._session.nc
        return bool(self._open and nc is not None and nc.is_connected)

    async def connect(self) -> Self:
        """Connect to NATS and bind ktrdr-run's streams and buckets."""
        if not self._open:
            await self._session.open()
            self._open = True
        return self

    async def close(self) -> None:
        """Close the connection (an in-process dispatcher finishes its ops first)."""
        if self._open:
            self._open = False
            await self._session.close()

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- ops ------------------------------------------------------------------------------

    async def submit(
        self,
        kind: str,
        params: dict[str, Any] | None = None,
        *,
        resources: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        labels: dict[str, str] | None = None,
        job_id: str | None = None,
        data_dir: str | os.PathLike[str] | None = None,
    ) -> Op:
        """Submit an op; returns its handle at once. Idempotent by ``job_id``: submitting
        the same id again returns the existing op. :class:`InvalidJob` names a bad field."""
        job = make_job(
            kind,
            params,
            resources=resources,
            timeout_s=timeout_s,
            labels=labels,
            job_id=job_id,
            data_dir=data_dir,
        )
        return await self.submit_job(job)

    async def submit_job(self, job: Job) -> Op:
        """Submit an already-built :class:`Job`."""
        return Op(self, await self.session.submit(job))

    def op(self, op_id: str) -> Op:
        """A handle on an existing op."""
        return Op(self, op_id)

    async def record(self, op_id: str) -> OpRecord:
        """One op's record; :class:`OpNotFound` if there is none."""
        return await self.session.record(op_id)

    async def ops(
        self, *, state: str | None = None, kind: str | None = None, limit: int | None = None
    ) -> list[OpRecord]:
        """Op records, newest first, optionally only one state and/or kind."""
        records = [
            r
            for r in await self.session.records()
            if (state is None or r.state == state) and (kind is None or r.kind == kind)
        ]
        return records if limit is None else records[:limit]

    async def watch_ops(self) -> AsyncIterator[list[OpRecord]]:
        """Batches of op records: first every current record (one batch, possibly
        empty), then each record as it changes. Ends only when the caller stops."""
        store = self.session.store
        assert store is not None
        batches = store.watch()
        try:
            async for batch in batches:
                yield batch
        finally:
            await batches.aclose()

    async def cancel(self, op_id: str, reason: str = "") -> OpRecord | None:
        """Publish a cancel request for ``op_id`` (what ``ktrdr-run ops cancel`` does)."""
        return await self.session.cancel(op_id, reason=reason)

    async def requeue(self, op_id: str, reason: str = "") -> Op:
        """Run an ended (failed, cancelled, timed-out) op again as the next attempt of the
        same op (what ``ktrdr-run ops requeue`` does); the record keeps the ended run in
        its ``history``. Raises :class:`RequeueRefused` saying why when it may not be, and
        :class:`RequestUnanswered` when no dispatcher answers."""
        await self.session.requeue(op_id, reason)
        return self.op(op_id)

    async def dispatchers(self) -> list[Any]:
        """The dispatchers that answer a ping now."""
        return await self.session.dispatchers()

    async def hosts(self) -> list[HostSnapshot]:
        """The hosts and their free capacity, as the dispatchers last published them."""
        return await read_snapshot(self.session.handles.hosts)  # type: ignore[union-attr]

    # -- artifacts --------------------------------------------------------------------

    async def artifact(self, name: str) -> bytes:
        """An artifact's bytes by its store name (``sha256-…``, as in an op record's
        ``artifacts``), verified against that sha256 (:class:`ArtifactCorrupt`)."""
        return (await self._fetch(name))[0]

    async def _fetch(self, name: str) -> tuple[bytes, str]:
        """(verified bytes, media type) of a stored artifact, in one read."""
        store = self.session.handles.artifacts  # type: ignore[union-attr]
        try:
            result = await store.get(name)
        except (NotFoundError, ObjectNotFoundError, KeyNotFoundError):
            raise ArtifactNotFound(name) from None
        data = bytes(result.data or b"")
        _verify(name, data)
        return data, (result.info.description if result.info else "") or ""

    async def save_artifacts(self, op_id: str, directory: str | os.PathLike[str]) -> dict[str, Path]:
        """Write each artifact of ``op_id`` into ``directory`` as ``<name><ext>`` (the
        extension from its media type: ``trades.parquet``), each verified against its
        sha256 before it is written; returns name → path."""
        record = await self.record(op_id)
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        written: dict[str, Path] = {}
        for name, object_name in sorted(record.artifacts.items()):
            data, content_type = await self._fetch(object_name)
            path = target / f"{name}{artifact_extension(content_type, data)}"
            write_whole(path, data)
            written[name] = path
        return written
