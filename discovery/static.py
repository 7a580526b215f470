"""Static GPU hosts: listed by hand in ``[[discovery.gpu_hosts]]``.

Discovery reads only the config (no network); the health checks reach each engine, and
CPUs / memory left at 0 in the config are filled in from the engine when it answers.
"""

from __future__ import annotations

from collections.abc import Sequence

from discovery.base import Host
from discovery.config import StaticGpuHost
from discovery.docker_engines import EngineEndpoint, gpus_of, host_labels

GIB = 1024**3


class StaticGpuProvider:
    """The configured GPU hosts, as they are configured."""

    name = "static"

    def __init__(self, hosts: Sequence[StaticGpuHost]) -> None:
        self.configured = list(hosts)

    def discover(self) -> list[Host]:
        """One Host per configured GPU host (GPUs from the config, runtime assumed)."""
        hosts = []
        for cfg in self.configured:
            endpoint = EngineEndpoint(
                cfg.url, cfg.tls_ca, cfg.tls_cert, cfg.tls_key, cfg.tls_verify, cfg.timeout_s
            )
            hosts.append(
                Host(
                    name=cfg.name,
                    source="static",
                    docker_url=cfg.url,
                    cpus=float(cfg.cpus),
                    memory_bytes=int(cfg.memory_gb * GIB),
                    gpus=gpus_of(cfg.gpus),
                    # The operator declared GPUs: the host is expected to run them. A host
                    # that cannot is recognised at container start (gpu.is_no_gpu_runtime_error).
                    gpu_runtime=True,
                    labels=host_labels(endpoint, nats_url=cfg.nats_url, max_ops=cfg.max_ops),
                    tags=dict(cfg.labels),
                )
            )
        return hosts
