"""A second, real dockerd for tests: its own data root, exec root, pidfile and sockets.

It listens on ``unix://<tmp>/docker.sock`` and on ``tcp://127.0.0.1:<port>`` with
``--tlsverify`` (a CA, a server certificate for 127.0.0.1 and a client certificate, made
here). It must not fight the default engine over ``docker0`` and iptables, so it gets a
Linux bridge of its own (``kbr<id>``, an unused 172.31.x.1/24) and ``--iptables=false
--ip-masq=false --ip-forward=false``: its containers reach the host, and so a
nats-server listening on 0.0.0.0, at the bridge's address (``gateway``), which is also
what ``DockerEngine.runner_nats_url`` derives from the engine's ``bridge`` network.

The runner image is streamed from the default engine into this one (``docker save`` ->
``docker load`` through the API, no temp file). Teardown removes its containers, stops
the daemon (and its containerd), unmounts whatever is left under its root, deletes the
bridge and the directories.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import docker
import pytest

from dispatcher.embedded import free_port
from tests.conftest import unavailable
from tests.pki import Pki


@dataclass
class SecondDockerd:
    """A running second engine and everything needed to reach it."""

    root: Path
    process: subprocess.Popen[bytes]
    unix_url: str
    tcp_url: str
    ca: Path
    client_cert: Path
    client_key: Path
    #: A client certificate from a CA the engine does not trust.
    rogue_cert: Path
    rogue_key: Path
    rogue_ca: Path
    bridge: str
    gateway: str
    data_root: Path
    #: The address pool its own networks take their subnets from (see stop_second_dockerd).
    pool: str = ""
    image: str = ""
    log_path: Path = field(default_factory=Path)

    def client(self) -> docker.DockerClient:
        """A client over the unix socket (no TLS)."""
        return docker.DockerClient(base_url=self.unix_url, timeout=60)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=30)


def free_subnet(candidates: Iterator[str], what: str) -> ipaddress.IPv4Network:
    """The first of ``candidates`` that overlaps no address or route of this machine."""
    used: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    routes = json.loads(_run("ip", "-j", "-4", "route", "show", "table", "all").stdout or "[]")
    for route in routes:
        dst = route.get("dst", "")
        with contextlib.suppress(ValueError):
            if dst and dst != "default":
                used.append(ipaddress.ip_network(dst, strict=False))
    for link in json.loads(_run("ip", "-j", "-4", "addr").stdout or "[]"):
        for addr in link.get("addr_info", []):
            used.append(ipaddress.ip_network(f"{addr['local']}/{addr['prefixlen']}", strict=False))
    for candidate in candidates:
        net = ipaddress.IPv4Network(candidate)
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError(f"no free subnet for {what}")


def unmount_under(root: Path) -> None:
    prefix = str(root)
    mounts = []
    with open("/proc/self/mountinfo") as info:
        for line in info:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                mounts.append(point)
    for point in sorted(mounts, key=len, reverse=True):
        _run("umount", "-l", point, check=False)


def stop_pid_file(path: Path, owner: Path, timeout_s: float = 15.0) -> None:
    """Stop the process whose id is in ``path`` if its command line names ``owner`` (so
    only a process this fixture's daemon started, never a reused pid)."""
    try:
        pid = int(path.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError):
        return
    if str(owner) not in cmdline:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)


@dataclass(frozen=True)
class EngineTls:
    """The certificates a second engine runs with: its server's (``server_*``, checked
    against ``client_ca``), a client's that it accepts, and a rogue client's it must not."""

    server_ca: Path
    server_cert: Path
    server_key: Path
    client_ca: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path
    rogue_ca: Path


def _test_tls(root: Path) -> EngineTls:
    pki = Pki(root / "certs", name="engine2")
    server_cert, server_key = pki.issue("engine2-server", server=True, ips=("127.0.0.1",), dns=("localhost",))
    client_cert, client_key = pki.issue("ktrdr-client", client=True)
    rogue = Pki(root / "rogue", name="rogue")
    rogue_cert, rogue_key = rogue.issue("intruder", client=True)
    return EngineTls(
        server_ca=pki.ca_path,
        server_cert=server_cert,
        server_key=server_key,
        client_ca=pki.ca_path,
        client_cert=client_cert,
        client_key=client_key,
        rogue_cert=rogue_cert,
        rogue_key=rogue_key,
        rogue_ca=rogue.ca_path,
    )


