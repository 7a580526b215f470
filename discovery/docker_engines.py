"""Docker engines as capacity: the engine itself reports its CPUs, memory and runtimes."""

from __future__ import annotations

from typing import Any

import docker
import docker.errors
import requests.exceptions

from discovery.base import DiscoveryError, Host


def engine_host(client: docker.DockerClient, *, name: str = "", docker_url: str = "") -> Host:
    """Describe the engine behind ``client`` as a Host (capacity read from the engine)."""
    try:
        info: dict[str, Any] = client.info()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise DiscoveryError(f"docker engine {docker_url or 'local'} did not answer: {exc}") from None
    runtimes = info.get("Runtimes") or {}
    return Host(
        name=name or str(info.get("Name") or "local"),
        source="docker",
        docker_url=docker_url,
        cpus=float(info.get("NCPU") or 1),
        memory_bytes=int(info.get("MemTotal") or 0),
        gpu_runtime="nvidia" in runtimes,
    )


class LocalDockerProvider:
    """The local engine (the default socket, or one URL)."""

    name = "docker"

    def __init__(self, client: docker.DockerClient, docker_url: str = "") -> None:
        self._client = client
        self._docker_url = docker_url

    def discover(self) -> list[Host]:
        return [engine_host(self._client, docker_url=self._docker_url)]
