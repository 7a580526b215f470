"""GPU device requests for op containers, and recognising a host without a GPU runtime."""

from __future__ import annotations

from collections.abc import Sequence

import docker.types

from discovery.base import Gpu

#: What dockerd says when a container asks for GPUs on a host with no GPU runtime.
NO_GPU_RUNTIME_MARKER = 'could not select device driver "" with capabilities: [[gpu]]'


def device_requests(gpu_ids: list[str] | None, count: int) -> list[docker.types.DeviceRequest]:
    """The ``device_requests`` for a container that gets GPUs.

    ``gpu_ids`` (indexes or UUIDs reserved for this op) wins when given; otherwise
    ``count`` GPUs (``-1`` = all of them); nothing when neither asks for a GPU.
    """
    if gpu_ids:
        return [docker.types.DeviceRequest(device_ids=[str(i) for i in gpu_ids], capabilities=[["gpu"]])]
    if count:
        return [docker.types.DeviceRequest(count=count, capabilities=[["gpu"]])]
    return []


def gpu_device_ids(gpus: Sequence[Gpu]) -> list[str]:
    """The device ids to request for these GPUs: each one's ``device_id`` (UUID) when the
    config gives one, else its index."""
    return [g.device_id or str(g.index) for g in gpus]


def is_no_gpu_runtime_error(error: BaseException | str) -> bool:
    """Whether ``error`` (an exception or its message) is dockerd saying the host has no
    usable GPU runtime (the container was created but cannot start)."""
    if isinstance(error, BaseException):
        explanation = getattr(error, "explanation", None)
        text = f"{error} {explanation or ''}"
    else:
        text = error
    text = text.replace("\\", "")
    return NO_GPU_RUNTIME_MARKER in text or ("could not select device driver" in text and "[[gpu]]" in text)
