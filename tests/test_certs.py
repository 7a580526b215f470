"""``ktrdr-run certs init`` / ``certs issue``: the CA, the bundles and their files, and a
real second dockerd serving TCP+TLS with a bundle from ``certs issue``, which the
dispatcher reaches with the client certificate and runs a probe on; a client certificate
from another CA is refused.

``make_pki`` and ``start_tls_dockerd`` are shared with test_images_export and
test_hosts_add: ``start_tls_dockerd`` is tests/second_dockerd.py's engine started with
the given server certificate (and without an image unless asked for one).
"""

from __future__ import annotations

import contextlib
import datetime
import io
import json
import os
import re
import shutil
import stat
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import msgspec
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from discovery.base import DiscoveryError
from discovery.certs import DockerCa
from discovery.config import DiscoveryConfig, EngineConfig
from discovery.docker_engines import DockerEngineProvider, connect_engine
from dispatcher.config import Config
from ktrdr_run.cli import main
from runner.protocol import TERMINAL_STATES
from tests.conftest import unavailable
from tests.second_dockerd import EngineTls, SecondDockerd, start_second_dockerd, stop_second_dockerd
from tests.test_lifecycle import publish_job, wait_for_state
from tests.test_placement_engines import start, wait_hosts, with_discovery

ENGINE = "engine-t"


# --- shared helpers ---------------------------------------------------------------------


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``ktrdr-run ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@dataclass
class Pki:
    """A state directory whose ``certs/`` ktrdr-run made, and its config file."""

    config: Path
    certs: DockerCa
    bundle: Path

    @property
    def server(self) -> tuple[Path, Path, Path]:
        return self.bundle / "ca.pem", self.bundle / "server-cert.pem", self.bundle / "server-key.pem"


def make_pki(root: Path, host: str = ENGINE) -> Pki:
    """``certs init`` then ``certs issue HOST --ip 127.0.0.1`` in ``root/state``."""
    root.mkdir(parents=True, exist_ok=True)
    config = root / "ktrdr-run.toml"
    config.write_text(f'state_dir = "{root / "state"}"\n')
    code, _, err = run_cli("certs", "init", "--config", str(config))
    assert code == 0, err
    code, out, err = run_cli("certs", "issue", host, "--ip", "127.0.0.1", "--config", str(config), "--json")
    assert code == 0, err
    return Pki(config=config, certs=DockerCa(root / "state"), bundle=Path(json.loads(out)["bundle"]))


def start_tls_dockerd(
    pki: Pki, *, rogue: DockerCa | None = None, source: docker.DockerClient | None = None, image: str = ""
) -> SecondDockerd:
    """A second dockerd (tests/second_dockerd.py) on ``tcp://127.0.0.1:<port>`` with
    ``--tlsverify`` and the server bundle of ``pki``; loads ``image`` from ``source`` when
    given. Stop it with ``stop_second_dockerd``."""
    ca, cert, key = pki.server
    other = rogue or pki.certs
    tls = EngineTls(
        server_ca=ca,
        server_cert=cert,
        server_key=key,
        client_ca=pki.certs.ca_cert,
        client_cert=pki.certs.client_cert,
        client_key=pki.certs.client_key,
        rogue_cert=other.client_cert,
        rogue_key=other.client_key,
        rogue_ca=other.ca_cert,
    )
    return start_second_dockerd(source, image, tls=tls)


@contextlib.contextmanager
def tls_dockerd(pki: Pki, **kwargs: object) -> Iterator[SecondDockerd]:
    """:func:`start_tls_dockerd` for a fixture: unavailable (skip, or fail under CI) when
    a second engine cannot run here; always stopped afterwards."""
    if os.geteuid() != 0:
        unavailable("a second dockerd needs root")
    for tool in ("dockerd", "ip", "umount"):
        if shutil.which(tool) is None:
            unavailable(f"a second dockerd needs {tool} on PATH")
    try:
        engine = start_tls_dockerd(pki, **kwargs)  # type: ignore[arg-type]
    except (RuntimeError, OSError, subprocess.SubprocessError, docker.errors.DockerException) as exc:
        unavailable(f"could not start a second dockerd: {exc}")
    try:
        yield engine
    finally:
        stop_second_dockerd(engine)


def engine_config(engine: SecondDockerd, pki: Pki, name: str = ENGINE) -> EngineConfig:
    """The ``[[discovery.engines]]`` entry that ``certs init`` told us to write."""
    return EngineConfig(name=name, url=engine.tcp_url, **pki.certs.client_files(), timeout_s=5.0)


