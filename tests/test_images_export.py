"""``ktrdr-run images export FILE``: the runner image as a ``docker load`` tarball, for a
host with no registry. Loaded (through the API) into a fresh second dockerd that has no
image at all, it has the same tag and id, and the dispatcher runs a probe there with it,
reaching that engine over TLS with certificates from ``ktrdr-run certs``."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from discovery.docker_engines import connect_engine
from dispatcher.config import Config
from dispatcher.images import export_runner_image
from tests.second_dockerd import SecondDockerd
from tests.test_certs import ENGINE, Pki, make_pki, probe_on, run_cli, tls_dockerd


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def bare_engine(pki: Pki, docker_client: docker.DockerClient) -> Iterator[SecondDockerd]:
    """A second engine with no images, on TCP+TLS with a ``certs issue`` bundle."""
    with tls_dockerd(pki) as engine:
        yield engine


def engine_client(engine: SecondDockerd, pki: Pki) -> docker.DockerClient:
    """A client of ``engine`` over TCP+TLS (what an operator's ``docker --tlsverify`` is)."""
    return connect_engine(engine.tcp_url, **pki.certs.client_files(), timeout_s=120)


def load(client: docker.DockerClient, path: Path) -> None:
    with path.open("rb") as data:
        for chunk in client.api.load_image(data):
            assert "error" not in chunk, chunk


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.docker
@pytest.mark.nats
async def test_exported_image_loads_on_another_engine_and_runs_a_probe_there(
    config: Config,
    pki: Pki,
    bare_engine: SecondDockerd,
    runner_image: str,
    docker_client: docker.DockerClient,
    tmp_path: Path,
    no_leftover_containers: None,
) -> None:
    with contextlib.closing(engine_client(bare_engine, pki)) as target:
        assert target.images.list() == []  # a host with nothing on it
    tarball = tmp_path / "runner.tar"
    argv = ("images", "export", str(tarball), "--config", str(pki.config), "--json")
    code, out, err = await asyncio.to_thread(run_cli, *argv)  # main() runs its own event loop
    assert code == 0, err
    result = json.loads(out)
    image_id = docker_client.images.get(runner_image).id
    assert (result["image"], result["id"], result["file"]) == (runner_image, image_id, str(tarball))
    assert result["bytes"] == tarball.stat().st_size and result["sha256"] == sha256_of(tarball)
    assert result["compressed"] is False and f"wrote {runner_image}" in err
    assert [p.name for p in tmp_path.iterdir()] == ["runner.tar"]  # no temporary file left

    with contextlib.closing(engine_client(bare_engine, pki)) as target:
        load(target, tarball)
        loaded = target.images.get(runner_image)
        assert loaded.id == image_id and runner_image in loaded.tags

    # the dispatcher has no engine to copy the image from: it runs the loaded one
    record = await probe_on(config, bare_engine, pki, runner_image, "export")
    assert record["state"] == "completed", record.get("error")
    assert (record["host"], record["image"]) == (ENGINE, runner_image)


@pytest.fixture
def tiny_image(docker_client: docker.DockerClient) -> Iterator[str]:
    """A one-file image made here (a few bytes: no registry, no big export)."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    tag = "ktrdr-export-test:tiny"
    docker_client.api.import_image_from_data(data.getvalue(), repository="ktrdr-export-test", tag="tiny")
    yield tag
    with contextlib.suppress(docker.errors.ImageNotFound):
        docker_client.images.remove(tag, force=True)


@pytest.mark.docker
def test_export_streams_to_a_stream_and_gzips_by_name(
    tiny_image: str, pki: Pki, bare_engine: SecondDockerd, docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    image_id = docker_client.images.get(tiny_image).id
    stream = io.BytesIO()
    done = export_runner_image(docker_client, tiny_image, stream)
    assert (done.tag, done.image_id, done.compressed) == (tiny_image, image_id, False)
    assert (
        done.bytes == len(stream.getvalue()) and done.sha256 == hashlib.sha256(stream.getvalue()).hexdigest()
    )
    with tarfile.open(fileobj=io.BytesIO(stream.getvalue())) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert manifest[0]["RepoTags"] == [tiny_image]

    gz = tmp_path / "tiny.tar.gz"
    done = export_runner_image(docker_client, tiny_image, gz)
    assert done.compressed and gz.read_bytes()[:2] == b"\x1f\x8b"
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(gz.read_bytes()))) as tar:  # a tarball, gzipped
        assert json.load(tar.extractfile("manifest.json")) == manifest  # type: ignore[arg-type]
    with contextlib.closing(engine_client(bare_engine, pki)) as target:
        try:
            load(target, gz)  # docker load reads gzip
            assert target.images.get(tiny_image).id == image_id
        finally:
            target.images.remove(tiny_image, force=True)


def test_export_usage_errors(tmp_path: Path) -> None:
    config = tmp_path / "k.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    code, out, err = run_cli("images", "export", "-", "--json", "--config", str(config))
    assert (code, out) == (2, "") and "--json: with FILE '-' stdout carries the image" in err
    code, out, err = run_cli("images", "export", str(tmp_path), "--config", str(config))
    assert (code, out) == (2, "") and "is a directory" in err
