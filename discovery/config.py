"""The ``[discovery]`` part of ``ktrdr-run.toml``: where capacity comes from.

Decoded strictly by msgspec (unknown keys are errors); every struct validates itself in
``__post_init__`` with a message naming the field, so a bad value is reported as
``<field>: <problem> - at `$.discovery.engines[0]```. Secrets (the Proxmox token) come in
through ``${ENV}`` substitution and are printed only through :func:`redacted`.

Example::

    [discovery]
    rediscover_s = 60
    health_interval_s = 10
    failure_threshold = 3

    [[discovery.engines]]
    name = "lab2"
    url = "tcp://10.0.0.12:2376"
    tls_ca = "/etc/ktrdr/ca.pem"
    tls_cert = "/etc/ktrdr/cert.pem"
    tls_key = "/etc/ktrdr/key.pem"

    [[discovery.proxmox]]
    name = "lab"
    host = "pve.lab"
    user = "ktrdr@pve"
    token_name = "discovery"
    token_value = "${PVE_TOKEN}"
    ca_file = "/etc/ktrdr/pve-root-ca.pem"

    [[discovery.proxmox.workers]]
    tag = "ktrdr-worker"
    docker_url_template = "tcp://{address}:2376"
    tls_ca = "/etc/ktrdr/ca.pem"
    tls_cert = "/etc/ktrdr/cert.pem"
    tls_key = "/etc/ktrdr/key.pem"

    [[discovery.gpu_hosts]]
    name = "dgx1"
    url = "ssh://ktrdr@dgx1"
    cpus = 64
    memory_gb = 512
    gpus = [{index = 0, model = "A100", memory_gb = 80}, {index = 1, model = "A100", memory_gb = 80}]
"""

from __future__ import annotations

import re
import string
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
from msgspec import Meta, Struct

#: Proxmox's own tag format (pve-tag): what ``pct set --tags`` accepts.
TAG_RE = re.compile(r"[a-z0-9_][a-z0-9_\-\+\.]*")
#: Host names double as KV keys and container labels: keep them plain.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}")
ENGINE_SCHEMES = ("unix", "tcp", "ssh")
TEMPLATE_FIELDS = frozenset({"address", "node", "vmid", "name"})
SECRET_KEYS = frozenset({"token_value", "password", "secret", "token"})
REDACTED = "***"


def _check_name(name: str, what: str) -> None:
    if not name:
        raise ValueError(f"{what}: a name is required")
    if not NAME_RE.fullmatch(name):
        raise ValueError(
            f"{what}: {name!r} is not a valid name (letters, digits, '_', '.', '-'; "
            "starting with a letter or digit; at most 63 characters)"
        )


def _check_engine(url: str, tls_ca: str, tls_cert: str, tls_key: str, tls_verify: bool, field: str) -> None:
    """Validate a Docker endpoint: its scheme, and the TLS files a tcp:// one needs."""
    if not url:
        raise ValueError(
            f"{field}: a Docker URL is required (unix:///path, tcp://host:2376 or ssh://user@host)"
        )
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in ENGINE_SCHEMES:
        raise ValueError(f"{field}: {url!r} must start with unix://, tcp:// or ssh://")
    has_tls = bool(tls_ca or tls_cert or tls_key)
    if scheme != "tcp":
        if has_tls:
            raise ValueError(f"tls_ca/tls_cert/tls_key: TLS files apply to tcp:// engines only, not {url!r}")
        return
    if bool(tls_cert) != bool(tls_key):
        raise ValueError("tls_cert/tls_key: give both the client certificate and its key, or neither")
    if tls_verify and not (tls_ca and tls_cert and tls_key):
        missing = [n for n, v in (("tls_ca", tls_ca), ("tls_cert", tls_cert), ("tls_key", tls_key)) if not v]
        raise ValueError(
            f"{', '.join(missing)}: {url!r} is a tcp:// engine with tls_verify = true, so it needs "
            "tls_ca, tls_cert and tls_key (the engine's CA and a client certificate it trusts); "
            "set tls_verify = false only for an engine you reach over a trusted network"
        )


