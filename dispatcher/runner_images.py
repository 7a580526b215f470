"""Which runner image an op's container gets, made present on the engine that runs it.

The CPU image (the provider's tag, built on the local engine) serves every op; an op
given GPUs gets the CUDA image instead when the host's engine has it (built there with
``ktrdr-run images build --flavor cuda``, where a registry with CUDA wheels answers),
else the CPU image, whose torch then trains on the CPU (the op's result records the
device it used).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import docker

from dispatcher.engine import DockerEngine
from dispatcher.errors import InfrastructureError
from dispatcher.fleet import Fleet
from dispatcher.images import ImagesConfig, runner_image_tag

log = logging.getLogger("ktrdr.dispatcher")

#: Returns the CPU runner image's tag, building it when missing (blocking).
ImageProvider = Callable[[], str]


class RunnerImages:
    """The runner image tags, found or built once, and copied to engines that lack them."""

    def __init__(
        self,
        fleet: Fleet,
        provider: ImageProvider,
        *,
        source: docker.DockerClient | None = None,
        config: ImagesConfig | None = None,
    ) -> None:
        self.fleet = fleet
        self.provider = provider
        #: The engine the CPU image is built on, to copy it to engines that lack it.
        self.source = source
        self.cuda_tag = runner_image_tag("cuda", config=config or ImagesConfig())
        self._tag: str | None = None
        self._lock = asyncio.Lock()
        self._no_cuda_said: set[str] = set()

    async def cpu_tag(self) -> str:
        """The CPU image's tag (built by the provider on first use)."""
        async with self._lock:
            if self._tag is None:
                self._tag = await asyncio.to_thread(self.provider)
            return self._tag

    async def on(self, engine: DockerEngine, gpu: bool) -> str:
        """The tag of the image to run on ``engine``, present there."""
        if gpu:
            if await self._has(engine, self.cuda_tag):
                return self.cuda_tag
            if engine.name not in self._no_cuda_said:
                self._no_cuda_said.add(engine.name)
                log.warning(
                    "host %s has GPUs but no %s image: GPU ops there get the CPU image",
                    engine.name,
                    self.cuda_tag,
                )
        tag = await self.cpu_tag()
        try:
            await self.fleet.ensure_image(engine, tag, self.source)
        except Exception:
            self._tag = None  # build or find it again on the next attempt
            raise
        return tag

    async def _has(self, engine: DockerEngine, tag: str) -> bool:
        try:
            await engine.call(engine.client.images.get, tag)
        except InfrastructureError:
            return False
        return True
