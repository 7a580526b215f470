"""``ktrdr-run hosts add NAME URL``: against a real engine (a second dockerd on TCP+TLS with
a ``certs issue`` bundle) it appends a valid entry and keeps every byte of the file before
it; a duplicate name, an engine that does not answer, or a file that would not load
leave the file as it was, with a message saying why."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import docker
import msgspec
import pytest

from discovery.config import EngineConfig, GpuSpec, StaticGpuHost
from dispatcher.config import load_config
from dispatcher.embedded import free_port
from ktrdr_run.cli import build_parser
from ktrdr_run.cli_hosts import cmd_hosts
from ktrdr_run.cli_hosts_add import cmd_hosts_add, parse_gpu
from tests.second_dockerd import SecondDockerd
from tests.test_certs import Pki, make_pki, refused_by_tls, run_cli, tls_dockerd

#: A config as people write them: comments, odd spacing, a Windows line end, non-ASCII
#: text, no newline at the end.
EXISTING = """# lab config   (keep this comment: Zürich rack)\r
state_dir = "{state}"

[nats]
url = "nats://127.0.0.1:4222"    # trailing comment

[discovery]
health_interval_s = 5
[[discovery.engines]]
name = "old-rig"
url = "unix:///run/other-docker.sock"
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def engine(pki: Pki, docker_client: docker.DockerClient) -> Iterator[SecondDockerd]:
    with tls_dockerd(pki) as running:
        yield running


def config_file(tmp_path: Path, pki: Pki, text: str = EXISTING) -> Path:
    path = tmp_path / "lab.toml"
    path.write_bytes(text.format(state=pki.config.parent / "state").rstrip("\n").encode())
    return path


def add(path: Path, *args: str) -> tuple[int, str, str]:
    return run_cli("hosts", "add", *args, "--config", str(path))


@pytest.mark.docker
def test_add_appends_an_engine_entry_and_keeps_the_file(
    engine: SecondDockerd, pki: Pki, tmp_path: Path
) -> None:
    path = config_file(tmp_path, pki)
    before = path.read_bytes()
    path.chmod(0o640)
    code, out, err = add(path, "rig-2", engine.tcp_url)
    assert code == 0, err
    assert f"rig-2: {engine.tcp_url} (TLS client certificate, verified): answers:" in out
    assert f"using the client certificate of `ktrdr-run certs` ({pki.certs.root})" in err
    after = path.read_bytes()
    assert after.startswith(before) and path.stat().st_mode & 0o777 == 0o640
    assert after[len(before) :].decode() == (
        "\n\n# added by `ktrdr-run hosts add`\n"
        "[[discovery.engines]]\n"
        'name = "rig-2"\n'
        f'url = "{engine.tcp_url}"\n'
        f'tls_ca = "{pki.certs.ca_cert}"\n'
        f'tls_cert = "{pki.certs.client_cert}"\n'
        f'tls_key = "{pki.certs.client_key}"\n'
    )
    engines = load_config(path).discovery.engines
    assert [e.name for e in engines] == ["old-rig", "rig-2"]
    assert engines[1] == EngineConfig(name="rig-2", url=engine.tcp_url, **pki.certs.client_files())
    assert not [p for p in tmp_path.iterdir() if p.name != "lab.toml"]  # no temporary file left

    # the same name again: refused, the file as it was
    code, out, err = add(path, "rig-2", engine.tcp_url)
    assert (code, out) == (2, "")
    assert f"NAME 'rig-2' is already configured in {path} ([[discovery.engines]])" in err
    assert path.read_bytes() == after
    code, _, err = add(path, "old-rig", engine.tcp_url)
    assert code == 2 and "'old-rig' is already configured" in err


@pytest.mark.docker
def test_an_engine_that_does_not_answer_is_not_added(engine: SecondDockerd, pki: Pki, tmp_path: Path) -> None:
    path = config_file(tmp_path, pki)
    before = path.read_bytes()
    url = f"tcp://127.0.0.1:{free_port()}"
    code, out, err = add(path, "ghost", url, "--timeout-s", "3")
    assert (code, out) == (3, "")
    assert f"nothing listens at {url}: is dockerd running" in err and f"{path} is unchanged" in err
    assert path.read_bytes() == before

    # an engine that answers, but not to our client certificate: the same
    rogue = make_pki(tmp_path / "rogue").certs
    code, out, err = add(
        path,
        "rig-3",
        engine.tcp_url,
        *("--tls-ca", str(pki.certs.ca_cert), "--tls-cert", str(rogue.client_cert)),
        *("--tls-key", str(rogue.client_key), "--json"),
    )
    result = json.loads(out)
    assert code == 3 and result["added"] is False and refused_by_tls(result["error"], engine.tcp_url), out
    assert path.read_bytes() == before


