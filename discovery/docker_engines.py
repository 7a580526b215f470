"""Docker engines as capacity: the engine itself reports its CPUs, memory and runtimes.

Engines are reached at ``unix://`` sockets, ``tcp://`` with TLS client certificates, or
``ssh://`` (paramiko; the far side needs the ``docker`` CLI for ``docker system
dial-stdio``). How to reach a discovered host travels with it in its labels
(:class:`EngineEndpoint`), so the dispatcher can connect to any host with
:func:`connect_host`. Docker errors become :class:`DiscoveryError` with a message that
names the host and says what to do.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.tls
import requests.exceptions

from discovery.base import DiscoveryError, Gpu, Host
from discovery.config import EngineConfig, GpuSpec, redact_url

log = logging.getLogger("ktrdr.discovery.docker")

# Label keys under which a Host carries how to reach its engine (paths, never secrets).
LABEL_TLS_CA = "docker.tls_ca"
LABEL_TLS_CERT = "docker.tls_cert"
LABEL_TLS_KEY = "docker.tls_key"
LABEL_TLS_VERIFY = "docker.tls_verify"
LABEL_TIMEOUT = "docker.timeout_s"
LABEL_NATS_URL = "nats_url"
LABEL_MAX_OPS = "max_ops"
LABEL_ERROR = "discovery_error"


def engine_host(client: docker.DockerClient, *, name: str = "", docker_url: str = "") -> Host:
    """Describe the engine behind ``client`` as a Host (capacity read from the engine)."""
    try:
        info: dict[str, Any] = client.info()
    except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
        raise DiscoveryError(f"docker engine {docker_url or 'local'} did not answer: {exc}") from None
    runtimes = info.get("Runtimes") or {}
    # the engine's own labels (dockerd --label key=value) are the host's labels too
    tags = dict(str(label).partition("=")[::2] for label in info.get("Labels") or [])
    return Host(
        name=name or str(info.get("Name") or "local"),
        source="docker",
        docker_url=docker_url,
        cpus=float(info.get("NCPU") or 1),
        memory_bytes=int(info.get("MemTotal") or 0),
        gpu_runtime="nvidia" in runtimes,
        tags=tags,
    )


class LocalDockerProvider:
    """The local engine (the default socket, or one URL)."""

    name = "docker"

    def __init__(self, client: docker.DockerClient, docker_url: str = "") -> None:
        self._client = client
        self._docker_url = docker_url

    def discover(self) -> list[Host]:
        """The local engine as one host."""
        return [engine_host(self._client, docker_url=self._docker_url)]


@dataclass(frozen=True, slots=True)
class EngineEndpoint:
    """How to reach one Docker engine: its URL and, for tcp://, the TLS files."""

    url: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_verify: bool = True
    timeout_s: float = 10.0

    def labels(self) -> dict[str, str]:
        """This endpoint as Host labels (empty values left out)."""
        out = {
            LABEL_TLS_CA: self.tls_ca,
            LABEL_TLS_CERT: self.tls_cert,
            LABEL_TLS_KEY: self.tls_key,
            LABEL_TIMEOUT: f"{self.timeout_s:g}",
        }
        if self.url.startswith("tcp://"):
            out[LABEL_TLS_VERIFY] = "1" if self.tls_verify else "0"
        return {k: v for k, v in out.items() if v}

    @classmethod
    def of(cls, host: Host) -> EngineEndpoint:
        """The endpoint a discovered host carries in its labels."""
        labels = host.labels
        return cls(
            url=host.docker_url,
            tls_ca=labels.get(LABEL_TLS_CA, ""),
            tls_cert=labels.get(LABEL_TLS_CERT, ""),
            tls_key=labels.get(LABEL_TLS_KEY, ""),
            tls_verify=labels.get(LABEL_TLS_VERIFY, "1") != "0",
            timeout_s=float(labels.get(LABEL_TIMEOUT) or 10.0),
        )

    def connect(self, *, name: str = "", pool_size: int = 8) -> docker.DockerClient:
        """A client for this endpoint, checked with a ping (DiscoveryError otherwise)."""
        return connect_engine(
            self.url,
            tls_ca=self.tls_ca,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            tls_verify=self.tls_verify,
            timeout_s=self.timeout_s,
            pool_size=pool_size,
            name=name,
        )

    def describe(self) -> str:
        """The URL (no secrets) and how it is secured, for messages."""
        url = redact_url(self.url) or "the default socket"
        if self.url.startswith("tcp://"):
            if self.tls_cert:
                return (
                    f"{url} (TLS client certificate{', verified' if self.tls_verify else ', NOT verified'})"
                )
            return f"{url} ({'TLS' if self.tls_verify else 'plain TCP, no TLS'})"
        return url


