"""The one small interface every capacity provider implements, and what it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class DiscoveryError(Exception):
    """Root of every error the discovery package raises."""


@dataclass(frozen=True, slots=True)
class Gpu:
    """One GPU a host offers."""

    index: int
    model: str = ""
    memory_gb: float = 0.0
    device_id: str = ""


@dataclass(frozen=True, slots=True)
class Host:
    """A place where containers can run, and what it has.

    ``docker_url`` is how the dispatcher reaches the host's engine ("" = the local
    default socket); ``source`` says which provider found it.
    """

    name: str
    source: str
    docker_url: str
    cpus: float
    memory_bytes: int
    gpus: tuple[Gpu, ...] = ()
    gpu_runtime: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    #: What an operator says of the host (config labels, Proxmox tags, engine labels):
    #: what ``resources.host_labels`` matches. ``labels`` above is how to reach it.
    tags: dict[str, str] = field(default_factory=dict)


class CapacityProvider(Protocol):
    """Finds hosts. ``discover`` is synchronous (providers call blocking clients) and is
    run off the event loop by the dispatcher."""

    name: str

    def discover(self) -> list[Host]:
        """The hosts this provider sees now, with their capacity."""
        ...
