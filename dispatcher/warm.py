"""One warm runner container: created and started ahead of its op, handed exactly one op.

A warm container runs ``python -m runner --pool WAIT_S``: it does its imports, prints
:data:`POOL_READY_LINE`, and waits on standard input. The dispatcher holds that input
open (an attach socket) from the start, so nothing of an op — spec, credentials — exists
in the container until :meth:`WarmContainer.assign` writes it and closes the input. If the
dispatcher dies first, the input closes empty and the runner exits with
:data:`EXIT_NOT_ASSIGNED`; nothing ever runs a second op in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from typing import Any

from dispatcher.engine import RUNNER_USER, DockerEngine
from dispatcher.errors import InfrastructureError
from runner.protocol import (
    LABEL_ATTEMPT,
    LABEL_CLUSTER,
    LABEL_DISPATCHER,
    LABEL_KIND,
    LABEL_OP_ID,
    LABEL_POOL,
    POOL_READY_LINE,
)


def warm_name() -> str:
    """A fresh name for a warm container."""
    return f"ktrdr-pool-{uuid.uuid4().hex[:12]}"


class WarmContainer:
    """A started runner container waiting for its one op, with its input held open."""

    def __init__(
        self, engine: DockerEngine, host: str, container_id: str, name: str, shape: str, attached: Any
    ) -> None:
        self.engine = engine
        #: The host it runs on (as placement names it).
        self.host = host
        self.container_id = container_id
        #: Its name while it waits (``ktrdr-pool-...``); renamed for its op by :meth:`claim`.
        self.name = name
        self.shape = shape
        self._attached = attached
        #: When it said it was ready (monotonic; 0 while it is still importing).
        self.ready_since = 0.0

    @classmethod
    async def start(
        cls,
        engine: DockerEngine,
        *,
        host: str,
        name: str,
        image: str,
        shape: str,
        host_config: dict[str, Any],
        dispatcher_id: str,
        deployment: str,
        wait_s: float,
        kinds: list[str],
    ) -> WarmContainer:
        """Create and start a warm container on ``engine``; it waits up to ``wait_s``
        for an op, then exits by itself."""

        def create_and_start() -> tuple[str, Any]:
            response = engine.api.create_container(
                image,
                command=["--pool", f"{wait_s:g}", ",".join(kinds)],
                name=name,
                user=RUNNER_USER,
                environment={"HOME": "/tmp"},
                labels={
                    LABEL_OP_ID: "",  # none yet; the exit watcher follows every labelled one
                    LABEL_KIND: "",
                    LABEL_ATTEMPT: "",
                    LABEL_DISPATCHER: dispatcher_id,
                    LABEL_CLUSTER: deployment,
                    LABEL_POOL: shape,
                },
                host_config=host_config,
                working_dir="/tmp",
                stdin_open=True,  # StdinOnce too: the one attach below closes it for good
            )
            cid = str(response["Id"])
            try:
                attached = engine.api.attach_socket(cid, params={"stdin": 1, "stream": 1})
                engine.api.start(cid)
            except BaseException:
                with contextlib.suppress(Exception):
                    engine.api.remove_container(cid, force=True)
                raise
            return cid, attached

        await engine.call(engine.ensure_runner_network)
        cid, attached = await engine.call(create_and_start)
        return cls(engine, host, cid, name, shape, attached)

    async def wait_ready(self, timeout_s: float) -> None:
        """Until the runner says its imports are done; InfrastructureError (with its last
        words) when it exits or stays silent past ``timeout_s``."""
        api, cid = self.engine.api, self.container_id
        stream = await self.engine.call(api.logs, cid, stream=True, follow=True, stdout=True, stderr=True)

        def read() -> list[str]:
            seen: list[str] = []
            pending = b""
            for chunk in stream:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    text = line.decode("utf-8", "replace").rstrip("\r")
                    if text == POOL_READY_LINE:
                        return []
                    seen = [*seen[-4:], text]
            return seen or ["(no output)"]

        try:
            last_words = await asyncio.wait_for(self.engine.stream(read), timeout_s)
        except TimeoutError:
            raise InfrastructureError(
                f"warm container {cid[:12]} on {self.engine.name} was not ready within {timeout_s:g}s"
            ) from None
        finally:
            with contextlib.suppress(Exception):
                stream.close()
        if last_words:
            raise InfrastructureError(
                f"warm container {cid[:12]} on {self.engine.name} exited before it was ready: "
                + " | ".join(last_words)
            )
        self.ready_since = time.monotonic()

    async def claim(self, name: str) -> None:
        """Name the container after the op it is about to run (how a restarted
        dispatcher finds the op's container: its labels predate the op)."""
        await self.engine.call(self.engine.api.rename, self.container_id, name)

    async def assign(self, spec_json: str, creds: bytes) -> None:
        """Hand the op over: its spec (one JSON line) and credentials, then end of input."""
        data = spec_json.encode() + b"\n" + creds
        await self.engine.call(self._write_and_close, data)

    def _write_and_close(self, data: bytes) -> None:
        sock = getattr(self._attached, "_sock", self._attached)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise InfrastructureError(
                f"could not hand the op to warm container {self.container_id[:12]}: {exc}"
            ) from None
        finally:
            self.close_input()

    def close_input(self) -> None:
        """Close our end of its input (an unassigned runner then exits)."""
        sock = getattr(self._attached, "_sock", self._attached)
        for closable in (sock, self._attached):
            with contextlib.suppress(OSError):
                closable.close()