def _diagnose(text: str, endpoint: EngineEndpoint, where: str) -> str:
    """A message saying what went wrong reaching ``where`` and what to do about it."""
    low = text.lower()
    url = redact_url(endpoint.url) or "the default socket (/var/run/docker.sock)"
    if "certificate_verify_failed" in low or "certificate verify failed" in low:
        return (
            f"{where}: the engine's TLS certificate at {url} is not trusted: it must be signed by tls_ca "
            f"({endpoint.tls_ca or 'none given'}) and name the address you connect to ({text})"
        )
    if any(
        s in low for s in ("certificate required", "bad certificate", "unknown ca", "tlsv1 alert", "alert")
    ):
        return (
            f"{where}: the engine at {url} rejected our client certificate ({endpoint.tls_cert or 'none'}): "
            f"it must be signed by the CA the engine trusts (dockerd --tlscacert) ({text})"
        )
    if "http request to an https server" in low:
        return f"{where}: the engine at {url} expects TLS: give tls_ca, tls_cert and tls_key"
    if "wrong version number" in low or "record layer failure" in low:
        return f"{where}: {url} does not speak TLS: is it a plain-TCP engine (tls_verify = false, no files)?"
    if "sslerror" in low or "ssl:" in low:
        return f"{where}: TLS handshake with {url} failed ({text})"
    if "no such file or directory" in low or "filenotfounderror" in low:
        return f"{where}: no Docker socket at {url}: is dockerd running there?"
    if "permission denied" in low:
        return f"{where}: no permission to use {url}: run as root or join the docker group"
    if "connection refused" in low:
        return f"{where}: nothing listens at {url}: is dockerd running with -H {url}?"
    if "404 client error" in low and "/version" in low:
        return (
            f"{where}: something answers at {url} but it is not a Docker engine API "
            "(404 on /version): wrong port?"
        )
    if "timed out" in low or "timeout" in low:
        return f"{where}: {url} did not answer within {endpoint.timeout_s:g}s (host down or firewalled?)"
    if "paramiko" in low or "name 'paramiko'" in low:
        return f"{where}: ssh:// engines need paramiko (pip install paramiko)"
    if endpoint.url.startswith("ssh://"):
        return (
            f"{where}: ssh to {url} failed: {text} (the user needs key-based ssh access and the "
            "docker CLI on the far side)"
        )
    return f"{where}: the engine at {url} did not answer: {text}"


class _ApiClient(docker.APIClient):
    """docker-py's API client, keeping its own TLS CA.

    requests lets ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` replace a session's
    ``verify`` (psf/requests#3829), so with either set (common: Debian images, corporate
    machines) the engine's certificate would be checked against the system bundle instead
    of ``tls_ca``. Keep the session's setting when a request sets none.
    """

    def merge_environment_settings(
        self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any
    ) -> dict[str, Any]:
        settings: dict[str, Any] = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if verify is None:
            settings["verify"] = self.verify
        return settings


class _DockerClient(docker.DockerClient):
    """A DockerClient over :class:`_ApiClient`."""

    def __init__(self, **kwargs: Any) -> None:
        self.api = _ApiClient(**kwargs)


def _ssh_errors() -> tuple[type[BaseException], ...]:
    try:
        import paramiko
    except ImportError:  # pragma: no cover - paramiko is a dependency
        return ()
    return (paramiko.SSHException,)


def connect_engine(
    url: str,
    *,
    tls_ca: str = "",
    tls_cert: str = "",
    tls_key: str = "",
    tls_verify: bool = True,
    timeout_s: float = 10.0,
    pool_size: int = 8,
    name: str = "",
) -> docker.DockerClient:
    """A client for the engine at ``url``, checked with a ping.

    ``tcp://`` URLs use TLS when TLS files are given or ``tls_verify`` is true (client
    certificate ``(tls_cert, tls_key)``, server verified against ``tls_ca``); ``ssh://``
    goes through paramiko. Raises :class:`DiscoveryError` naming the host and what to do.
    """
    endpoint = EngineEndpoint(url, tls_ca, tls_cert, tls_key, tls_verify, timeout_s)
    where = f"engine {name}" if name else f"engine {redact_url(url) or 'local'}"
    for label, path in (("tls_ca", tls_ca), ("tls_cert", tls_cert), ("tls_key", tls_key)):
        if path and not Path(path).is_file():
            raise DiscoveryError(f"{where}: {label} file {path} does not exist or is not a file")
    tls: docker.tls.TLSConfig | bool = False
    if url.startswith("tcp://") and (tls_verify or tls_cert or tls_ca):
        tls = docker.tls.TLSConfig(
            client_cert=(tls_cert, tls_key) if tls_cert else None,
            ca_cert=tls_ca or None,
            verify=tls_verify,
        )
    client: docker.DockerClient | None = None
    try:
        if url:
            client = _DockerClient(
                base_url=url,
                tls=tls,
                timeout=max(1, round(timeout_s)),
                max_pool_size=pool_size,
                use_ssh_client=False,
            )
        else:
            client = docker.from_env(timeout=max(1, round(timeout_s)), max_pool_size=pool_size)
        client.ping()
        return client
    except (
        docker.errors.DockerException,
        requests.exceptions.RequestException,
        OSError,
        NameError,  # docker-py's ssh adapter without paramiko
        *_ssh_errors(),
    ) as exc:
        if client is not None:
            client.close()
        raise DiscoveryError(_diagnose(f"{type(exc).__name__}: {exc}", endpoint, where)) from None