@pytest.mark.docker
def test_gpu_host_entry_with_explicit_tls_files(engine: SecondDockerd, pki: Pki, tmp_path: Path) -> None:
    path = tmp_path / "new" / "ktrdr-run.toml"  # no file yet: made with the entry alone
    path.parent.mkdir()
    tls = pki.certs.client_files()
    code, out, err = add(
        path,
        "gpu-box",
        engine.tcp_url,
        *("--gpu", "0:H100:80", "--gpu", "1:RTX:A6000:48.5", "--nats-url", "nats://10.0.0.5:4222"),
        *("--tls-ca", tls["tls_ca"], "--tls-cert", tls["tls_cert"], "--tls-key", tls["tls_key"]),
        "--json",
    )
    assert code == 0, err
    result = msgspec.json.decode(out)
    assert result["added"] is True and result["section"] == "discovery.gpu_hosts"
    assert "lists no nvidia runtime" in result["notes"][0]  # this engine has none
    assert path.read_text() == "# added by `ktrdr-run hosts add`\n" + result["text"]
    assert 'gpus = [{ index = 0, model = "H100", memory_gb = 80.0 }, ' in result["text"]
    (host,) = load_config(path).discovery.gpu_hosts
    assert host == StaticGpuHost(
        name="gpu-box",
        url=engine.tcp_url,
        nats_url="nats://10.0.0.5:4222",
        gpus=[
            GpuSpec(index=0, model="H100", memory_gb=80),
            GpuSpec(index=1, model="RTX:A6000", memory_gb=48.5),
        ],
        **tls,
    )
    code, _, err = add(path, "gpu-box", engine.tcp_url)  # names are shared by engines and GPU hosts
    assert code == 2 and "([[discovery.gpu_hosts]])" in err


@pytest.mark.docker
def test_a_file_that_would_not_load_is_left_alone(engine: SecondDockerd, pki: Pki, tmp_path: Path) -> None:
    # engines given as an inline array: TOML cannot append a [[discovery.engines]] table to it
    path = config_file(tmp_path, pki, 'state_dir = "{state}"\n[discovery]\nengines = []\n')
    before = path.read_bytes()
    code, out, err = add(path, "rig-2", engine.tcp_url)
    assert (code, out) == (2, "")
    assert f"{path} would not load with this host added, so it is unchanged" in err
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["lab.toml"]


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    path = tmp_path / "k.toml"
    path.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    before = path.read_bytes()
    code, _, err = add(path, "rig", "tcp://127.0.0.1:2376")  # no certs in this state directory
    assert code == 2 and "needs TLS files" in err and "ktrdr-run certs init" in err
    code, _, err = add(path, "rig", "tcp://127.0.0.1:2376", "--tls-ca", "/nonexistent/ca.pem")
    assert code == 2 and "--tls-ca /nonexistent/ca.pem: no such file" in err
    code, _, err = add(path, "bad name", "unix:///run/docker.sock")
    assert code == 2 and "'bad name' is not a valid name" in err
    code, _, err = add(path, "rig", "http://127.0.0.1:2376")
    assert code == 2 and "must start with unix://, tcp:// or ssh://" in err
    code, _, err = add(path, "rig", "unix:///run/docker.sock", "--gpu", "x:H100:80")
    assert code == 2 and "--gpu 'x:H100:80': expected INDEX:MODEL:MEMORY_GB" in err
    code, _, err = add(path, "rig", "unix:///run/docker.sock", "--gpu", "0:H100:lots")
    assert code == 2 and "'lots' is not a number of GB" in err
    code, _, err = add(path, "rig", "unix:///run/docker.sock", "--gpu", "0", "--gpu", "0")
    assert code == 2 and "gpus: index 0 is listed twice" in err
    assert path.read_bytes() == before
    code, _, err = add(tmp_path / "nowhere" / "k.toml", "rig", "unix:///run/docker.sock")
    assert code == 2 and "its directory does not exist" in err
    assert parse_gpu("2") == {"index": 2, "model": ""}
    assert parse_gpu("1:T4") == {"index": 1, "model": "T4"}


def test_hosts_alone_still_lists_and_add_is_a_subcommand() -> None:
    parser = build_parser()
    args = parser.parse_args(["hosts"])
    assert args.handler is cmd_hosts and args.hosts_command is None and not args.discover
    args = parser.parse_args(["hosts", "--discover", "--json"])
    assert args.handler is cmd_hosts and args.discover and args.json
    args = parser.parse_args(
        ["hosts", "add", "n", "unix:///x", "--gpu", "0:T4:16", "--config", "c.toml", "-v"]
    )
    assert args.handler is cmd_hosts_add and args.own_config is True
    assert (args.name, args.url, args.gpu, str(args.config), args.verbose) == (
        "n",
        "unix:///x",
        ["0:T4:16"],
        "c.toml",
        1,
    )