async def probe_on(
    config: Config, engine: SecondDockerd, pki: Pki, image: str, suffix: str
) -> dict[str, object]:
    """Run a probe through a dispatcher whose only host is ``engine`` (reached over TLS
    with the certificates of ``pki``); its final op record."""
    disc = DiscoveryConfig(engines=[engine_config(engine, pki)], local_engine=False, health_interval_s=1.0)
    cfg = with_discovery(config, disc, suffix)
    async with start(cfg, image) as (_service, fleet):
        await wait_hosts(fleet, 1)
        op_id = await publish_job(
            cfg.nats.url, {"job_id": f"{suffix}-{uuid.uuid4().hex[:8]}", "kind": "probe"}
        )
        return await wait_for_state(cfg.nats.url, op_id, set(TERMINAL_STATES), timeout_s=90)


def refused_by_tls(message: str, url: str) -> bool:
    """Whether a DiscoveryError says the engine at ``url`` turned our TLS client away.

    Over TLS 1.3 the engine checks the client certificate after the client's side of the
    handshake is done, sends an alert and closes: the client reads either that alert
    ("rejected our client certificate") or, when the close wins the race, an EOF
    ("TLS handshake ... failed (... EOF occurred in violation of protocol ...)")."""
    return f"the engine at {url} rejected our client certificate" in message or bool(
        re.search(
            rf"TLS handshake with {re.escape(url)} failed \(.*EOF occurred in violation of protocol", message
        )
    )


def engine_refused_a_client(engine: SecondDockerd) -> bool:
    """Whether the engine's own log says it refused a client certificate from another CA."""
    log = engine.log_path.read_text(errors="replace")
    return "tls: failed to verify client certificate: x509: certificate signed by unknown authority" in log


# --- the files ------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _years(cert: x509.Certificate) -> float:
    return (cert.not_valid_after_utc - cert.not_valid_before_utc) / datetime.timedelta(days=365)


def test_init_makes_a_ca_and_a_client_certificate_and_keeps_them(tmp_path: Path) -> None:
    config = tmp_path / "k.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    code, out, _ = run_cli("certs", "init", "--config", str(config))
    assert code == 0
    certs = tmp_path / "state" / "certs"
    assert "created a new CA in" in out and f'tls_ca = "{certs / "ca.pem"}"' in out
    assert (
        f'tls_cert = "{certs / "client-cert.pem"}"' in out
        and f'tls_key = "{certs / "client-key.pem"}"' in out
    )
    assert _mode(certs) == 0o700
    assert _mode(certs / "ca-key.pem") == 0o600 and _mode(certs / "client-key.pem") == 0o600
    ca = _cert(certs / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert 9.9 < _years(ca) < 10.1
    client = _cert(certs / "client-cert.pem")
    client.verify_directly_issued_by(ca)
    eku = client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert 2 <= _years(client) <= 3
    key = serialization.load_pem_private_key((certs / "client-key.pem").read_bytes(), None)
    assert key.public_key() == client.public_key()
    assert not [p for p in certs.iterdir() if p.name.endswith(".partial") or p.name.startswith(".ca")]

    before = {p.name: p.read_bytes() for p in certs.iterdir() if p.is_file()}
    code, out, _ = run_cli("certs", "init", "--config", str(config), "--json")
    assert code == 0
    result = json.loads(out)
    assert result["ca_created"] is False and result["client_issued"] is False
    assert result["config"] == {
        "tls_ca": str(certs / "ca.pem"),
        "tls_cert": str(certs / "client-cert.pem"),
        "tls_key": str(certs / "client-key.pem"),
    }
    assert {p.name: p.read_bytes() for p in certs.iterdir() if p.is_file()} == before
    code, out, _ = run_cli("certs", "init", "--config", str(config))
    assert out.startswith(f"kept the existing CA in {certs}")

    # a client certificate some other CA signed is replaced (by one of this CA)
    shutil.copy(make_pki(tmp_path / "other").certs.client_cert, certs / "client-cert.pem")
    code, out, _ = run_cli("certs", "init", "--config", str(config), "--json")
    assert json.loads(out)["client_issued"] is True
    _cert(certs / "client-cert.pem").verify_directly_issued_by(ca)


def test_issue_writes_a_server_bundle_and_makes_the_ca_when_missing(tmp_path: Path) -> None:
    config = tmp_path / "k.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    argv = ["certs", "issue", "worker-1", "--ip", "10.0.0.21", "--ip", "fd00::21", "--dns", "w1.lab"]
    code, out, err = run_cli(*argv, "--config", str(config), "--json")
    assert code == 0, err
    assert "created a new CA" in err and "client certificate" in err  # issue before init: said
    result = json.loads(out)
    bundle = tmp_path / "state" / "certs" / "hosts" / "worker-1"
    assert result["bundle"] == str(bundle) and result["ca_created"] is True
    assert sorted(p.name for p in bundle.iterdir()) == ["ca.pem", "server-cert.pem", "server-key.pem"]
    assert _mode(bundle / "server-key.pem") == 0o600 and _mode(bundle) == 0o700
    assert (bundle / "ca.pem").read_bytes() == (tmp_path / "state" / "certs" / "ca.pem").read_bytes()
    cert = _cert(bundle / "server-cert.pem")
    cert.verify_directly_issued_by(_cert(bundle / "ca.pem"))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["worker-1", "w1.lab"]
    assert [str(a) for a in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.21", "fd00::21"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    assert 2 <= _years(cert) <= 3
    key = serialization.load_pem_private_key((bundle / "server-key.pem").read_bytes(), None)
    assert key.public_key() == cert.public_key()
    assert (result["dns"], result["ips"]) == (["worker-1", "w1.lab"], ["10.0.0.21", "fd00::21"])

    # -o DIR; an address as HOST is an IP SAN; the CA is kept
    code, out, err = run_cli(
        "certs", "issue", "10.0.0.22", "-o", str(tmp_path / "b"), "--config", str(config)
    )
    assert code == 0 and "created a new CA" not in err
    assert f"{tmp_path / 'b' / 'server-key.pem'}  (mode 0600)" in out
    extension = _cert(tmp_path / "b" / "server-cert.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert [str(a) for a in extension.value.get_values_for_type(x509.IPAddress)] == ["10.0.0.22"]
    assert extension.value.get_values_for_type(x509.DNSName) == []


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["bad_host"], "HOST 'bad_host': not a host name"),
        (["a..b"], "HOST 'a..b': not a host name"),
        (["10.0.0.300"], "HOST '10.0.0.300': not a host name"),
        (["w1", "--ip", "10.0.0.300"], "--ip '10.0.0.300': not an IP address"),
        (["w1", "--ip", "w2"], "--ip 'w2': not an IP address"),
        (["w1", "--dns", "x/y"], "--dns 'x/y': not a host name"),
    ],
)
def test_bad_host_or_address_is_a_usage_error(tmp_path: Path, args: list[str], named: str) -> None:
    config = tmp_path / "k.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    code, out, err = run_cli("certs", "issue", *args, "--config", str(config))
    assert (code, out) == (2, "") and f"error: {named}" in err, err
    assert not (tmp_path / "state").exists()  # nothing made, not even the CA