def _check_nats_url(url: str) -> None:
    if url and not re.match(r"^(nats|tls|ws|wss)://", url):
        raise ValueError(f"nats_url: {url!r} must start with nats://, tls://, ws:// or wss://")


def _check_gpus(gpus: list[GpuSpec]) -> None:
    indexes = [g.index for g in gpus]
    duplicates = sorted({i for i in indexes if indexes.count(i) > 1})
    if duplicates:
        raise ValueError(f"gpus: index {duplicates[0]} is listed twice")


class GpuSpec(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """One GPU of a host, as the operator declares it."""

    index: Annotated[int, Meta(ge=0)] = 0
    model: str = ""
    memory_gb: Annotated[float, Meta(ge=0)] = 0.0
    #: What to pass in ``device_ids`` (a UUID like ``GPU-…``); "" = the index.
    device_id: str = ""


class EngineAccess(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How to reach a Docker engine and what to tell its containers: shared by configured
    engines, static GPU hosts and Proxmox worker tags."""

    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_verify: bool = True
    #: The NATS URL containers on this engine use ("" = derive from the engine's bridge).
    nats_url: str = ""
    #: At most this many ops at once on this engine (0 = no limit beyond capacity).
    max_ops: Annotated[int, Meta(ge=0)] = 0
    #: GPUs of this engine (the engine does not list them itself).
    #: Operator labels of the host(s) this entry describes, matched by an op's
    #: ``resources.host_labels`` (beside the engine's own ``dockerd --label`` ones).
    labels: dict[str, str] = {}
    gpus: list[GpuSpec] = []


class EngineConfig(EngineAccess, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A Docker engine reached at a fixed URL."""

    name: str = ""
    url: str = ""
    timeout_s: Annotated[float, Meta(gt=0)] = 10.0

    def __post_init__(self) -> None:
        _check_name(self.name, "name")
        _check_engine(self.url, self.tls_ca, self.tls_cert, self.tls_key, self.tls_verify, "url")
        _check_nats_url(self.nats_url)
        _check_gpus(self.gpus)


class ProxmoxWorkerTag(EngineAccess, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """LXC containers carrying ``tag`` are workers; how to reach the Docker engine in them
    (``gpus``: what every worker with this tag has, passed through to the LXC)."""

    tag: str = ""
    #: ``{address}`` is the container's address ([v6] bracketed); ``{node}``, ``{vmid}``,
    #: ``{name}`` are also available.
    docker_url_template: str = "tcp://{address}:2376"

    def __post_init__(self) -> None:
        if not self.tag:
            raise ValueError('tag: a Proxmox tag is required (e.g. tag = "ktrdr-worker")')
        if not TAG_RE.fullmatch(self.tag):
            raise ValueError(
                f"tag: {self.tag!r} is not a Proxmox tag (lower-case letters, digits and _ - + ., "
                "not starting with - + or .)"
            )
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(self.docker_url_template) if f}
        except ValueError as exc:
            raise ValueError(f"docker_url_template: {self.docker_url_template!r}: {exc}") from None
        if "address" not in fields:
            raise ValueError(f"docker_url_template: {self.docker_url_template!r} must contain {{address}}")
        unknown = fields - TEMPLATE_FIELDS
        if unknown:
            raise ValueError(
                f"docker_url_template: unknown placeholder {{{sorted(unknown)[0]}}} "
                f"(use {', '.join('{' + f + '}' for f in sorted(TEMPLATE_FIELDS))})"
            )
        sample = self.docker_url_template.format(address="192.0.2.1", node="n", vmid=100, name="ct")
        _check_engine(
            sample, self.tls_ca, self.tls_cert, self.tls_key, self.tls_verify, "docker_url_template"
        )
        _check_nats_url(self.nats_url)
        _check_gpus(self.gpus)


class ProxmoxConfig(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A Proxmox VE cluster (any node's API), read with an API token."""

    name: str = ""
    host: str = ""
    port: Annotated[int, Meta(ge=1, le=65535)] = 8006
    #: The token's user, e.g. ``root@pam`` or ``ktrdr@pve``.
    user: str = ""
    token_name: str = ""
    #: A secret: give it as ``token_value = "${PVE_TOKEN}"``.
    token_value: str = ""
    verify_ssl: bool = True
    #: CA bundle to verify the API's certificate with (e.g. /etc/pve/pve-root-ca.pem).
    ca_file: str = ""
    timeout_s: Annotated[float, Meta(gt=0)] = 5.0
    workers: list[ProxmoxWorkerTag] = []

    def __post_init__(self) -> None:
        _check_name(self.name, "name")
        if not self.host:
            raise ValueError('host: the Proxmox API host is required (e.g. host = "pve1.lab")')
        if "://" in self.host or "/" in self.host:
            raise ValueError(f"host: {self.host!r} must be a host name or address, not a URL")
        if not re.fullmatch(r"[^@\s!]+@[^@\s!]+", self.user):
            raise ValueError(f"user: {self.user!r} must be USER@REALM (e.g. root@pam)")
        if not self.token_name:
            raise ValueError("token_name: the API token id is required (the part after '!')")
        if not self.token_value:
            raise ValueError(
                'token_value: the API token secret is required; set token_value = "${PVE_TOKEN}"'
            )
        if self.ca_file and not self.verify_ssl:
            raise ValueError("ca_file: given, but verify_ssl = false would ignore it")
        if not self.workers:
            raise ValueError("workers: list at least one [[discovery.proxmox.workers]] tag to look for")
        tags = [w.tag for w in self.workers]
        duplicates = sorted({t for t in tags if tags.count(t) > 1})
        if duplicates:
            raise ValueError(f"workers: tag {duplicates[0]!r} is listed twice")


class StaticGpuHost(EngineConfig, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A GPU host listed by hand: an engine (every field of :class:`EngineConfig`) whose
    GPUs must be listed, and optionally its capacity."""

    #: 0 = read from the engine when it first answers a health check.
    cpus: Annotated[float, Meta(ge=0)] = 0.0
    memory_gb: Annotated[float, Meta(ge=0)] = 0.0

    def __post_init__(self) -> None:
        if not self.gpus:
            raise ValueError('gpus: a GPU host lists its GPUs (gpus = [{index = 0, model = "..."}])')
        super().__post_init__()


class DiscoveryConfig(Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Where capacity comes from, and how often it is checked."""

    rediscover_s: Annotated[float, Meta(gt=0)] = 60.0
    health_interval_s: Annotated[float, Meta(gt=0)] = 10.0
    #: Consecutive failed checks before a host is ``unhealthy``.
    failure_threshold: Annotated[int, Meta(ge=1)] = 3
    #: Checks a host may stay unhealthy before it is ``gone``.
    gone_after_checks: Annotated[int, Meta(ge=1)] = 30
    #: Also offer the local engine ([docker] url) as a host.
    local_engine: bool = True
    engines: list[EngineConfig] = []
    proxmox: list[ProxmoxConfig] = []
    gpu_hosts: list[StaticGpuHost] = []

    def __post_init__(self) -> None:
        names = [e.name for e in self.engines] + [g.name for g in self.gpu_hosts]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"name: {duplicates[0]!r} names more than one engine / GPU host")
        clusters = [p.name for p in self.proxmox]
        duplicates = sorted({n for n in clusters if clusters.count(n) > 1})
        if duplicates:
            raise ValueError(f"proxmox.name: {duplicates[0]!r} names more than one Proxmox cluster")


def redact_url(url: str) -> str:
    """``url`` with any password in it replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:{REDACTED}@{netloc}"))


def _redact(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _redact(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, key) for v in value]
    if isinstance(value, str):
        if key in SECRET_KEYS or key.endswith(("_password", "_secret", "_token")):
            return REDACTED if value else ""
        if "://" in value:
            return redact_url(value)
    return value


def redacted(config: Any) -> dict[str, Any]:
    """The config (any msgspec Struct, e.g. the whole Config or a DiscoveryConfig) as plain
    builtins with every secret replaced by ``***``: token values, passwords, and the
    password part of URLs. Safe to print or log."""
    data = msgspec.to_builtins(config)
    if not isinstance(data, dict):
        raise TypeError(f"redacted() takes a config struct, not {type(config).__name__}")
    result: dict[str, Any] = _redact(data)
    return result