def start_second_dockerd(
    source: docker.DockerClient | None, image: str = "", *, tls: EngineTls | None = None
) -> SecondDockerd:
    """Start the second engine (with ``tls``, or certificates made here) and load ``image``
    into it from ``source`` when given; raises RuntimeError on failure."""
    root = Path(tempfile.mkdtemp(prefix="kd2-", dir="/tmp"))
    tls = tls or _test_tls(root)

    bridge_nets = (f"172.31.{third}.0/24" for third in range(250, 199, -1))
    subnet = free_subnet(bridge_nets, "the second engine's bridge")
    # Its own pool for the networks it creates (the runners' network), so that it never
    # competes with the default engine for 172.17-31.x and 192.168.x.
    pool = free_subnet((f"10.{second}.0.0/16" for second in range(250, 199, -1)), "the second engine's pool")
    gateway = str(next(subnet.hosts()))
    bridge = f"kbr{uuid.uuid4().hex[:8]}"
    _run("ip", "link", "add", bridge, "type", "bridge")
    port = free_port()
    (root / "daemon.json").write_text("{}")
    log_path = root / "dockerd.log"
    engine: SecondDockerd | None = None
    try:
        _run("ip", "addr", "add", f"{gateway}/{subnet.prefixlen}", "dev", bridge)
        _run("ip", "link", "set", bridge, "up")
        cmd = [
            shutil.which("dockerd") or "dockerd",
            "--config-file",
            str(root / "daemon.json"),
            "--data-root",
            str(root / "data"),
            "--exec-root",
            str(root / "exec"),
            "--pidfile",
            str(root / "docker.pid"),
            "-H",
            f"unix://{root / 'docker.sock'}",
            "-H",
            f"tcp://127.0.0.1:{port}",
            "--tlsverify",
            "--tlscacert",
            str(tls.server_ca),
            "--tlscert",
            str(tls.server_cert),
            "--tlskey",
            str(tls.server_key),
            "--bridge",
            bridge,
            "--iptables=false",
            "--ip-masq=false",
            "--ip-forward=false",
            "--containerd-namespace",
            f"ktrdr-{bridge}",
            "--containerd-plugins-namespace",
            f"ktrdr-{bridge}-plugins",
            "--default-address-pool",
            f"base={pool},size=24",
            "--log-level",
            "warn",
        ]
        with open(log_path, "wb") as log:
            process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        engine = SecondDockerd(
            root=root,
            process=process,
            unix_url=f"unix://{root / 'docker.sock'}",
            tcp_url=f"tcp://127.0.0.1:{port}",
            ca=tls.client_ca,
            client_cert=tls.client_cert,
            client_key=tls.client_key,
            rogue_cert=tls.rogue_cert,
            rogue_key=tls.rogue_key,
            rogue_ca=tls.rogue_ca,
            bridge=bridge,
            gateway=gateway,
            data_root=root / "data",
            pool=str(pool),
            log_path=log_path,
        )
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"dockerd exited with {process.returncode}:\n{engine.log_tail()}")
            try:
                with contextlib.closing(docker.DockerClient(base_url=engine.unix_url, timeout=5)) as probe:
                    probe.ping()
                break
            except docker.errors.DockerException:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"dockerd did not answer within 60 s:\n{engine.log_tail()}") from None
                time.sleep(0.3)
        if source is not None and image:
            with contextlib.closing(engine.client()) as target:
                for _ in target.api.load_image(source.api.get_image(image)):
                    pass
                target.images.get(image)  # raises if the load did not tag it
            engine.image = image
        return engine
    except BaseException:
        if engine is not None:
            stop_second_dockerd(engine)
        else:
            _run("ip", "link", "del", bridge, check=False)
            shutil.rmtree(root, ignore_errors=True)
        raise


def stop_second_dockerd(engine: SecondDockerd) -> None:
    """Remove its containers, stop it, unmount and delete everything it had.
    A daemon that stops keeps its networks' Linux bridges (``br-<id>``), each holding an
    address range until reboot; a daemon that was killed cannot be asked to remove them.
    So every link with an address in the engine's own pool is deleted after it stops."""
    with contextlib.suppress(Exception), contextlib.closing(engine.client()) as client:
        for container in client.containers.list(all=True):
            container.remove(force=True)
    if engine.process.poll() is None:
        engine.process.terminate()
        try:
            engine.process.wait(30)
        except subprocess.TimeoutExpired:
            engine.process.kill()
            engine.process.wait(10)
    stop_pid_file(engine.root / "exec" / "containerd" / "containerd.pid", engine.root)
    unmount_under(engine.root)
    for link in (engine.bridge, *links_in(engine.pool)):
        _run("ip", "link", "del", link, check=False)
    shutil.rmtree(engine.root, ignore_errors=True)


def links_in(pool: str) -> list[str]:
    """Names of this machine's network links with an IPv4 address inside ``pool``."""
    if not pool:
        return []
    network = ipaddress.IPv4Network(pool)
    return [
        link["ifname"]
        for link in json.loads(_run("ip", "-j", "-4", "addr").stdout or "[]")
        if any(ipaddress.IPv4Address(a["local"]) in network for a in link.get("addr_info", []))
    ]


@pytest.fixture(scope="session", name="second_dockerd")
def second_dockerd_fixture(docker_client: docker.DockerClient, runner_image: str) -> Iterator[SecondDockerd]:
    """A second real engine (see the module docstring), for the whole test session.
    Import ``second_dockerd_fixture`` into a test module to use ``second_dockerd``."""
    if os.geteuid() != 0:
        unavailable("a second dockerd needs root")
    for tool in ("dockerd", "ip", "umount"):
        if shutil.which(tool) is None:
            unavailable(f"a second dockerd needs {tool} on PATH")
    try:
        engine = start_second_dockerd(docker_client, runner_image)
    except (RuntimeError, OSError, subprocess.SubprocessError, docker.errors.DockerException) as exc:
        unavailable(f"could not start a second dockerd: {exc}")
    yield engine
    stop_second_dockerd(engine)
