"""The operator scripts of images/lxc/ (Proxmox LXC workers) and images/enroll-host.sh.

The LXC scripts run against a recording fake of a Proxmox node (``tests/fake_pve``: ``pct``,
``pvesh``, ``pveam``, the host's ``nvidia-smi``, first on PATH, with state): the exact calls
for a template and for three workers, idempotent re-runs, ``--dry-run`` changing nothing
(only read-only queries: ``pvesh get``, ``pveam list``, ``pct status``, ``nvidia-smi``), and
clear errors. Each worker's certificate comes from a ``ktrdr-run`` stub and the "Docker
answers over TLS" wait from a stub that answers only when the worker's container serves
the certificate issued for its address.

``enroll-host.sh`` runs for real against a fresh dockerd this module starts with the
daemon.json the script wrote (its own data root, exec root, bridge and containerd
namespace): afterwards the engine answers over TCP+TLS with the client certificate,
refuses a client without one or with one from another CA, and has the runner image.
Every script passes ``shellcheck -x``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import msgspec
import pytest

from discovery.base import DiscoveryError
from discovery.config import ProxmoxWorkerTag
from discovery.docker_engines import connect_engine
from dispatcher.embedded import free_port
from tests.conftest import unavailable
from tests.fake_pve import FakePve
from tests.pki import Pki
from tests.second_dockerd import free_subnet, links_in, stop_pid_file, unmount_under

REPO = Path(__file__).resolve().parent.parent
IMAGE_TAG = "ktrdr-runner:cpu-test"
SCRIPTS = [
    "lxc/create-template.sh",
    "lxc/deploy-workers.sh",
    "lxc/gpu-passthrough.sh",
    "lxc/destroy-workers.sh",
    "enroll-host.sh",
]


@pytest.fixture(autouse=True)
def _perl_json() -> None:
    """The LXC scripts read pvesh's JSON with perl's JSON::PP (on every Proxmox node)."""
    if subprocess.run(["perl", "-MJSON::PP", "-e", "1"], capture_output=True).returncode != 0:
        unavailable("perl with JSON::PP is needed (apt-get install perl)")


@pytest.fixture
def node(tmp_path: Path) -> FakePve:
    return FakePve(tmp_path / "pve")


def small_image_tar(path: Path, tag: str = IMAGE_TAG) -> Path:
    """A stand-in for `ktrdr-run images export`: a docker-save tarball's manifest only."""
    with tarfile.open(path, "w") as tar:
        data = json.dumps([{"Config": f"{'ab' * 32}.json", "RepoTags": [tag], "Layers": []}]).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def image_tar(tmp_path: Path) -> Path:
    return small_image_tar(tmp_path / "runner.tar")


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    directory = tmp_path / "template-bundle"
    directory.mkdir()
    (directory / "ca.pem").write_text("STUB ca.pem\n")
    (directory / "server-cert.pem").write_text("STUB server certificate host=ktrdr-template\n")
    (directory / "server-key.pem").write_text("STUB key\n")
    return directory


def normalized(calls: list[list[str]], root: Path) -> list[str]:
    """Calls as command lines, with the scripts' temporary directories as $STAGE and the
    test's directory as $ROOT."""
    out = []
    for call in calls:
        line = " ".join(call)
        line = re.sub(re.escape(str(root)) + r"/pve/tmp/ktrdr-[a-z]+\.[A-Za-z0-9]+", "$STAGE", line)
        out.append(line.replace(str(root), "$ROOT"))
    return out


