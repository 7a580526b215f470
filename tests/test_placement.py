"""Placement: ranking rules (pure) and KV compare-and-set reservations (real NATS)."""

from __future__ import annotations

import asyncio

import pytest

from discovery.base import Gpu, Host
from dispatcher.jetstream import JetStreamHandles
from dispatcher.placement import Placement, Usage, rank_hosts, why_never_placeable
from runner.protocol import Resources

GIB = 1024**3


def host(name: str, cpus: float, memory_gb: float, gpus: int = 0) -> Host:
    return Host(
        name=name,
        source="test",
        docker_url="",
        cpus=cpus,
        memory_bytes=int(memory_gb * GIB),
        gpus=tuple(Gpu(index=i, model="H100") for i in range(gpus)),
    )


def res(cpus: float = 1, memory_gb: float = 1, gpus: int = 0, gpu: str = "never") -> Resources:
    return Resources(cpus=cpus, memory_gb=memory_gb, gpus=gpus, gpu=gpu)  # type: ignore[arg-type]


def names(ranked: list[tuple[Host, tuple[str, ...]]]) -> list[str]:
    return [h.name for h, _ in ranked]


CPU_SMALL, CPU_BIG, GPU_BOX = host("small", 2, 4), host("big", 8, 32), host("gpu", 16, 64, gpus=2)
ALL = [CPU_SMALL, CPU_BIG, GPU_BOX]


def idle(_name: str) -> Usage:
    return Usage()


def test_least_load_breaks_ties_and_gpu_hosts_are_kept_for_gpu_work() -> None:
    assert names(rank_hosts(ALL, idle, res(), lambda h: True)) == ["big", "small", "gpu"]
    busy = {"big": Usage(cpus=7.5)}
    assert names(rank_hosts(ALL, lambda n: busy.get(n, Usage()), res(cpus=1), lambda h: True)) == [
        "small",
        "gpu",
    ]


def test_gpu_preferring_work_goes_to_gpu_hosts_first_then_falls_back_to_cpu() -> None:
    ranked = rank_hosts(ALL, idle, res(gpu="preferred"), lambda h: True)
    assert names(ranked) == ["gpu", "big", "small"]
    assert ranked[0][1] == ("0",) and ranked[1][1] == ()
    taken = {"gpu": Usage(gpu_ids=frozenset({"0", "1"}))}
    ranked = rank_hosts(ALL, lambda n: taken.get(n, Usage()), res(gpu="preferred"), lambda h: True)
    assert names(ranked) == ["big", "small"]  # GPUs busy: CPU fallback
    assert names(rank_hosts(ALL, idle, res(gpu="preferred"), lambda h: False)) == ["big", "small"]


def test_gpu_required_takes_specific_free_devices_only() -> None:
    partly = {"gpu": Usage(gpu_ids=frozenset({"0"}))}
    ranked = rank_hosts(ALL, lambda n: partly.get(n, Usage()), res(gpu="required"), lambda h: True)
    assert ranked == [(GPU_BOX, ("1",))]
    assert (
        rank_hosts(ALL, lambda n: partly.get(n, Usage()), res(gpus=2, gpu="required"), lambda h: True) == []
    )


def test_never_placeable_reasons_name_the_problem() -> None:
    assert why_never_placeable(ALL, res(cpus=4), lambda h: True) == ""
    assert "no host can fit cpus=32" in why_never_placeable(ALL, res(cpus=32), lambda h: True)
    assert why_never_placeable([CPU_SMALL, CPU_BIG], res(gpu="required"), lambda h: True).startswith(
        "gpu: required, but no GPU capacity exists"
    )
    assert "no GPU capacity" in why_never_placeable(ALL, res(gpu="required"), lambda h: False)
    assert "more than 2 GPU" in why_never_placeable(ALL, res(gpus=4, gpu="required"), lambda h: True)


@pytest.mark.nats
async def test_two_placers_racing_never_overcommit_a_host(js_handles: JetStreamHandles) -> None:
    """Two dispatchers' placement on one 4-CPU host: 20 concurrent 1-CPU reservations,
    exactly 4 succeed; releasing one frees exactly one slot."""
    one = host("shared", 4, 64)
    a, b = Placement(js_handles.reservations, "a"), Placement(js_handles.reservations, "b")
    results = await asyncio.gather(
        *((a if i % 2 else b).reserve(f"op{i}", res(cpus=1), [one], lambda h: True) for i in range(20))
    )
    won = [r for r in results if r is not None]
    assert len(won) == 4
    assert await a.reserved_ops("shared") == {r.op_id for r in won}
    placer_of = {f"op{i}": (a if i % 2 else b) for i in range(20)}
    other = b if placer_of[won[0].op_id] is a else a
    await other.release(won[0])  # not its reservation: a dispatcher frees only its own
    assert await a.reserved_ops("shared") == {r.op_id for r in won}
    await placer_of[won[0].op_id].release(won[0])
    assert await a.reserve("late", res(cpus=1), [one], lambda h: True) is not None
    assert await b.reserve("later", res(cpus=1), [one], lambda h: True) is None
