"""Placement constraints of an op (``resources.hosts``, ``avoid_hosts``, ``host_labels``,
``gpu_memory_gb``): which hosts may ever run it, and why each other host may not.

A host a constraint excludes is never a candidate, however idle it is; an op that no
known host may run fails at once with each host's reason (not a silent wait), while one
that is only short of free capacity waits as any op does.
"""

from __future__ import annotations

from collections.abc import Sequence

from discovery.base import Gpu, Host
from runner.protocol import Resources


def usable_gpus(host: Host, resources: Resources) -> Sequence[Gpu]:
    """The host's GPUs the op may take: all of them, or those with at least
    ``gpu_memory_gb`` (a GPU whose memory is unknown does not qualify then)."""
    if resources.gpu_memory_gb is None:
        return host.gpus
    return [g for g in host.gpus if g.memory_gb >= resources.gpu_memory_gb]


def host_excluded(host: Host, resources: Resources) -> str:
    """Why the op's constraints rule ``host`` out ("" when they allow it)."""
    if resources.hosts and host.name not in resources.hosts:
        return f"not in resources.hosts ({', '.join(resources.hosts)})"
    if host.name in resources.avoid_hosts:
        return "in resources.avoid_hosts"
    for key, wanted in sorted(resources.host_labels.items()):
        if key not in host.tags:
            return f"has no label {key!r} (resources.host_labels wants {key}={wanted})"
        if host.tags[key] != wanted:
            return f"label {key}={host.tags[key]}, resources.host_labels wants {key}={wanted}"
    if resources.gpu_memory_gb is not None and resources.gpu == "required":
        if not host.gpus:
            return f"no GPU (resources.gpu_memory_gb={resources.gpu_memory_gb:g})"
        wanted_gpus = max(1, resources.gpus or 0)
        if len(usable_gpus(host, resources)) < wanted_gpus:
            sizes = ", ".join(f"{g.memory_gb:g}" for g in host.gpus)
            return (
                f"GPU memory {sizes} GB; resources.gpu_memory_gb wants {resources.gpu_memory_gb:g} GB "
                f"on {wanted_gpus} GPU(s)"
            )
    return ""


def no_host_allows(hosts: Sequence[Host], resources: Resources) -> str:
    """When the constraints exclude every known host: each host and why ("" otherwise)."""
    if not resources.constrained or not hosts:
        return ""
    reasons = [(h.name, host_excluded(h, resources)) for h in hosts]
    if any(not why for _name, why in reasons):
        return ""
    return "no host may run it: " + "; ".join(f"{name}: {why}" for name, why in reasons)
