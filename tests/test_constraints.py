"""Placement constraints (issue 15, started): which hosts an op may ever run on, and the
reasons it gives when none may. Pure placement logic on Host values; the end-to-end
tests with two real engines come with the discovery side (host labels from config,
Proxmox tags and engine labels)."""

from __future__ import annotations

import msgspec
import pytest

from discovery.base import Gpu, Host
from dispatcher.placement import Usage, rank_hosts, why_never_placeable
from runner.protocol import Job, Resources

GIB = 1024**3


def host(name: str, *, gpus: tuple[Gpu, ...] = (), tags: dict[str, str] | None = None) -> Host:
    return Host(
        name=name, source="test", docker_url="", cpus=8, memory_bytes=32 * GIB, gpus=gpus, tags=tags or {}
    )


CPU_A = host("cpu-a", tags={"site": "lab", "shared": "no"})
CPU_B = host("cpu-b", tags={"site": "lab", "shared": "yes"})
GPU_16 = host("gpu-16", gpus=(Gpu(0, "T4", 16.0), Gpu(1, "T4", 16.0)), tags={"site": "dc"})
GPU_80 = host("gpu-80", gpus=(Gpu(0, "H100", 80.0), Gpu(1, "A10", 24.0)), tags={"site": "dc"})
FLEET = [CPU_A, CPU_B, GPU_16, GPU_80]


def placed(resources: Resources, fleet: list[Host] = FLEET) -> list[tuple[str, tuple[str, ...]]]:
    resolved = resources.resolved(Resources(cpus=1.0, memory_gb=1.0))
    return [(h.name, gpus) for h, gpus in rank_hosts(fleet, lambda _n: Usage(), resolved, lambda _h: True)]


def never(resources: Resources, fleet: list[Host] = FLEET) -> str:
    return why_never_placeable(fleet, resources.resolved(Resources(cpus=1.0, memory_gb=1.0)), lambda _h: True)


def test_hosts_and_avoid_hosts_limit_where_an_op_goes() -> None:
    assert {n for n, _ in placed(Resources(hosts=("cpu-b", "gpu-16")))} == {"cpu-b", "gpu-16"}
    assert "cpu-a" not in {n for n, _ in placed(Resources(avoid_hosts=("cpu-a",)))}
    assert placed(Resources(hosts=("cpu-a",), avoid_hosts=("cpu-a",))) == []


def test_every_host_label_must_match() -> None:
    assert [n for n, _ in placed(Resources(host_labels={"site": "lab", "shared": "no"}))] == ["cpu-a"]
    assert {n for n, _ in placed(Resources(host_labels={"site": "dc"}))} == {"gpu-16", "gpu-80"}


def test_gpu_memory_picks_only_gpus_big_enough() -> None:
    big = Resources(gpu="required", gpus=1, gpu_memory_gb=40)
    assert placed(big) == [("gpu-80", ("0",))]  # the H100, not the A10 beside it
    two = Resources(gpu="required", gpus=2, gpu_memory_gb=20)
    assert placed(two) == [("gpu-80", ("0", "1"))]
    assert placed(Resources(gpu="required", gpus=2, gpu_memory_gb=40)) == []


def test_an_op_no_host_may_run_says_why_for_each_host() -> None:
    said = never(Resources(gpu="required", gpu_memory_gb=100))
    assert said.startswith("no host may run it: ")
    assert "gpu-16: GPU memory 16, 16 GB; resources.gpu_memory_gb wants 100 GB" in said
    assert "gpu-80: GPU memory 80, 24 GB" in said
    assert "cpu-a: no GPU (resources.gpu_memory_gb=100)" in said
    said = never(Resources(hosts=("cpu-a",), avoid_hosts=("cpu-a",), host_labels={"site": "lab"}))
    assert "cpu-a: in resources.avoid_hosts" in said and "cpu-b: not in resources.hosts (cpu-a)" in said
    said = never(Resources(host_labels={"rack": "7"}))
    assert "gpu-80: has no label 'rack' (resources.host_labels wants rack=7)" in said
    # only short of free room is not "never": it waits
    assert never(Resources(hosts=("gpu-80",), gpu="required", gpu_memory_gb=80)) == ""


def test_constraints_are_validated_strictly_and_kept_in_the_record() -> None:
    decode = msgspec.json.Decoder(Job).decode
    job = decode(b'{"job_id":"j1","kind":"probe","resources":{"hosts":["a"],"host_labels":{"site":"lab"}}}')
    resolved = job.resources.resolved(Resources(cpus=0.5, memory_gb=0.5))
    assert resolved.hosts == ("a",) and resolved.host_labels == {"site": "lab"} and resolved.cpus == 0.5
    for bad, where in (
        (b'{"gpu_memory_gb": -1}', "$.resources.gpu_memory_gb"),
        (b'{"hosts": "a"}', "$.resources.hosts"),
        (b'{"host_labels": {"bad key!": "x"}}', "$.resources.host_labels"),
        (b'{"avoid": ["a"]}', "avoid"),
    ):
        with pytest.raises(msgspec.ValidationError, match=r"resources"):
            decode(b'{"job_id":"j1","kind":"probe","resources":' + bad + b"}")
        try:
            decode(b'{"job_id":"j1","kind":"probe","resources":' + bad + b"}")
        except msgspec.ValidationError as exc:
            assert where in str(exc), (bad, str(exc))
