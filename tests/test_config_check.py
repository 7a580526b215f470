"""``ktrdr-run config check`` and ``ktrdr-run hosts``: the command functions, called the
way the CLI calls them (argparse namespace), against real files, a real nats-server, the
real Docker engine and the fake Proxmox API."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from discovery.base import Host
from discovery.docker_engines import EngineEndpoint
from discovery.health import HostStatus, publish_snapshot, snapshot_of
from dispatcher.config import Config
from dispatcher.embedded import EmbeddedNats, free_port
from dispatcher.jetstream import JetStreamHandles
from ktrdr_run.cli_hosts import cmd_config_check, cmd_hosts
from tests.proxmox_fake import FakeProxmox

SECRET = "a7f3c9e1-5b2d-4e8f-9c0a-1d2e3f4a5b6c"
LOCAL = "unix:///var/run/docker.sock"


@pytest.fixture
def pve(tmp_path: Path) -> Iterator[FakeProxmox]:
    server = FakeProxmox(tmp_path / "pve", token_value=SECRET).start()
    yield server
    server.stop()


def namespace(path: Path, *, as_json: bool = False) -> argparse.Namespace:
    return argparse.Namespace(config=path, json=as_json, timeout_s=3.0)


def write(tmp_path: Path, nats_url: str, body: str) -> Path:
    path = tmp_path / "ktrdr-run.toml"
    path.write_text(f'[nats]\nurl = "{nats_url}"\nembedded = false\n\n{body}')
    return path


def proxmox_block(host: str, port: int, *, ca_file: str = "", key: str = "token_name") -> str:
    return f"""
[[discovery.proxmox]]
name = "lab"
host = "{host}"
port = {port}
user = "ktrdr@pve"
{key} = "discovery"
token_value = "${{PVE_TOKEN}}"
ca_file = "{ca_file}"
timeout_s = 3

[[discovery.proxmox.workers]]
tag = "ktrdr-worker"
docker_url_template = "tcp://{{address}}:2375"
tls_verify = false
"""


async def test_typo_in_a_key_is_a_config_error_with_a_suggestion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PVE_TOKEN", SECRET)
    path = write(tmp_path, "nats://127.0.0.1:4222", proxmox_block("127.0.0.1", 8006, key="tokn_name"))
    assert await cmd_config_check(namespace(path), None) == 2
    out = capsys.readouterr()
    assert "config error:" in out.err
    assert "unknown field `tokn_name`" in out.err and "$.discovery.proxmox[0]" in out.err
    assert "did you mean `token_name`?" in out.err
    assert SECRET not in out.out + out.err


async def test_missing_token_is_a_config_error_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("PVE_TOKEN", raising=False)
    path = write(tmp_path, "nats://127.0.0.1:4222", proxmox_block("127.0.0.1", 8006))
    assert await cmd_config_check(namespace(path), None) == 2
    err = capsys.readouterr().err
    assert "${PVE_TOKEN} is referenced but not set in the environment" in err

    monkeypatch.setenv("PVE_TOKEN", "")
    assert await cmd_config_check(namespace(path), None) == 2
    err = capsys.readouterr().err
    assert 'token_value: the API token secret is required; set token_value = "${PVE_TOKEN}"' in err


async def test_bad_values_name_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    body = '[[discovery.engines]]\nname = "lab2"\nurl = "tcp://10.0.0.12:2376"\n'
    path = write(tmp_path, "nats://127.0.0.1:4222", body)
    assert await cmd_config_check(namespace(path, as_json=True), None) == 2
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False
    assert "tls_ca, tls_cert, tls_key: 'tcp://10.0.0.12:2376' is a tcp:// engine" in result["error"]
    assert "$.discovery.engines[0]" in result["error"]

    body = "[discovery]\nfailure_treshold = 3\n"
    path = write(tmp_path, "nats://127.0.0.1:4222", body)
    assert await cmd_config_check(namespace(path), None) == 2
    assert "did you mean `failure_threshold`?" in capsys.readouterr().err

    path = write(tmp_path, "nats://127.0.0.1:4222", "[discovry]\nrediscover_s = 30\n")
    assert await cmd_config_check(namespace(path), None) == 2
    assert "unknown field `discovry` (did you mean `discovery`?)" in capsys.readouterr().err


async def test_unreachable_proxmox_is_reported_and_exits_3(
    tmp_path: Path,
    nats_server: EmbeddedNats,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PVE_TOKEN", SECRET)
    port = free_port()
    path = write(tmp_path, nats_server.url, proxmox_block("127.0.0.1", port))
    assert await cmd_config_check(namespace(path), None) == 3
    out = capsys.readouterr()
    assert f"nats: {nats_server.url}: answering" in out.out
    assert (
        f"Proxmox lab (https://127.0.0.1:{port}) is unreachable ([Errno 111] Connection refused)" in out.out
    )
    assert "1 problem(s):" in out.out
    assert SECRET not in out.out + out.err


async def test_proxmox_workers_are_listed_and_their_engines_tried(
    tmp_path: Path,
    pve: FakeProxmox,
    nats_server: EmbeddedNats,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PVE_TOKEN", SECRET)
    path = write(tmp_path, nats_server.url, proxmox_block(pve.host, pve.port, ca_file=pve.ca_file))
    code = await cmd_config_check(namespace(path), None)
    out = capsys.readouterr()
    assert "lab: https://127.0.0.1:" in out.out and "ok: 4 worker(s) found" in out.out
    assert "pve:pve1/101:worker-a: tcp://10.10.0.101:2375 (plain TCP, no TLS): ENGINE UNREACHABLE" in out.out
    assert code == 3  # the fake's workers run no Docker engine
    assert SECRET not in out.out + out.err

    assert await cmd_config_check(namespace(path, as_json=True), None) == 3
    result = json.loads(capsys.readouterr().out)
    assert result["settings"]["discovery"]["proxmox"][0]["token_value"] == "***"
    assert SECRET not in json.dumps(result)


async def test_all_reachable_exits_0(
    tmp_path: Path, nats_server: EmbeddedNats, docker_client: object, capsys: pytest.CaptureFixture[str]
) -> None:
    body = f"""