# --- a real engine --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> DockerCa:
    """Another deployment's CA and client certificate, made the same way."""
    return make_pki(tmp_path_factory.mktemp("rogue"), host="elsewhere").certs


@pytest.fixture(scope="module")
def engine(
    pki: Pki, rogue: DockerCa, docker_client: docker.DockerClient, runner_image: str
) -> Iterator[SecondDockerd]:
    with tls_dockerd(pki, rogue=rogue, source=docker_client, image=runner_image) as running:
        yield running


@pytest.mark.docker
@pytest.mark.nats
async def test_the_dispatcher_runs_a_probe_over_tls_with_these_certificates(
    config: Config, engine: SecondDockerd, pki: Pki, runner_image: str, no_leftover_containers: None
) -> None:
    record = await probe_on(config, engine, pki, runner_image, "certs")
    assert record["state"] == "completed", record.get("error")
    assert record["host"] == ENGINE


@pytest.mark.docker
def test_a_client_certificate_from_another_ca_is_refused(
    engine: SecondDockerd, pki: Pki, rogue: DockerCa
) -> None:
    tls = pki.certs.client_files()
    with contextlib.closing(connect_engine(engine.tcp_url, **tls, name=ENGINE)) as client:
        assert client.info()["DockerRootDir"] == str(engine.data_root)  # ours: in

    with pytest.raises(DiscoveryError) as info:
        connect_engine(
            engine.tcp_url,
            tls_ca=tls["tls_ca"],
            tls_cert=str(rogue.client_cert),
            tls_key=str(rogue.client_key),
            name=ENGINE,
            timeout_s=5,
        )
    assert refused_by_tls(str(info.value), engine.tcp_url), info.value
    assert engine_refused_a_client(engine)
    # discovery keeps it, with no capacity and the error: health checks mark it down
    bad = msgspec.structs.replace(
        engine_config(engine, pki), tls_cert=str(rogue.client_cert), tls_key=str(rogue.client_key)
    )
    provider = DockerEngineProvider([bad])
    (host,) = provider.discover()
    assert host.cpus == 0 and refused_by_tls(provider.errors[ENGINE], engine.tcp_url)

    # and the engine's certificate is checked against our CA: another CA's does not vouch for it
    with pytest.raises(DiscoveryError, match=r"the engine's TLS certificate at .* is not trusted"):
        connect_engine(
            engine.tcp_url,
            tls_ca=str(rogue.ca_cert),
            tls_cert=tls["tls_cert"],
            tls_key=tls["tls_key"],
            name=ENGINE,
            timeout_s=5,
        )
