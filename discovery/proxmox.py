"""Proxmox VE: running LXC containers carrying a worker tag are Docker hosts.

One ``GET /cluster/resources?type=vm`` lists every guest of the cluster with its node,
status, tags and limits; for each running LXC container with a configured tag,
``GET /nodes/{node}/lxc/{vmid}/interfaces`` (PVE >= 8.1) gives its addresses. Where that
endpoint is missing (older PVE) or yields nothing, a static ``ip=`` of the container's
``netN`` config is used. Proxmox's ``maxcpu`` / ``maxmem`` become the host's capacity.

Errors become :class:`DiscoveryError` naming the cluster and its API address; the token
value never appears in a message.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import Any

import requests.exceptions

from discovery.base import DiscoveryError, Host
from discovery.config import ProxmoxConfig, ProxmoxWorkerTag
from discovery.docker_engines import EngineEndpoint, gpus_of, host_labels

log = logging.getLogger("ktrdr.discovery.proxmox")

_TAG_SPLIT = re.compile(r"[;,\s]+")
#: Interfaces of Docker (nested in the LXC) and of bridges: never the container's address.
_SKIPPED_IFACES = ("lo", "docker", "br-", "veth", "cni", "flannel", "virbr")


def parse_tags(raw: str | None) -> list[str]:
    """Tags as Proxmox stores them (``;``-separated) or as people write them (``,`` or
    spaces): lower-cased, empty ones dropped, duplicates removed, order kept."""
    seen: list[str] = []
    for tag in _TAG_SPLIT.split((raw or "").strip().lower()):
        if tag and tag not in seen:
            seen.append(tag)
    return seen


def _addresses(iface: dict[str, Any]) -> list[str]:
    """An interface's addresses, from ``ip-addresses`` (PVE >= 8.4) or the older single
    ``inet`` / ``inet6`` fields (``addr/prefix``)."""
    listed = iface.get("ip-addresses")
    if isinstance(listed, list) and listed:
        return [str(a.get("ip-address") or "") for a in listed if isinstance(a, dict)]
    return [str(iface[k]).split("/", 1)[0] for k in ("inet", "inet6") if iface.get(k)]


def pick_address(interfaces: list[dict[str, Any]] | None) -> str:
    """The container's address: the first non-loopback IPv4 address, else the first
    global IPv6 one (not loopback, not link-local); "" when there is none.

    Loopback, Docker and bridge interfaces (``lo``, ``docker0``, ``br-*``, ``veth*``)
    are skipped: Docker inside the LXC adds ``docker0`` with 172.17.0.1.
    """
    v4: list[str] = []
    v6: list[str] = []
    for iface in interfaces or []:
        if not isinstance(iface, dict):
            continue
        name = str(iface.get("name") or "")
        if name == "lo" or name.startswith(_SKIPPED_IFACES[1:]):
            continue
        for raw in _addresses(iface):
            try:
                ip = ipaddress.ip_address(raw.split("%", 1)[0])
            except ValueError:
                continue
            if ip.is_loopback or ip.is_unspecified or ip.is_link_local or ip.is_multicast:
                continue
            (v4 if ip.version == 4 else v6).append(str(ip))
    return (v4 or v6 or [""])[0]


def address_from_config(config: dict[str, Any] | None) -> str:
    """A static address from the container's ``netN`` config lines (``ip=10.0.0.5/24``),
    IPv4 first; "" for dhcp / manual / none."""
    v4: list[str] = []
    v6: list[str] = []
    lines = config or {}
    for key in sorted(lines):
        if not re.fullmatch(r"net\d+", key):
            continue
        options: dict[str, str] = {}
        for part in str(lines[key]).split(","):
            name, sep, value = part.partition("=")
            if sep:
                options[name.strip()] = value.strip()
        for field, bucket in (("ip", v4), ("ip6", v6)):
            value = options.get(field, "")
            if value and value not in ("dhcp", "manual", "auto"):
                bucket.append(value.split("/", 1)[0])
    return (v4 or v6 or [""])[0]


def _url_address(address: str) -> str:
    """An address as it goes into a URL: IPv6 in brackets."""
    return f"[{address}]" if ":" in address else address


class ProxmoxProvider:
    """Workers of one Proxmox VE cluster, found by tag through ``proxmoxer``."""

    def __init__(self, cfg: ProxmoxConfig) -> None:
        self.cfg = cfg
        self.name = f"proxmox:{cfg.name}"
        #: Containers that matched a tag but could not be used, and why (last discover).
        self.warnings: list[str] = []

    @property
    def where(self) -> str:
        """The cluster and its API address, for messages."""
        return f"Proxmox {self.cfg.name} (https://{self.cfg.host}:{self.cfg.port})"

    def _scrub(self, text: str) -> str:
        token = self.cfg.token_value
        return text.replace(token, "***") if token else text

    def _api(self) -> Any:
        try:
            from proxmoxer import ProxmoxAPI
        except ImportError:  # pragma: no cover - proxmoxer is a dependency
            raise DiscoveryError(
                f"{self.where}: proxmoxer is not installed (pip install proxmoxer)"
            ) from None
        cfg = self.cfg
        return ProxmoxAPI(
            cfg.host,
            port=cfg.port,
            user=cfg.user,
            token_name=cfg.token_name,
            token_value=cfg.token_value,
            verify_ssl=(cfg.ca_file or True) if cfg.verify_ssl else False,
            timeout=cfg.timeout_s,
            service="PVE",
        )

    def _error(self, exc: BaseException, what: str) -> DiscoveryError:
        """Translate a proxmoxer / requests error into a message a user can act on."""
        from proxmoxer.core import ResourceException

        cfg = self.cfg
        token_id = f"{cfg.user}!{cfg.token_name}"
        if isinstance(exc, ResourceException):
            status = exc.status_code
            if status == 401:
                text = (
                    f"{self.where} rejected the API token {token_id} (401 authentication failure): "
                    "check user, token_name and token_value (Datacenter > Permissions > API Tokens) "
                    "and that the token has not expired"
                )
            elif status == 403:
                text = (
                    f"{self.where}: the API token {token_id} may not {what} (403): give it VM.Audit "
                    "on /vms (a privilege-separated token needs its own permissions)"
                )
            else:
                text = f"{self.where}: {what} failed: {exc}"
        elif isinstance(exc, requests.exceptions.SSLError):
            text = (
                f"{self.where}: the API's TLS certificate is not trusted ({_reason(exc)}): set ca_file to "
                "the cluster CA (/etc/pve/pve-root-ca.pem) or verify_ssl = false"
            )
        elif isinstance(exc, requests.exceptions.Timeout):
            text = (
                f"{self.where} did not answer within {cfg.timeout_s:g}s: "
                f"is the host up and port {cfg.port} open?"
            )
        elif isinstance(exc, requests.exceptions.ConnectionError):
            text = f"{self.where} is unreachable ({_reason(exc)}): check host and port"
        else:
            text = f"{self.where}: {what} failed: {type(exc).__name__}: {exc}"
        return DiscoveryError(self._scrub(text))

    def _get(self, resource: Any, what: str, **params: Any) -> Any:
        from proxmoxer.core import ResourceException

        try:
            return resource.get(**params)
        except (ResourceException, requests.exceptions.RequestException) as exc:
            raise self._error(exc, what) from None

    def _worker_tag(self, tags: list[str]) -> ProxmoxWorkerTag | None:
        for worker in self.cfg.workers:
            if worker.tag in tags:
                return worker
        return None

    def _address(self, api: Any, node: str, vmid: int) -> str:
        """The container's address from its interfaces, else from a static config ip."""
        from proxmoxer.core import ResourceException

        where = f"GET /nodes/{node}/lxc/{vmid}/interfaces"
        try:
            interfaces = api.nodes(node).lxc(vmid).interfaces.get()
            address = pick_address(interfaces)
        except ResourceException as exc:
            if exc.status_code in (401, 403):
                raise self._error(exc, where) from None
            log.info("%s: %s (%s); trying the container config", self.where, where, exc)
            address = ""
        except requests.exceptions.RequestException as exc:
            raise self._error(exc, where) from None
        if address:
            return address
        config = self._get(api.nodes(node).lxc(vmid).config, f"GET /nodes/{node}/lxc/{vmid}/config")
        return address_from_config(config)

    def discover(self) -> list[Host]:
        """Running LXC containers carrying a configured worker tag, with their address and
        capacity. Raises DiscoveryError when the cluster cannot be read."""
        api = self._api()
        resources = self._get(api.cluster.resources, "list guests (GET /cluster/resources)", type="vm")
        warnings: list[str] = []
        hosts: list[Host] = []
        for entry in resources or []:
            if entry.get("type") != "lxc" or entry.get("status") != "running" or entry.get("template"):
                continue
            tags = parse_tags(entry.get("tags"))
            worker = self._worker_tag(tags)
            if worker is None:
                continue
            node = str(entry.get("node") or "")
            vmid = int(entry.get("vmid") or str(entry.get("id", "/0")).rsplit("/", 1)[-1])
            ct_name = str(entry.get("name") or f"CT{vmid}")
            address = self._address(api, node, vmid)
            if not address:
                warnings.append(
                    f"{self.where}: {ct_name} ({node}/{vmid}) has tag {worker.tag!r} but no usable "
                    "address (no non-loopback address on its interfaces, no static ip in its config)"
                )
                continue
            url = worker.docker_url_template.format(
                address=_url_address(address), node=node, vmid=vmid, name=ct_name
            )
            endpoint = EngineEndpoint(url, worker.tls_ca, worker.tls_cert, worker.tls_key, worker.tls_verify)
            labels = host_labels(endpoint, nats_url=worker.nats_url, max_ops=worker.max_ops)
            labels.update(
                {
                    "proxmox": self.cfg.name,
                    "node": node,
                    "vmid": str(vmid),
                    "tag": worker.tag,
                    "tags": ";".join(tags),
                    "address": address,
                }
            )
            hosts.append(
                Host(
                    name=f"pve:{node}/{vmid}:{ct_name}",
                    source=self.name,
                    docker_url=url,
                    cpus=float(entry.get("maxcpu") or 0),
                    memory_bytes=int(entry.get("maxmem") or 0),
                    gpus=gpus_of(worker.gpus),
                    labels=labels,
                    # each Proxmox tag of the container is a label with the value "true"
                    tags={**{t: "true" for t in tags}, **worker.labels},
                )
            )
        for warning in warnings:
            log.warning("%s", warning)
        self.warnings = warnings
        return hosts


def _reason(exc: BaseException) -> str:
    """The short cause inside a long requests error (``[Errno 111] Connection refused``)."""
    text = str(exc)
    for pattern in (
        r"\[Errno -?\d+\] [^'\")\]]+",
        r"\[SSL: [A-Z_]+\][^'\")]*",
        r"certificate verify failed[^'\")]*",
    ):
        match = re.search(pattern, text)
        if match:
            return re.sub(r"\s*\(_ssl\.c:\d+\)?", "", match.group(0)).strip()
    return text[:200]
