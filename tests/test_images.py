"""The runner image: content-addressed tags, and a real build run in a hardened container.

The Docker tests use the real engine. With CI set, a missing engine fails them; on a
workstation without Docker they are skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import docker.errors
import msgspec
import pytest

from dispatcher import images
from dispatcher.images import (
    FLAVORS,
    IMAGE_REPOSITORY,
    LABEL_DIGEST,
    ImageBuildError,
    ImagesConfig,
    ensure_runner_image,
    prune_runner_images,
    runner_image_digest,
    runner_image_tag,
    runner_source_dir,
)

TAG_RE = re.compile(r"^ktrdr-runner:cpu-[0-9a-f]{12}$")
IMPORT_CHECK = "import runner.protocol, msgspec, nats, numpy, pandas, pyarrow; print('ok')"
TEST_LABELS = {"ktrdr.test": "1"}


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _copy_runner(dest: Path) -> Path:
    shutil.copytree(runner_source_dir(), dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


# --- the tag (no Docker needed) ---------------------------------------------------------


def test_tag_format_and_stability() -> None:
    tag = runner_image_tag()
    assert TAG_RE.match(tag), tag
    assert runner_image_tag("cpu") == tag
    assert tag.endswith(runner_image_digest()[:12])


def test_tag_follows_every_byte_of_runner_source(tmp_path: Path) -> None:
    copy = _copy_runner(tmp_path / "runner")
    original = runner_image_tag(runner_dir=copy)
    assert original == runner_image_tag(), "a faithful copy must give the installed tag"

    target = copy / "protocol.py"
    data = target.read_bytes()
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x01
    target.write_bytes(bytes(flipped))
    assert runner_image_tag(runner_dir=copy) != original
    target.write_bytes(data)
    assert runner_image_tag(runner_dir=copy) == original

    # bytecode is not source
    (copy / "__pycache__").mkdir(exist_ok=True)
    (copy / "__pycache__" / "protocol.cpython-311.pyc").write_bytes(b"junk")
    (copy / "stray.pyc").write_bytes(b"junk")
    assert runner_image_tag(runner_dir=copy) == original

    # a new file, and a renamed one, both count
    (copy / "ops" / "extra.py").write_text("X = 1\n")
    with_extra = runner_image_tag(runner_dir=copy)
    assert with_extra != original
    (copy / "ops" / "extra.py").rename(copy / "ops" / "extra2.py")
    assert runner_image_tag(runner_dir=copy) not in (original, with_extra)


def test_tag_covers_base_requirements_and_dockerfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tag = runner_image_tag()
    assert runner_image_tag(config=ImagesConfig(base_image="debian:bookworm")) != tag
    assert runner_image_tag(config=ImagesConfig(offline_base="always")) != tag
    assert runner_image_tag(config=ImagesConfig(cache_dir=str(tmp_path))) == tag

    cpu = FLAVORS["cpu"]
    bumped = images.Flavor(cpu.name, cpu.dockerfile, (*cpu.requirements[:-1], "pyarrow==1.0"))
    monkeypatch.setitem(FLAVORS, "cpu", bumped)
    assert runner_image_tag() != tag
    monkeypatch.setitem(FLAVORS, "cpu", cpu)

    other = tmp_path / "images"
    shutil.copytree(images.IMAGES_DIR, other, ignore=shutil.ignore_patterns("__pycache__"))
    assert runner_image_tag() == tag
    monkeypatch.setattr(images, "IMAGES_DIR", other)
    (other / "Dockerfile").write_text((other / "Dockerfile").read_text() + "# changed\n")
    assert runner_image_tag() != tag


def test_unknown_flavor_is_a_clear_error() -> None:
    with pytest.raises(ImageBuildError, match="unknown runner image flavor 'tpu'"):
        runner_image_tag("tpu")


def test_images_config_is_strict() -> None:
    assert msgspec.convert({}, ImagesConfig) == ImagesConfig()
    assert ImagesConfig().base_image == "python:3.11-slim-bookworm"
    parsed = msgspec.toml.decode(b'offline_base = "always"\nwheelhouse = "/w"\n', type=ImagesConfig)
    assert parsed.offline_base == "always" and parsed.wheelhouse == "/w"
    with pytest.raises(msgspec.ValidationError, match="base_img"):
        msgspec.convert({"base_img": "x"}, ImagesConfig)
    with pytest.raises(msgspec.ValidationError, match="offline_base"):
        msgspec.convert({"offline_base": "sometimes"}, ImagesConfig)


# --- real Docker ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client() -> Iterator[docker.DockerClient]:
    try:
        engine = docker.from_env()
        engine.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means no engine
        message = f"no usable Docker engine ({exc}); run scripts/setup.sh to start one"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def runner_image(client: docker.DockerClient) -> str:
    return ensure_runner_image(client, progress=lambda line: None)


def _run(client: docker.DockerClient, image: str, code: str) -> tuple[int, str]:
    """Run ``python -c code`` in a hardened container; (exit code, output)."""
    container = client.containers.create(
        image,
        entrypoint=["python", "-c", code],
        user="65534:65534",
        read_only=True,
        tmpfs={"/tmp": ""},
        network_mode="none",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges:true"],
        labels=TEST_LABELS,
    )
    try:
        container.start()
        status = container.wait(timeout=120)
        return status["StatusCode"], container.logs().decode(errors="replace")
    finally:
        container.remove(force=True)


@pytest.mark.docker
def test_runner_image_runs_hardened(client: docker.DockerClient, runner_image: str) -> None:
    assert runner_image == runner_image_tag()
    code, output = _run(client, runner_image, IMPORT_CHECK)
    assert (code, output.strip()) == (0, "ok"), output

    code, output = _run(
        client,
        runner_image,
        "import os, runner.protocol as p; print(p.__file__); print(os.path.exists(p.__cached__))",
    )
    assert (code, output.split()) == (0, ["/opt/ktrdr/src/runner/protocol.py", "True"]), output


@pytest.mark.docker
def test_runner_image_metadata(client: docker.DockerClient, runner_image: str) -> None:
    attrs = client.images.get(runner_image).attrs
    config = attrs["Config"]
    assert config["User"] == "65534:65534"
    assert config["Entrypoint"] == ["python", "-m", "runner"]
    assert config["WorkingDir"] == "/tmp"
    assert "PYTHONDONTWRITEBYTECODE=1" in config["Env"]
    assert config["Labels"]["ktrdr.image"] == "runner"
    assert config["Labels"][LABEL_DIGEST] == runner_image_digest()
    # wheels must not be left in any layer: the image (base ~125 MB, venv with CPU torch
    # ~1,040 MB) stays under the venv + its wheels (the torch wheel alone is 192 MB)
    assert attrs["Size"] < 1250 * 1024 * 1024


@pytest.mark.docker
def test_present_image_is_found_fast(client: docker.DockerClient, runner_image: str) -> None:
    lines: list[str] = []
    started = time.perf_counter()
    assert ensure_runner_image(client, progress=lines.append) == runner_image
    assert time.perf_counter() - started < 1.0
    assert lines == []


@pytest.fixture
def build_changed(
    client: docker.DockerClient, runner_image: str, tmp_path: Path
) -> Iterator[Callable[..., tuple[str, str, list[str]]]]:
    """Builds images from changed copies of the runner source: (tag, marker, build output).

    Every image built (and every container made from one) is removed afterwards.
    """
    built: list[str] = []

    def build(edit_during_build: bool = False) -> tuple[str, str, list[str]]:
        marker = uuid.uuid4().hex
        copy = _copy_runner(tmp_path / marker)
        target = copy / "_ktrdr_test_marker.py"
        target.write_text(f"VALUE = {marker!r}\n")
        lines: list[str] = []

        def progress(line: str) -> None:
            lines.append(line)
            if edit_during_build and line.startswith("building the runner image"):
                target.write_text(f"VALUE = {marker[::-1]!r}\n")  # after the tag was computed

        tag = ensure_runner_image(client, progress=progress, runner_dir=copy)
        built.append(client.images.get(tag).id)
        return tag, marker, lines

    yield build
    for image_id in built:
        for container in client.containers.list(all=True, filters={"ancestor": image_id}):
            container.remove(force=True)
        try:
            client.images.remove(image_id, force=True)
        except docker.errors.ImageNotFound:
            pass


@pytest.mark.docker
def test_source_change_rebuilds_on_the_cached_venv(
    client: docker.DockerClient, runner_image: str, build_changed: Callable[..., tuple[str, str, list[str]]]
) -> None:
    first, _, _ = build_changed()  # re-creates the venv stage if a prune removed its cache
    tag, marker, lines = build_changed()
    assert TAG_RE.match(tag) and len({runner_image, first, tag}) == 3
    assert any("Using cache" in line for line in lines), "the wheel/venv layers were rebuilt"
    first_layers = client.images.get(first).attrs["RootFS"]["Layers"]
    layers = client.images.get(tag).attrs["RootFS"]["Layers"]
    assert layers[:-2] == first_layers[:-2]  # base + venv shared; src + bytecode new
    assert layers[-2:] != first_layers[-2:]
    code, output = _run(client, tag, "from runner._ktrdr_test_marker import VALUE; print(VALUE)")
    assert (code, output.strip()) == (0, marker), output


@pytest.mark.docker
def test_tag_names_the_source_actually_built(
    client: docker.DockerClient, build_changed: Callable[..., tuple[str, str, list[str]]], tmp_path: Path
) -> None:
    """The source is edited after the tag was computed: the image gets the tag of what it holds."""
    tag, marker, lines = build_changed(edit_during_build=True)
    assert any("source changed meanwhile" in line for line in lines), lines
    assert tag == runner_image_tag(runner_dir=tmp_path / marker)  # the edited copy
    code, output = _run(client, tag, "from runner._ktrdr_test_marker import VALUE; print(VALUE)")
    assert (code, output.strip()) == (0, marker[::-1]), output
    digest = client.images.get(tag).attrs["Config"]["Labels"][LABEL_DIGEST]
    assert tag.endswith(digest[:12])


@pytest.mark.docker
def test_prune_keeps_images_in_use(
    client: docker.DockerClient, runner_image: str, build_changed: Callable[..., tuple[str, str, list[str]]]
) -> None:
    tag, _, _ = build_changed()
    repo = f"{IMAGE_REPOSITORY}-test"
    stale, keep = f"{repo}:cpu-000000000000", f"{repo}:cpu-ffffffffffff"
    client.images.get(tag).tag(stale)
    client.images.remove(tag)  # only the test tag is left on the changed image
    client.images.get(runner_image).tag(keep)
    try:
        container = client.containers.create(stale, command=["true"], labels=TEST_LABELS)
        try:
            assert prune_runner_images(client, keep, repository=repo) == []
        finally:
            container.remove(force=True)
        assert prune_runner_images(client, keep, repository=repo) == [stale]
        with pytest.raises(docker.errors.ImageNotFound):
            client.images.get(stale)
        assert client.images.get(keep).id == client.images.get(runner_image).id
    finally:
        client.images.remove(keep)


@pytest.mark.docker
def test_missing_base_with_offline_never_is_a_clear_error(
    client: docker.DockerClient, tmp_path: Path
) -> None:
    config = ImagesConfig(
        base_image="ktrdr-test-missing-base:none", offline_base="never", cache_dir=str(tmp_path)
    )
    with pytest.raises(ImageBuildError, match=r"cannot be pulled.*offline_base"):
        ensure_runner_image(client, config=config, progress=lambda line: None)


@pytest.mark.docker
async def test_gpu_ops_get_the_cuda_image_where_the_engine_has_it(
    client: docker.DockerClient, runner_image: str
) -> None:
    """An op given GPUs runs the cuda flavor when the host's engine has it, else the CPU
    image; an op without GPUs always gets the CPU image. (The cuda image is stood in for by
    the CPU image tagged with the cuda flavor's tag: its build needs PyPI's CUDA wheels.)"""
    from discovery.docker_engines import engine_host
    from dispatcher.engine import DockerEngine
    from dispatcher.fleet import Fleet
    from dispatcher.runner_images import RunnerImages

    engine = DockerEngine(client, name="local")
    fleet = Fleet.single(engine, engine_host(client))
    images_ = RunnerImages(fleet, lambda: runner_image)
    assert images_.cuda_tag == runner_image_tag("cuda")
    assert images_.cuda_tag != runner_image
    assert await images_.on(engine, True) == runner_image  # no cuda image here: the CPU one
    client.images.get(runner_image).tag(images_.cuda_tag)
    try:
        assert await images_.on(engine, True) == images_.cuda_tag
        assert await images_.on(engine, False) == runner_image
    finally:
        client.images.remove(images_.cuda_tag)


def test_flavors_differ_only_in_torch() -> None:
    cpu, cuda, slim = (images.FLAVORS[f] for f in ("cpu", "cuda", "slim"))
    assert cpu.dockerfile == cuda.dockerfile == slim.dockerfile
    assert "torch==2.13.0+cpu" in cpu.requirements and "torch==2.13.0" in cuda.requirements
    assert not any(r.startswith("torch") for r in slim.requirements)
    assert cuda.public_index_only and not cpu.public_index_only
    assert len({runner_image_tag(f) for f in ("cpu", "cuda", "slim")}) == 3