[[discovery.engines]]
name = "again"
url = "{LOCAL}"

[[discovery.gpu_hosts]]
name = "gpu0"
url = "{LOCAL}"
gpus = [{{index = 0, model = "A10", memory_gb = 24}}]
"""
    path = write(tmp_path, nats_server.url, body)
    code = await cmd_config_check(namespace(path), None)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "docker (local): default socket: ok:" in out
    assert f"again: {LOCAL}: ok:" in out
    assert "gpu0: GPUs #0 A10 24 GB" in out
    assert "all configured hosts answer" in out


async def test_hosts_without_a_snapshot_discovers_and_says_so(
    config: Config, docker_client: object, capsys: pytest.CaptureFixture[str]
) -> None:
    args = argparse.Namespace(json=False, discover=False)
    assert await cmd_hosts(args, config) == 0
    out = capsys.readouterr()
    assert "the dispatcher has not published a snapshot" in out.err
    lines = out.out.splitlines()
    assert lines[0].split()[:3] == ["HOST", "SOURCE", "STATE"]
    assert "docker" in lines[1] and "available" in lines[1]


async def test_hosts_prints_the_published_snapshot(
    config: Config, js_handles: JetStreamHandles, capsys: pytest.CaptureFixture[str]
) -> None:
    from discovery.base import Gpu

    host = Host(
        "pve:pve1/101:worker-a",
        "proxmox:lab",
        "tcp://10.10.0.101:2376",
        4,
        8 * 2**30,
        gpus=(Gpu(0, "A10", 24),),
        gpu_runtime=True,
        labels=EngineEndpoint("tcp://10.10.0.101:2376").labels(),
        tags={"site": "lab", "gpu": "true"},
    )
    status = HostStatus(host=host, state="available", checked_at=1.0)
    await publish_snapshot(js_handles.hosts, [snapshot_of(status, used_cpus=1, used_gpus=1, running_ops=1)])
    assert await cmd_hosts(argparse.Namespace(json=False, discover=False), config) == 0
    out = capsys.readouterr()
    assert out.err == ""
    row = out.out.splitlines()[1].split()
    assert row[:4] == ["pve:pve1/101:worker-a", "proxmox:lab", "available", "3/4"]
    assert row[4] == "8.0/8.0" and row[5] == "0/1" and row[6:8] == ["A10", "24GB"] and row[8] == "1"
    assert row[-1] == "gpu=true,site=lab"  # its labels, what resources.host_labels matches

    assert await cmd_hosts(argparse.Namespace(json=True, discover=False), config) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["published"] is True and result["hosts"][0]["free_cpus"] == 3


def test_config_check_command_line(tmp_path: Path) -> None:
    """`ktrdr-run config check` from the shell: a typo'd key is a clear message, exit 2."""
    from tests.conftest import run_cli

    path = tmp_path / "ktrdr-run.toml"
    path.write_text('[[discovery.proxmox]]\nname = "lab"\nhost = "127.0.0.1"\ntoken_nmae = "x"\n')
    done = run_cli(["config", "check"], path)
    assert done.returncode == 2
    assert "token_nmae" in done.stdout + done.stderr