def connect_host(host: Host, *, pool_size: int = 8) -> docker.DockerClient:
    """A client for a discovered host's engine (its endpoint comes from its labels)."""
    return EngineEndpoint.of(host).connect(name=host.name, pool_size=pool_size)


def gpus_of(specs: Sequence[GpuSpec]) -> tuple[Gpu, ...]:
    """Configured GPUs as the Host's GPU tuple, by index."""
    return tuple(
        Gpu(index=g.index, model=g.model, memory_gb=g.memory_gb, device_id=g.device_id)
        for g in sorted(specs, key=lambda g: g.index)
    )


def host_labels(endpoint: EngineEndpoint, *, nats_url: str = "", max_ops: int = 0) -> dict[str, str]:
    """The labels every host built from config carries: its endpoint, NATS URL, op limit."""
    labels = endpoint.labels()
    if nats_url:
        labels[LABEL_NATS_URL] = nats_url
    if max_ops:
        labels[LABEL_MAX_OPS] = str(max_ops)
    return labels


class DockerEngineProvider:
    """Engines listed in ``[[discovery.engines]]``; capacity read from each engine.

    An engine that does not answer is still returned, with no capacity and its error in
    ``errors`` (and the ``discovery_error`` label), so health checks report it as
    unhealthy instead of it silently vanishing.
    """

    name = "engines"

    def __init__(self, engines: Sequence[EngineConfig]) -> None:
        self.engines = list(engines)
        self.errors: dict[str, str] = {}

    @staticmethod
    def endpoint(cfg: EngineConfig) -> EngineEndpoint:
        """The endpoint of a configured engine."""
        return EngineEndpoint(cfg.url, cfg.tls_ca, cfg.tls_cert, cfg.tls_key, cfg.tls_verify, cfg.timeout_s)

    def describe(self, cfg: EngineConfig) -> Host:
        """Reach one configured engine and read its capacity; DiscoveryError if it fails."""
        ep = self.endpoint(cfg)
        client = ep.connect(name=cfg.name, pool_size=2)
        try:
            host = engine_host(client, name=cfg.name, docker_url=cfg.url)
        finally:
            client.close()
        return dataclasses.replace(
            host,
            gpus=gpus_of(cfg.gpus),
            labels=host_labels(ep, nats_url=cfg.nats_url, max_ops=cfg.max_ops),
            tags={**host.tags, **cfg.labels},
        )

    def _one(self, cfg: EngineConfig) -> Host:
        try:
            host = self.describe(cfg)
        except DiscoveryError as exc:
            message = str(exc)
            self.errors[cfg.name] = message
            log.info("%s", message)
            labels = host_labels(self.endpoint(cfg), nats_url=cfg.nats_url, max_ops=cfg.max_ops)
            labels[LABEL_ERROR] = message
            return Host(
                name=cfg.name,
                source="docker",
                docker_url=cfg.url,
                cpus=0.0,
                memory_bytes=0,
                gpus=gpus_of(cfg.gpus),
                labels=labels,
                tags=dict(cfg.labels),
            )
        self.errors.pop(cfg.name, None)
        return host

    def discover(self) -> list[Host]:
        """Every configured engine (queried concurrently)."""
        if not self.engines:
            return []
        with ThreadPoolExecutor(max_workers=min(8, len(self.engines)), thread_name_prefix="discover") as pool:
            return list(pool.map(self._one, self.engines))


class LocalEngineProvider:
    """The local engine ([docker] url, "" = the default socket), reached on every discover."""

    name = "local"

    def __init__(self, url: str = "", *, timeout_s: float = 10.0) -> None:
        self.url = url
        self.timeout_s = timeout_s

    def discover(self) -> list[Host]:
        """The local engine as one host (DiscoveryError when it does not answer)."""
        client = connect_engine(self.url, timeout_s=self.timeout_s, pool_size=2, name="local")
        try:
            host = engine_host(client, docker_url=self.url)
        finally:
            client.close()
        labels = EngineEndpoint(self.url, timeout_s=self.timeout_s).labels()
        labels["local"] = "1"
        return [dataclasses.replace(host, labels=labels)]
