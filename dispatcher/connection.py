"""Connecting to NATS: one server or a cluster's list, with credentials, failing fast and
saying why (nothing listening, or credentials refused); once connected, the client
reconnects by itself through outages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlparse

import nats
from nats.aio.client import Client as NATS
from nats.aio.client import Credentials

from dispatcher.errors import NatsRefused, NatsUnavailable
from runner.transport import redact_url

log = logging.getLogger("ktrdr.jetstream")


def server_urls(url: str) -> list[str]:
    """The server URLs in ``url``: one URL, or a comma-separated list of a cluster's nodes."""
    return [part.strip() for part in url.split(",") if part.strip()]


async def connect(
    url: str,
    *,
    name: str,
    connect_timeout_s: float = 2.0,
    retry: bool = True,
    credentials: Credentials | None = None,
    on_disconnected: Callable[[], Awaitable[None]] | None = None,
    on_reconnected: Callable[[], Awaitable[None]] | None = None,
) -> NATS:
    """Connect to NATS; once connected, the client reconnects by itself through outages.

    ``url``: one server, or a comma-separated list of a cluster's nodes (the client picks
    one at random and moves to another when it is lost). With ``retry=False`` the first
    connection is one quick attempt (used to probe for a server: nothing listening at any
    of them fails at once); otherwise it is retried for up to
    ``3 * connect_timeout_s``. ``credentials``: a ``.creds`` file path or text
    (``RawCredentials``). ``on_disconnected``/``on_reconnected`` are awaited when the
    connection drops and when it is back. A server that refuses the credentials (or wants
    some) fails at once, saying so.
    """
    refused: list[str] = []
    refusal = asyncio.Event()

    async def on_error(exc: Exception) -> None:
        if "authorization" in str(exc).lower() or "authentication" in str(exc).lower():
            refused.append(str(exc))
            refusal.set()
            if len(refused) > 1:
                return  # a refusal repeats on every reconnect: said once
        log.warning("nats %s: %s", name, exc)

    options: dict[str, Any] = {
        "name": name,
        "connect_timeout": connect_timeout_s,
        "error_cb": on_error,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
    }
    if on_disconnected is not None:
        options["disconnected_cb"] = on_disconnected
    if on_reconnected is not None:
        options["reconnected_cb"] = on_reconnected
    if credentials is not None:
        options["user_credentials"] = credentials
    servers = server_urls(url)
    if not servers:
        raise NatsUnavailable("no NATS server URL given ([nats] url is empty)")
    if not retry:
        await _check_listening(servers, connect_timeout_s)
    connecting = asyncio.ensure_future(nats.connect(servers[0] if len(servers) == 1 else servers, **options))
    refused_wait = asyncio.ensure_future(refusal.wait())
    try:
        # a refusal is final: no point retrying the same credentials until the deadline
        await asyncio.wait(
            {connecting, refused_wait}, timeout=connect_timeout_s * 3, return_when=asyncio.FIRST_COMPLETED
        )
        if not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await connecting
            raise nats.errors.Error(refused[-1]) if refused else TimeoutError()
        return connecting.result()
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        said = str(exc) or type(exc).__name__
        if refused or "authorization" in said.lower():
            raise NatsRefused(
                f"the NATS server at {redact_url(url)} refused ktrdr-run's credentials "
                f"({refused[-1] if refused else said}): set [nats] creds to a credentials file it "
                "accepts (`ktrdr-run creds issue` where its configuration was made)"
            ) from None
        raise NatsUnavailable(f"no NATS server answers at {redact_url(url)}: {said}") from None
    finally:
        refused_wait.cancel()


async def _check_listening(servers: list[str], timeout_s: float) -> None:
    """Fail at once when nothing listens at any of ``servers`` (nats.connect would retry
    for seconds); one that listens is enough."""

    async def one(url: str) -> None:
        parsed = urlparse(url if "://" in url else f"nats://{url}")
        _reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parsed.hostname or "127.0.0.1", parsed.port or 4222), timeout_s
        )
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    tries = [asyncio.ensure_future(one(url)) for url in servers]
    said: list[str] = []
    try:
        for attempt in asyncio.as_completed(tries):
            try:
                await attempt
                return
            except (OSError, TimeoutError, ValueError) as exc:
                said.append(str(exc) or type(exc).__name__)
    finally:
        for task in tries:
            task.cancel()
        await asyncio.gather(*tries, return_exceptions=True)
    raise NatsUnavailable(f"no NATS server answers at {redact_url(','.join(servers))}: {'; '.join(said)}")