def create_template(
    node: FakePve, image_tar: Path, bundle: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    return node.run(
        "lxc/create-template.sh",
        "--vmid", "9000", "--storage", "local-lvm", "--image-tar", str(image_tar), "--certs", str(bundle),
        *extra,
    )  # fmt: skip


def deploy(node: FakePve, *extra: str, count: int = 3) -> subprocess.CompletedProcess[str]:
    return node.run(
        "lxc/deploy-workers.sh", "--template", "9000", "--count", str(count), "--first-vmid", "201", *extra
    )


def snapshot(node: FakePve) -> tuple[str, dict[str, str]]:
    """The state file and every config file, to compare before and after."""
    confs = {p.name: p.read_text() for p in sorted(node.lxc_dir.glob("*.conf"))}
    return node.state_file.read_text(), confs


# --- create-template.sh -------------------------------------------------------------------

TEMPLATE_CALLS = [
    "pvesh get /cluster/resources --type vm --output-format json",
    "pvesh get /nodes/pve1/storage --output-format json",
    "pvesh get /nodes/pve1/network --output-format json",
    "pveam list local",
    "pct create 9000 local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst --hostname ktrdr-template"
    " --ostype debian --unprivileged 1 --features nesting=1,keyctl=1 --cores 2 --memory 2048 --swap 512"
    " --rootfs local-lvm:16 --net0 name=eth0,bridge=vmbr0,ip=dhcp --onboot 0 --tags ktrdr-template",
    "pct start 9000",
    "pct exec 9000 -- ip -4 route show default",
    "pct exec 9000 -- env DEBIAN_FRONTEND=noninteractive apt-get update -q",
    "pct exec 9000 -- env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends"
    " docker.io apparmor ca-certificates curl",
    "pct exec 9000 -- mkdir -p /etc/docker/certs /etc/systemd/system/docker.service.d",
    "pct push 9000 $ROOT/template-bundle/ca.pem /etc/docker/certs/ca.pem --perms 0644",
    "pct push 9000 $ROOT/template-bundle/server-cert.pem /etc/docker/certs/server-cert.pem --perms 0644",
    "pct push 9000 $ROOT/template-bundle/server-key.pem /etc/docker/certs/server-key.pem --perms 0600",
    "pct push 9000 $STAGE/daemon.json /etc/docker/daemon.json --perms 0644",
    "pct push 9000 $STAGE/ktrdr-tls.conf /etc/systemd/system/docker.service.d/ktrdr-tls.conf --perms 0644",
    "pct exec 9000 -- systemctl daemon-reload",
    "pct exec 9000 -- systemctl restart docker",
    "pct exec 9000 -- docker info --format {{.ServerVersion}}",
    "pct push 9000 $ROOT/runner.tar /root/ktrdr-runner-image.tar --perms 0600",
    "pct exec 9000 -- docker load -i /root/ktrdr-runner-image.tar",
    "pct exec 9000 -- rm -f /root/ktrdr-runner-image.tar",
    "pct exec 9000 -- systemctl stop docker.socket docker.service",
    "pct exec 9000 -- rm -f /var/lib/docker/engine-id /var/lib/dbus/machine-id",
    "pct exec 9000 -- truncate -s 0 /etc/machine-id",
    "pct shutdown 9000 --timeout 120",
    "pct template 9000",
]


def test_create_template_makes_these_calls(
    node: FakePve, image_tar: Path, bundle: Path, tmp_path: Path
) -> None:
    result = create_template(node, image_tar, bundle)
    assert result.returncode == 0, result.stderr
    assert normalized(node.calls(), tmp_path) == TEMPLATE_CALLS
    template = node.guest(9000)
    assert (template["template"], template["status"]) == (1, "stopped")
    assert template["config"]["features"] == "nesting=1,keyctl=1"
    assert template["config"]["unprivileged"] == "1"
    assert "docker.io" in template["packages"]
    assert template["images"] == [IMAGE_TAG]
    assert "/root/ktrdr-runner-image.tar" not in template["pushed"]  # removed after the load
    daemon = json.loads(template["pushed"]["/etc/docker/daemon.json"]["text"])
    assert daemon == {
        "hosts": ["unix:///var/run/docker.sock", "tcp://0.0.0.0:2376"],
        "tls": True,
        "tlsverify": True,
        "tlscacert": "/etc/docker/certs/ca.pem",
        "tlscert": "/etc/docker/certs/server-cert.pem",
        "tlskey": "/etc/docker/certs/server-key.pem",
    }
    dropin = template["pushed"]["/etc/systemd/system/docker.service.d/ktrdr-tls.conf"]["text"]
    assert "ExecStart=\nExecStart=/usr/sbin/dockerd --containerd=" in dropin  # no -H fd://
    assert template["pushed"]["/etc/docker/certs/server-key.pem"]["perms"] == "0600"
    conf = (node.lxc_dir / "9000.conf").read_text()
    assert "template: 1" in conf and "features: nesting=1,keyctl=1" in conf
    assert f"{IMAGE_TAG}" in result.stderr  # docker load's own output
    assert result.stdout == ""


def test_create_template_picks_the_named_ostemplate(node: FakePve, image_tar: Path, bundle: Path) -> None:
    result = create_template(
        node, image_tar, bundle, "--ostemplate", "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"
    )
    assert result.returncode == 0, result.stderr
    assert node.guest(9000)["ostemplate"] == "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        ("qemu-9000", (), "--vmid 9000: VMID 9000 is taken by qemu 'qemu9000' on node pve1"),
        (
            "",
            ("--storage", "ceph-pool"),
            "--storage ceph-pool: node pve1 has no storage 'ceph-pool' (it has: local local-lvm)",
        ),
        ("nfs-on-pve2", ("--storage", "nfs"), "--storage nfs: node pve1 has no storage 'nfs'"),
        (
            "",
            ("--storage", "local"),
            "--storage local: it does not hold container volumes (content: backup,iso,vztmpl)",
        ),
        ("", ("--bridge", "vmbr7"), "--bridge vmbr7: node pve1 has no bridge 'vmbr7' (it has: vmbr0)"),
        (
            "no-ostemplate",
            (),
            "--ostemplate: no Debian 12 container template on node pve1 (looked in: local)",
        ),
        (
            "",
            ("--ostemplate", "ubuntu-24.04-standard_24.04-2_amd64.tar.zst"),
            "--ostemplate ubuntu-24.04-standard",
        ),
        ("", ("--cores", "0"), "--cores 0: must be at least 1"),
        ("", ("--ip", "10.0.0.5"), "--ip 10.0.0.5: give an address with its prefix length"),
        ("", ("--certs", "/nonexistent"), "--certs /nonexistent: no such directory"),
        ("", ("--vmid", "12"), "--vmid 12: must be at least 100"),
        ("", ("--frobnicate",), "unknown option --frobnicate"),
    ],
)
def test_create_template_errors(
    node: FakePve, image_tar: Path, bundle: Path, setup: str, args: tuple[str, ...], message: str
) -> None:
    if setup == "qemu-9000":
        node.add_guest(9000, type="qemu")
    state = node.state()
    if setup == "nfs-on-pve2":
        state["nodes"].append("pve2")
        state["storages"]["nfs"] = {"type": "nfs", "content": "rootdir,images", "nodes": ["pve2"]}
    if setup == "no-ostemplate":
        state["ostemplates"]["local"] = ["debian-11-standard_11.7-1_amd64.tar.zst"]
    node.save(state)
    before = snapshot(node)
    result = create_template(node, image_tar, bundle, *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    if setup == "no-ostemplate":
        assert "pveam download local debian-12-standard_" in result.stderr
    assert node.changing_calls() == []
    assert snapshot(node) == before


# --- deploy-workers.sh --------------------------------------------------------------------


def worker_calls(vmid: int, address: str, *, static: str = "") -> list[str]:
    name = f"ktrdr-worker-{vmid}"
    bundle_dir = f"$STAGE/{name}"
    net = f"ip={static}" if static else "ip=dhcp"
    calls = [
        f"pct clone 9000 {vmid} --hostname {name}",
        f"pct set {vmid} --net0 name=eth0,bridge=vmbr0,{net} --tags ktrdr-worker-deploying --onboot 1",
        f"pct start {vmid}",
    ]
    if not static:
        calls.append(f"pct exec {vmid} -- ip -4 -o addr show dev eth0 scope global")
    return [
        *calls,
        f"ktrdr-run certs issue {name} --ip {address} -o {bundle_dir}",
        f"pct push {vmid} {bundle_dir}/ca.pem /etc/docker/certs/ca.pem --perms 0644",
        f"pct push {vmid} {bundle_dir}/server-cert.pem /etc/docker/certs/server-cert.pem --perms 0644",
        f"pct push {vmid} {bundle_dir}/server-key.pem /etc/docker/certs/server-key.pem --perms 0600",
        f"pct exec {vmid} -- systemctl restart docker",
        f"tls-check {address} 2376 {bundle_dir}/ca.pem $ROOT/pve/ktrdr-state/certs/client-cert.pem"
        " $ROOT/pve/ktrdr-state/certs/client-key.pem",
        f"pct set {vmid} --tags ktrdr-worker",
    ]


@pytest.fixture(scope="module")
def built_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The fake node's state and config file after create-template.sh (made once)."""
    root = tmp_path_factory.mktemp("template")
    node = FakePve(root / "pve")
    image = small_image_tar(root / "runner.tar")
    bundle_dir = root / "template-bundle"
    bundle_dir.mkdir()
    for name in ("ca.pem", "server-cert.pem", "server-key.pem"):
        (bundle_dir / name).write_text(f"STUB {name}\n")
    result = create_template(node, image, bundle_dir)
    assert result.returncode == 0, result.stderr
    return node.state_file.read_text(), (node.lxc_dir / "9000.conf").read_text()


@pytest.fixture
def template(node: FakePve, built_template: tuple[str, str]) -> FakePve:
    """A node with the template 9000 that create-template.sh built."""
    state, conf = built_template
    node.state_file.write_text(state)
    (node.lxc_dir / "9000.conf").write_text(conf)
    return node


def test_deploy_three_workers_makes_these_calls(template: FakePve, tmp_path: Path) -> None:
    result = deploy(template)
    assert result.returncode == 0, result.stderr
    expected = ["pvesh get /cluster/resources --type vm --output-format json"]
    for vmid in (201, 202, 203):
        expected += worker_calls(vmid, f"10.10.0.{vmid}")
    assert normalized(template.calls(), tmp_path) == expected
    for vmid in (201, 202, 203):
        worker = template.guest(vmid)
        assert (worker["status"], worker["tags"], worker["template"]) == ("running", ["ktrdr-worker"], 0)
        assert worker["config"]["hostname"] == f"ktrdr-worker-{vmid}"
        assert worker["config"]["onboot"] == "1"
        assert worker["images"] == [IMAGE_TAG]  # from the template
        served = worker["pushed"]["/etc/docker/certs/server-cert.pem"]
        assert f"ips=10.10.0.{vmid}" in served["text"]
        assert worker["docker"]["serving_cert"] == served["sha256"]  # restarted after the push
    # the snippet is valid discovery config
    snippet = tomllib.loads(result.stdout)["discovery"]["proxmox"]["workers"][0]
    worker_tag = msgspec.convert(snippet, ProxmoxWorkerTag)
    assert worker_tag.tag == "ktrdr-worker"
    assert worker_tag.docker_url_template == "tcp://{address}:2376"
    assert worker_tag.tls_cert == str(template.root / "ktrdr-state/certs/client-cert.pem")
    for vmid in (201, 202, 203):
        assert f"  {vmid} ktrdr-worker-{vmid} 10.10.0.{vmid} deployed" in result.stderr


def test_deploy_again_skips_the_workers_that_exist(template: FakePve, tmp_path: Path) -> None:
    assert deploy(template).returncode == 0
    template.clear_calls()
    before = snapshot(template)
    again = deploy(template)
    assert again.returncode == 0, again.stderr
    for vmid in (201, 202, 203):
        assert f"worker {vmid} exists, skipped" in again.stderr
    assert template.changing_calls() == []
    assert snapshot(template) == before
    assert "[[discovery.proxmox.workers]]" in again.stdout
    # a longer range deploys only the new one
    template.clear_calls()
    longer = deploy(template, count=4)
    assert longer.returncode == 0, longer.stderr
    assert [c for c in normalized(template.calls(), tmp_path) if c.startswith("pct clone")] == [
        "pct clone 9000 204 --hostname ktrdr-worker-204"
    ]


def test_deploy_with_static_addresses_waits_for_tls(template: FakePve, tmp_path: Path) -> None:
    state = template.state()
    state["tls"]["fail_times"] = {"10.20.0.50": 3}  # Docker takes a moment to answer
    template.save(state)
    result = deploy(template, "--ip", "10.20.0.50/24", "--gateway", "10.20.0.1", count=2)
    assert result.returncode == 0, result.stderr
    calls = normalized(template.calls(), tmp_path)
    expected = ["pvesh get /cluster/resources --type vm --output-format json"]
    for vmid, address in ((201, "10.20.0.50"), (202, "10.20.0.51")):
        worker = worker_calls(vmid, address, static=f"{address}/24,gw=10.20.0.1")
        if vmid == 201:  # three failed checks, then the one that answers
            check = next(c for c in worker if c.startswith("tls-check"))
            worker[worker.index(check) : worker.index(check) + 1] = [check] * 4
        expected += worker
    assert calls == expected
    assert template.guest(202)["config"]["net0"] == "name=eth0,bridge=vmbr0,ip=10.20.0.51/24,gw=10.20.0.1"


def test_deploy_that_times_out_is_finished_by_a_rerun(template: FakePve, tmp_path: Path) -> None:
    state = template.state()
    state["tls"]["never"] = True
    template.save(state)
    failed = deploy(template, "--wait-s", "1", count=1)
    assert failed.returncode == 1
    assert "worker 201: Docker did not answer over TLS on 10.10.0.201:2376 within 1 s" in failed.stderr
    assert "pct exec 201 -- journalctl -u docker" in failed.stderr
    assert template.guest(201)["tags"] == ["ktrdr-worker-deploying"]  # discovery does not see it
    state = template.state()
    state["tls"]["never"] = False
    template.save(state)
    template.clear_calls()
    finished = deploy(template, count=1)
    assert finished.returncode == 0, finished.stderr
    assert (
        "worker 201 (ktrdr-worker-201): finishing (left half-deployed by an earlier run)" in finished.stderr
    )
    calls = normalized(template.calls(), tmp_path)
    assert not [c for c in calls if c.startswith(("pct clone", "pct start"))]  # it was running
    assert "pct status 201" in calls
    assert template.guest(201)["tags"] == ["ktrdr-worker"]


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (
            "no-template",
            (),
            "--template 9000: there is no guest 9000 in the cluster "
            "(build the template with create-template.sh",
        ),
        ("not-a-template", (), "--template 9000: CT 9000 is not a template"),
        (
            "qemu-202",
            (),
            "VMID 202 is taken by qemu 'qemu202' on node pve1 (tags: none), "
            "which is not a 'ktrdr-worker' worker; it is left untouched",
        ),
        (
            "lxc-202-other-tag",
            (),
            "VMID 202 is taken by lxc 'db' on node pve1 (tags: database), "
            "which is not a 'ktrdr-worker' worker",
        ),
        (
            "template-elsewhere",
            (),
            "--template 9000: the template is on node pve2, this is pve1: run this script there",
        ),
        ("", ("--count", "0"), "--count 0: must be at least 1"),
        ("", ("--tag", "KTRDR"), "--tag KTRDR: not a Proxmox tag"),
        (
            "",
            ("--ip", "10.0.0.250/24", "--count", "9"),
            "--ip 10.0.0.250/24: 9 addresses from 10.0.0.250 do not fit in /24",
        ),
        ("", ("--gateway", "10.0.0.1"), "--gateway is for a static --ip"),
        ("", ("--template",), "--template needs a value"),
    ],
)
def test_deploy_errors(node: FakePve, setup: str, args: tuple[str, ...], message: str) -> None:
    if setup != "no-template":
        status, template_flag = ("running", 0) if setup == "not-a-template" else ("stopped", 1)
        node.add_guest(9000, status=status, template=template_flag, packages=["docker.io"],
                       node="pve2" if setup == "template-elsewhere" else None)  # fmt: skip
    if setup == "qemu-202":
        node.add_guest(202, type="qemu")
    if setup == "lxc-202-other-tag":
        node.add_guest(202, tags=["database"], hostname="db")
    before = snapshot(node)
    result = deploy(node, *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert node.changing_calls() == []  # nothing cloned, not even 201
    assert snapshot(node) == before


# --- --dry-run ----------------------------------------------------------------------------


def test_dry_run_changes_nothing(node: FakePve, image_tar: Path, bundle: Path) -> None:
    before = snapshot(node)
    result = create_template(node, image_tar, bundle, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert (
        "+ pct create 9000 local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst --hostname ktrdr-template"
        in result.stdout
    )
    assert "+ pct template 9000" in result.stdout
    printed = [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert len(printed) == len(TEMPLATE_CALLS) - 4  # every change (the reads ran)
    assert node.changing_calls() == []
    assert [c[:2] for c in node.calls()] == [["pvesh", "get"]] * 3 + [["pveam", "list"]]
    assert snapshot(node) == before
    assert not any(node.tmp.iterdir())  # its staging directory is gone

    node.add_guest(9000, status="stopped", template=1, packages=["docker.io"])
    node.add_guest(201, tags=["ktrdr-worker"])
    node.clear_calls()
    before = snapshot(node)
    result = deploy(node, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "worker 201 exists, skipped" in result.stderr
    assert "+ pct clone 9000 202 --hostname ktrdr-worker-202" in result.stdout
    assert "+ pct set 203 --tags ktrdr-worker" in result.stdout
    assert "[[discovery.proxmox.workers]]" in result.stdout
    assert node.changing_calls() == []
    assert snapshot(node) == before


# --- gpu-passthrough.sh -------------------------------------------------------------------


@pytest.fixture
def gpu_node(tmp_path: Path) -> tuple[FakePve, dict[str, str]]:
    """A node with two GPUs, the driver loaded, and worker 201 running with a snapshot."""
    node = FakePve(tmp_path / "pve", gpu=True)
    state = node.state()
    state["host_gpu"]["gpus"] = [
        {"name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559},
        {"name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559},
    ]
    node.save(state)
    dev = tmp_path / "dev"
    (dev / "nvidia-caps").mkdir(parents=True)
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-modeset", "nvidia-uvm", "nvidia-uvm-tools"):
        (dev / name).touch()
    proc = tmp_path / "devices"
    proc.write_text("Character devices:\n  1 mem\n195 nvidia-frontend\n508 nvidia-uvm\n511 nvidia-caps\n")
    node.add_guest(201, tags=["ktrdr-gpu"], packages=["docker.io"], hostname="gpu-worker")
    conf = node.lxc_dir / "201.conf"
    conf.write_text(conf.read_text() + "\n[before-gpu]\nhostname: gpu-worker\nsnaptime: 1700000000\n")
    return node, {"NVIDIA_DEV_DIR": str(dev), "PROC_DEVICES": str(proc)}


GPU_LINES = [
    "lxc.cgroup2.devices.allow: c 195:* rwm",
    "lxc.cgroup2.devices.allow: c 508:* rwm",
    "lxc.cgroup2.devices.allow: c 511:* rwm",
    "lxc.mount.entry: /dev/nvidia0 dev/nvidia0 none bind,optional,create=file",
    "lxc.mount.entry: /dev/nvidia1 dev/nvidia1 none bind,optional,create=file",
    "lxc.mount.entry: /dev/nvidiactl dev/nvidiactl none bind,optional,create=file",
    "lxc.mount.entry: /dev/nvidia-modeset dev/nvidia-modeset none bind,optional,create=file",
    "lxc.mount.entry: /dev/nvidia-uvm dev/nvidia-uvm none bind,optional,create=file",
    "lxc.mount.entry: /dev/nvidia-uvm-tools dev/nvidia-uvm-tools none bind,optional,create=file",
    "lxc.mount.entry: /dev/nvidia-caps dev/nvidia-caps none bind,optional,create=dir",
]


def test_gpu_passthrough_adds_the_lines_once(
    gpu_node: tuple[FakePve, dict[str, str]], tmp_path: Path
) -> None:
    node, env = gpu_node
    result = node.run("lxc/gpu-passthrough.sh", "--vmid", "201", **env)
    assert result.returncode == 0, result.stderr
    conf = (node.lxc_dir / "201.conf").read_text()
    main, snapshot_section = conf.split("[before-gpu]")
    assert [line for line in main.splitlines() if line.startswith("lxc.")] == GPU_LINES
    assert "lxc." not in snapshot_section  # not in the snapshot's section
    calls = [c for c in normalized(node.calls(), tmp_path) if c.startswith("pct")]
    assert calls == [
        "pct status 201",
        "pct reboot 201",  # it was running: restarted to get the devices
        "pct exec 201 -- ip -4 route show default",
        "pct exec 201 -- env DEBIAN_FRONTEND=noninteractive apt-get update -q",
        "pct exec 201 -- env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends"
        " ca-certificates curl gpg",
        "pct exec 201 -- nvidia-smi -L",  # no driver user space inside yet
        "pct exec 201 -- curl -fsSL -o /root/nvidia-driver.run"
        " https://download.nvidia.com/XFree86/Linux-x86_64/550.54.15/NVIDIA-Linux-x86_64-550.54.15.run",
        "pct exec 201 -- sh /root/nvidia-driver.run --silent --no-kernel-module",
        "pct exec 201 -- rm -f /root/nvidia-driver.run",
        "pct exec 201 -- nvidia-smi -L",
        "pct exec 201 -- curl -fsSL -o /root/nvidia-container-toolkit.gpgkey https://nvidia.github.io/libnvidia-container/gpgkey",
        "pct exec 201 -- gpg --batch --yes --dearmor"
        " -o /usr/share/keyrings/nvidia-container-toolkit-keyring.gpg"
        " /root/nvidia-container-toolkit.gpgkey",
        "pct push 201 $STAGE/nvidia-container-toolkit.list"
        " /etc/apt/sources.list.d/nvidia-container-toolkit.list --perms 0644",
        "pct exec 201 -- env DEBIAN_FRONTEND=noninteractive apt-get update -q",
        "pct exec 201 -- env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nvidia-container-toolkit",
        "pct exec 201 -- nvidia-ctk runtime configure --runtime=docker",
        "pct exec 201 -- nvidia-ctk config --set nvidia-container-cli.no-cgroups --in-place",
        "pct exec 201 -- systemctl restart docker",
        "pct exec 201 -- docker info --format {{json .Runtimes}}",
    ]
    worker = node.guest(201)
    assert "nvidia" in worker["docker"]["runtimes"]
    assert worker["docker"]["ctk_settings"] == ["nvidia-container-cli.no-cgroups"]
    listing = worker["pushed"]["/etc/apt/sources.list.d/nvidia-container-toolkit.list"]["text"]
    assert listing == (
        "deb [signed-by=/usr/share/keyrings/nvidia-container-toolkit-keyring.gpg]"
        " https://nvidia.github.io/libnvidia-container/stable/deb/$(ARCH) /\n"
    )
    entry = '{ index = 0, model = "NVIDIA H100 80GB HBM3", memory_gb = 80 }'
    assert f"gpus = [{entry}, {entry.replace('index = 0', 'index = 1')}]" in result.stdout
    gpus = tomllib.loads(result.stdout.split("\n", 3)[-1])["gpus"]
    assert [g["index"] for g in gpus] == [0, 1]

    # again: no line added twice, no restart, the driver is not installed again
    node.clear_calls()
    again = node.run("lxc/gpu-passthrough.sh", "--vmid", "201", **env)
    assert again.returncode == 0, again.stderr
    assert (node.lxc_dir / "201.conf").read_text() == conf
    assert "already has the GPU lines" in again.stderr
    calls = [c for c in normalized(node.calls(), tmp_path) if c.startswith("pct")]
    assert "pct reboot 201" not in calls
    assert not [c for c in calls if "nvidia-driver.run" in c]
    assert node.guest(201).get("reboots") == 1


def test_gpu_passthrough_of_some_gpus(gpu_node: tuple[FakePve, dict[str, str]]) -> None:
    node, env = gpu_node
    result = node.run("lxc/gpu-passthrough.sh", "--vmid", "201", "--gpus", "1", "--skip-driver", **env)
    assert result.returncode == 0, result.stderr
    lines = [line for line in (node.lxc_dir / "201.conf").read_text().splitlines() if line.startswith("lxc.")]
    assert lines[:3] == [
        "lxc.cgroup2.devices.allow: c 195:1 rwm",
        "lxc.cgroup2.devices.allow: c 195:254 rwm",
        "lxc.cgroup2.devices.allow: c 195:255 rwm",
    ]
    assert "lxc.mount.entry: /dev/nvidia1 dev/nvidia1 none bind,optional,create=file" in lines
    assert not [line for line in lines if "/dev/nvidia0 " in line]
    assert '{ index = 1, model = "NVIDIA H100 80GB HBM3", memory_gb = 80 }' in result.stdout
    bad = node.run("lxc/gpu-passthrough.sh", "--vmid", "201", "--gpus", "0,5", **env)
    assert bad.returncode == 2
    assert "--gpus 0,5: there is no GPU 5" in bad.stderr


def test_gpu_passthrough_says_what_the_host_lacks(
    gpu_node: tuple[FakePve, dict[str, str]], tmp_path: Path
) -> None:
    node, _ = gpu_node
    state = node.state()
    state["host_gpu"]["works"] = False
    node.save(state)
    empty_dev = tmp_path / "empty-dev"
    empty_dev.mkdir()
    no_uvm = tmp_path / "no-uvm"
    no_uvm.write_text("195 nvidia-frontend\n")
    before = snapshot(node)
    result = node.run(
        "lxc/gpu-passthrough.sh", "--vmid", "201", NVIDIA_DEV_DIR=str(empty_dev), PROC_DEVICES=str(no_uvm)
    )
    assert result.returncode == 1
    assert "the host is not ready for GPU passthrough:" in result.stderr
    assert (
        "nvidia-smi fails: NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver"
        in result.stderr
    )
    assert f"{empty_dev}/nvidiactl is missing" in result.stderr
    assert f"no {empty_dev}/nvidia<N> device node" in result.stderr
    assert f"{empty_dev}/nvidia-uvm is missing (CUDA needs it): nvidia-modprobe -u -c=0" in result.stderr
    assert f"nvidia-uvm is not in {no_uvm}" in result.stderr
    assert snapshot(node) == before
    assert node.changing_calls() == []


def test_gpu_passthrough_without_a_driver_or_a_container(gpu_node: tuple[FakePve, dict[str, str]]) -> None:
    node, env = gpu_node
    missing = node.run("lxc/gpu-passthrough.sh", "--vmid", "555", **env)
    assert missing.returncode == 1
    assert (
        f"--vmid 555: no container 555 on this node ({node.lxc_dir}/555.conf does not exist)"
        in missing.stderr
    )
    if shutil.which("nvidia-smi") is not None:
        return  # this machine has a driver: "not found" cannot be shown here
    (node.bin / "nvidia-smi").unlink()
    plain = node.run("lxc/gpu-passthrough.sh", "--vmid", "201", **env)
    assert plain.returncode == 1
    assert "nvidia-smi not found: the NVIDIA driver is not installed on this host" in plain.stderr
    assert node.changing_calls() == []


def test_gpu_passthrough_dry_run(gpu_node: tuple[FakePve, dict[str, str]]) -> None:
    node, env = gpu_node
    before = snapshot(node)
    result = node.run("lxc/gpu-passthrough.sh", "--vmid", "201", "--dry-run", **env)
    assert result.returncode == 0, result.stderr
    assert f"+ add to {node.lxc_dir}/201.conf:\n    {GPU_LINES[0]}" in result.stdout
    assert "+ pct reboot 201" in result.stdout
    assert "+ pct exec 201 -- nvidia-ctk runtime configure --runtime=docker" in result.stdout
    assert snapshot(node) == before
    assert node.changing_calls() == []


# --- destroy-workers.sh -------------------------------------------------------------------


@pytest.fixture
def fleet(node: FakePve) -> FakePve:
    node.add_guest(9000, status="stopped", template=1, tags=["ktrdr-worker"])  # a template: never
    node.add_guest(201, tags=["ktrdr-worker"], hostname="w1")
    node.add_guest(202, status="stopped", tags=["ktrdr-worker"], hostname="w2")
    node.add_guest(203, tags=["monitoring"], hostname="grafana")
    node.add_guest(204, type="qemu", tags=["ktrdr-worker"])  # a VM: never
    node.add_guest(205, tags=["gpu", "ktrdr-worker"], hostname="w3")
    return node


def test_destroy_workers_refuses_without_a_terminal(fleet: FakePve) -> None:
    before = snapshot(fleet)
    result = fleet.run("lxc/destroy-workers.sh", "--tag", "ktrdr-worker")
    assert result.returncode == 1
    assert (
        "refusing to destroy 3 worker(s) without confirmation: stdin is not a terminal; pass --yes"
        in result.stderr
    )
    assert [line.split()[0] for line in result.stdout.splitlines()] == ["201", "202", "205"]
    assert fleet.changing_calls() == []
    assert snapshot(fleet) == before


def test_destroy_workers_with_yes(fleet: FakePve) -> None:
    result = fleet.run("lxc/destroy-workers.sh", "--tag", "ktrdr-worker", "--yes")
    assert result.returncode == 0, result.stderr
    assert [" ".join(c) for c in fleet.changing_calls()] == [
        "pct stop 201",
        "pct destroy 201 --purge 1",
        "pct destroy 202 --purge 1",  # it was stopped
        "pct stop 205",
        "pct destroy 205 --purge 1",
    ]
    assert sorted(fleet.state()["guests"], key=int) == ["203", "204", "9000"]
    assert not (fleet.lxc_dir / "201.conf").exists()
    again = fleet.run("lxc/destroy-workers.sh", "--tag", "ktrdr-worker", "--yes")
    assert again.returncode == 0
    assert "no worker carries the tag ktrdr-worker" in again.stderr


def test_destroy_workers_asks_on_a_terminal(fleet: FakePve) -> None:
    def answered(text: str) -> subprocess.CompletedProcess[str]:
        primary, secondary = pty.openpty()
        try:
            os.write(primary, text.encode())
            return subprocess.run(
                ["bash", str(REPO / "images/lxc/destroy-workers.sh"), "--tag", "ktrdr-worker"],
                stdin=secondary,
                capture_output=True,
                text=True,
                env=fleet.env(),
                timeout=30,
            )
        finally:
            os.close(primary)
            os.close(secondary)

    declined = answered("no\n")
    assert declined.returncode == 1
    assert "not confirmed; nothing was destroyed" in declined.stderr
    assert fleet.changing_calls() == []
    confirmed = answered("yes\n")
    assert confirmed.returncode == 0, confirmed.stderr
    assert sorted(fleet.state()["guests"], key=int) == ["203", "204", "9000"]


def test_destroy_workers_leaves_other_nodes_alone(fleet: FakePve) -> None:
    fleet.add_guest(301, node="pve2", tags=["ktrdr-worker"], hostname="remote")
    result = fleet.run("lxc/destroy-workers.sh", "--tag", "ktrdr-worker", "--yes")
    assert result.returncode == 1
    assert (
        "left 1 worker(s) on other nodes: 301 (pve2); run destroy-workers.sh --tag ktrdr-worker there"
        in result.stderr
    )
    assert "301" in fleet.state()["guests"]
    assert "201" not in fleet.state()["guests"]
    dry = fleet.run("lxc/destroy-workers.sh", "--tag", "Bad_Tag")
    assert dry.returncode == 2
    assert "--tag Bad_Tag: not a Proxmox tag" in dry.stderr


def test_destroy_workers_dry_run(fleet: FakePve) -> None:
    before = snapshot(fleet)
    result = fleet.run("lxc/destroy-workers.sh", "--tag", "ktrdr-worker", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "+ pct stop 201\n+ pct destroy 201 --purge 1\n+ pct destroy 202 --purge 1\n" in result.stdout
    assert fleet.changing_calls() == []
    assert snapshot(fleet) == before


# --- every script -------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script: str, node: FakePve) -> None:
    result = node.run(script, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Usage: ")
    assert "--dry-run" in result.stdout
    assert node.calls() == []
    wrong = node.run(script, "--no-such-option")
    assert wrong.returncode == 2
    assert "unknown option --no-such-option (see --help)" in wrong.stderr
    bare = node.run(script)
    assert bare.returncode == 2
    assert re.search(r"error: --[a-z-]+ is required", bare.stderr), bare.stderr
    assert node.calls() == []


def test_shellcheck() -> None:
    scripts = sorted(
        str(p.relative_to(REPO)) for d in ("images", "scripts") for p in (REPO / d).rglob("*.sh")
    )
    assert "images/lxc/lib.sh" in scripts and "images/enroll-host.sh" in scripts
    if shutil.which("shellcheck") is None:
        unavailable("shellcheck is not installed (bash scripts/setup.sh --dev installs it)")
    result = subprocess.run(
        ["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- enroll-host.sh -----------------------------------------------------------------------


def test_enroll_host_dry_run_and_errors(tmp_path: Path, image_tar: Path, bundle: Path, node: FakePve) -> None:
    target = tmp_path / "etc-docker"
    args = [
        "--bundle", str(bundle), "--image-tar", str(image_tar), "--no-install", "--name", "gpu-box",
        "--address", "10.0.0.20", "--daemon-json", f"{target}/daemon.json", "--cert-dir", f"{target}/certs",
        "--docker-host", f"unix://{tmp_path}/nothing.sock", "--restart-cmd", "false",
    ]  # fmt: skip
    result = node.run("enroll-host.sh", *args, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"+ install -D -m 0600 {bundle}/server-key.pem {target}/certs/server-key.pem" in result.stdout
    assert f"+ write {target}/daemon.json:" in result.stdout
    assert "+ bash -c false" in result.stdout
    assert "load -i" in result.stdout
    assert result.stdout.endswith("ktrdr-run hosts add gpu-box tcp://10.0.0.20:2376\n")
    assert not target.exists()
    for bad, message in [
        (["--bundle", str(tmp_path)], f"--bundle {tmp_path}: ca.pem is missing"),
        (["--listen", "2376"], "--listen 2376: give ADDRESS:PORT"),
        (
            ["--docker-host", "tcp://127.0.0.1:2375"],
            "--docker-host tcp://127.0.0.1:2375: give this engine's unix socket",
        ),
        (["--name", "-x"], "--name -x: letters, digits"),
        (["--name"], "--name needs a value"),
    ]:
        wrong = node.run("enroll-host.sh", *args, *bad, "--dry-run")
        assert wrong.returncode == 2, wrong.stderr
        assert message in wrong.stderr, wrong.stderr


class EnrollEngine:
    """What a fresh dockerd needs besides the config enroll-host.sh writes: its own data
    root, exec root, pidfile, Linux bridge, address pool and containerd namespace. The
    restart command the script is given (re)starts it with ``--config-file`` pointing at
    that daemon.json, so the TLS settings it uses are the script's."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.bridge = f"kbr{uuid.uuid4().hex[:8]}"
        subnet = free_subnet(
            (f"172.31.{n}.0/24" for n in range(199, 149, -1)), "the enrolled engine's bridge"
        )
        self.pool = str(free_subnet((f"10.{n}.0.0/16" for n in range(199, 149, -1)), "its address pool"))
        subprocess.run(["ip", "link", "add", self.bridge, "type", "bridge"], check=True, capture_output=True)
        gateway = f"{next(subnet.hosts())}/{subnet.prefixlen}"
        subprocess.run(["ip", "addr", "add", gateway, "dev", self.bridge], check=True, capture_output=True)
        subprocess.run(["ip", "link", "set", self.bridge, "up"], check=True, capture_output=True)
        self.socket = root / "docker.sock"
        self.daemon_json = root / "daemon.json"
        self.restart = root / "restart-dockerd.sh"
        self.restarts = root / "restarts"
        dockerd = shutil.which("dockerd") or "dockerd"
        self.restart.write_text(
            f"""#!/usr/bin/env bash
set -euo pipefail
root={root}
echo restart >>"$root/restarts"
if [ -f "$root/docker.pid" ]; then
    pid="$(cat "$root/docker.pid")"
    if grep -qa "$root" "/proc/$pid/cmdline" 2>/dev/null; then
        kill "$pid"
        while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    fi
fi
setsid {dockerd} --config-file "$root/daemon.json" --data-root "$root/data" --exec-root "$root/exec" \\
    --pidfile "$root/docker.pid" --bridge {self.bridge} --iptables=false --ip-masq=false --ip-forward=false \\
    --containerd-namespace ktrdr-{self.bridge} --containerd-plugins-namespace ktrdr-{self.bridge}-plugins \\
    --default-address-pool base={self.pool},size=24 >>"$root/dockerd.log" 2>&1 </dev/null &
"""
        )

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return "\n".join((self.root / "dockerd.log").read_text(errors="replace").splitlines()[-30:])
        return ""

    def stop(self) -> None:
        with (
            contextlib.suppress(Exception),
            contextlib.closing(docker.DockerClient(base_url=f"unix://{self.socket}", timeout=10)) as client,
        ):
            for container in client.containers.list(all=True):
                container.remove(force=True)
        stop_pid_file(self.root / "docker.pid", self.root, timeout_s=30)
        stop_pid_file(self.root / "exec" / "containerd" / "containerd.pid", self.root)
        unmount_under(self.root)
        for link in (self.bridge, *links_in(self.pool)):
            subprocess.run(["ip", "link", "del", link], capture_output=True)


@pytest.fixture
def enroll_engine(docker_client: docker.DockerClient) -> Iterator[EnrollEngine]:
    if os.geteuid() != 0:
        unavailable("a second dockerd needs root")
    for tool in ("dockerd", "docker", "ip", "curl", "python3"):
        if shutil.which(tool) is None:
            unavailable(f"enroll-host.sh's test needs {tool} on PATH")
    root = Path(tempfile.mkdtemp(prefix="kenroll-", dir="/tmp"))
    try:
        engine = EnrollEngine(root)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        yield engine
    finally:
        engine.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_enroll_host_for_real(
    enroll_engine: EnrollEngine, docker_client: docker.DockerClient, runner_image: str, tmp_path: Path
) -> None:
    engine = enroll_engine
    root = engine.root
    node = FakePve(tmp_path / "box", gpu=True)  # only for the box's nvidia-smi
    pki = Pki(root / "pki", name="lab")
    server_cert, server_key = pki.issue("gpu-box", server=True, ips=("127.0.0.1",), dns=("localhost",))
    client_cert, client_key = pki.issue("dispatcher", client=True)
    rogue_cert, rogue_key = Pki(root / "rogue", name="rogue").issue("intruder", client=True)
    bundle = root / "bundle"
    bundle.mkdir()
    shutil.copy(pki.ca_path, bundle / "ca.pem")
    shutil.copy(server_cert, bundle / "server-cert.pem")
    shutil.copy(server_key, bundle / "server-key.pem")
    image_tar = root / "runner.tar"
    with open(image_tar, "wb") as out:
        for chunk in docker_client.api.get_image(runner_image, chunk_size=4 * 1024 * 1024):
            out.write(chunk)
    # an engine that has settings of its own already (kept), and the nvidia runtime
    engine.daemon_json.write_text(
        json.dumps({"log-level": "warn", "runtimes": {"nvidia": {"path": "/bin/true"}}})
    )
    state = node.state()  # the box's GPUs, from the fake nvidia-smi
    state["host_gpu"]["gpus"] = [{"name": "NVIDIA L40S", "memory_mib": 46068}]
    node.save(state)
    args = [
        "--bundle", str(bundle), "--image-tar", str(image_tar), "--listen", f"127.0.0.1:{engine.port}",
        "--daemon-json", str(engine.daemon_json), "--cert-dir", str(root / "certs"),
        "--docker-host", f"unix://{engine.socket}", "--restart-cmd", f"bash {engine.restart}",
        "--no-install", "--name", "gpu-box", "--wait-s", "60",
    ]  # fmt: skip
    started = time.monotonic()
    result = node.run("enroll-host.sh", *args, timeout=240)
    assert result.returncode == 0, f"{result.stderr}\n--- dockerd:\n{engine.log_tail()}"
    assert (
        result.stdout
        == f"ktrdr-run hosts add gpu-box tcp://127.0.0.1:{engine.port} --gpu '0:NVIDIA L40S:45'\n"
    )
    assert "a client without a certificate is refused" in result.stderr
    config = json.loads(engine.daemon_json.read_text())
    assert config["log-level"] == "warn" and "nvidia" in config["runtimes"]
    assert config["hosts"] == [f"unix://{engine.socket}", f"tcp://127.0.0.1:{engine.port}"]
    assert (config["tls"], config["tlsverify"]) == (True, True)
    assert config["tlskey"] == str(root / "certs/server-key.pem")
    assert (root / "certs/server-key.pem").stat().st_mode & 0o777 == 0o600
    assert json.loads((root / "daemon.json.ktrdr-bak").read_text())["log-level"] == "warn"

    # the dispatcher's own client (discovery's connect_engine) reaches it with its certificate
    url = f"tcp://127.0.0.1:{engine.port}"
    ca = str(pki.ca_path)
    with contextlib.closing(
        connect_engine(url, tls_ca=ca, tls_cert=str(client_cert), tls_key=str(client_key), timeout_s=30)
    ) as client:
        assert client.images.get(runner_image).id == docker_client.images.get(runner_image).id
    for name, cert, key in (
        ("no client certificate", "", ""),
        ("a client certificate of another CA", str(rogue_cert), str(rogue_key)),
    ):
        with pytest.raises(DiscoveryError):
            connect_engine(url, tls_ca=ca, tls_cert=cert, tls_key=key, timeout_s=10).close()
            pytest.fail(f"the engine answered a client with {name}")

    # again: nothing to change, so no restart and no second load
    assert engine.restarts.read_text().count("restart") == 1
    again = node.run("enroll-host.sh", *args, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "nothing changed and Docker answers: not restarting it" in again.stderr
    assert f"the engine has {runner_image} already: not loading it again" in again.stderr
    assert engine.restarts.read_text().count("restart") == 1
    assert time.monotonic() - started < 150
