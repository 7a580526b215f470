"""The runner image: its content-addressed tag, an offline-capable build, and pruning.

The tag ``ktrdr-runner:<flavor>-<12 hex>`` is a sha256 over everything that goes into the
image (runner source, Dockerfile, pinned requirements, base image setting), so a change
of runner code gives a new tag and a stale image is never used. ``ensure_runner_image``
is called before every op: when the tag exists it costs one Docker API call (the source
digest is computed once per process).

Building needs no registry: the base image is pulled if possible, otherwise a Debian
bookworm base is bootstrapped offline (``images/bootstrap-base.sh``); the Python
requirements come from a host-built wheelhouse and are installed with ``--no-index``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import gzip
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Final, Literal

import docker
import docker.errors
import msgspec

from images import IMAGES_DIR

Progress = Callable[[str], None]

IMAGE_REPOSITORY: Final = "ktrdr-runner"
DEFAULT_BASE_IMAGE: Final = "python:3.11-slim-bookworm"
OFFLINE_BASE_IMAGE: Final = "ktrdr-base:bookworm-py311"
LABEL_IMAGE: Final = "ktrdr.image"
LABEL_DIGEST: Final = "ktrdr.digest"
LABEL_FLAVOR: Final = "ktrdr.flavor"
LABEL_BASE: Final = "ktrdr.base"

# What the runner imports inside the container, pinned to the versions the project is
# developed and tested with. Transitive dependencies are resolved by pip download.
RUNNER_REQUIREMENTS: Final[tuple[str, ...]] = (
    "msgspec==0.22.0",
    "nats-py==2.16.0",
    # signs the server's nonce with the op's credentials (runner/natscreds.py)
    "pynacl==1.6.2",
    "cffi==2.1.1",
    "pycparser==3.12",
    "numpy==2.4.6",
    "pandas==3.1.1",
    "pyarrow==26.0.1",
    # pandas' own dependencies, pinned so the tag says exactly what is in the image
    "python-dateutil==4.0.0",
    "tzdata==2026.6",
)

# torch for the `train` op, CPU build: the wheel pip finds on these machines (its own
# dependencies pinned too). Only the train op imports torch, so probe and backtest
# containers start as fast as without it (bench/image_start.py measures that).
TORCH_CPU_REQUIREMENTS: Final[tuple[str, ...]] = (
    "torch==2.13.0+cpu",
    "filelock==4.3.1",
    "fsspec==2026.9.0",
    "jinja2==3.1.6",
    "markupsafe==3.0.4",
    "mpmath==1.3.0",
    "networkx==3.6.1",
    "setuptools==84.2.1",
    "sympy==1.14.0",
    "typing-extensions==4.16.0",
)
# torch for GPU hosts: PyPI's default build, which brings CUDA's runtime libraries as
# nvidia-* wheels (several GB); built only where such a registry answers, on purpose.
TORCH_CUDA_REQUIREMENTS: Final[tuple[str, ...]] = ("torch==2.13.0",)

# The image's Python: wheels are downloaded for exactly this interpreter.
PYTHON_VERSION: Final = "3.11"
PYTHON_ABI: Final = "cp311"


class ImageBuildError(Exception):
    """The runner image (or its base, or its wheelhouse) could not be built."""


@dataclass(frozen=True, slots=True)
class Flavor:
    """One kind of runner image: which Dockerfile and which requirements."""

    name: str
    dockerfile: str
    requirements: tuple[str, ...]
    #: Download wheels from the public index only (not the host's local wheel folders,
    #: whose CPU torch would otherwise win the resolution).
    public_index_only: bool = False


# cpu: every op, torch on the CPU. cuda: the same with CUDA torch, for hosts with GPUs
# (the dispatcher uses it there when the host's engine has it). slim: no torch, for
# hosts that never train, and the reference of bench/image_start.py.
FLAVORS: Final[dict[str, Flavor]] = {
    "cpu": Flavor("cpu", "Dockerfile", RUNNER_REQUIREMENTS + TORCH_CPU_REQUIREMENTS),
    "cuda": Flavor(
        "cuda", "Dockerfile", RUNNER_REQUIREMENTS + TORCH_CUDA_REQUIREMENTS, public_index_only=True
    ),
    "slim": Flavor("slim", "Dockerfile", RUNNER_REQUIREMENTS),
}


class ImagesConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How runner images are built.

    ``base_image`` is used when present locally or pullable. ``offline_base``: "auto"
    bootstraps a Debian base offline when it is not; "always" never tries the registry;
    "never" makes a missing base an error. ``wheelhouse`` points at a pre-built folder of
    wheels (air-gapped hosts); otherwise wheels are downloaded once into ``cache_dir``.
    """

    base_image: str = DEFAULT_BASE_IMAGE
    offline_base: Literal["auto", "always", "never"] = "auto"
    cache_dir: str = "~/.cache/ktrdr-run"
    wheelhouse: str | None = None
    debian_mirror: str = "http://deb.debian.org/debian"


# --- the tag ----------------------------------------------------------------------------


def _flavor(name: str) -> Flavor:
    try:
        return FLAVORS[name]
    except KeyError:
        raise ImageBuildError(
            f"unknown runner image flavor {name!r}; known: {', '.join(sorted(FLAVORS))}"
        ) from None


@functools.cache
def runner_source_dir() -> Path:
    """The folder of the installed ``runner`` package (what goes into the image)."""
    import runner

    return Path(runner.__file__).resolve().parent


def _source_files(runner_dir: Path) -> list[tuple[str, Path]]:
    """Every file of the package, as sorted (relative posix path, path); no bytecode."""
    files = []
    for path in runner_dir.rglob("*"):
        rel = path.relative_to(runner_dir)
        if "__pycache__" in rel.parts or path.suffix in (".pyc", ".pyo") or not path.is_file():
            continue
        files.append((rel.as_posix(), path))
    return sorted(files)


def _source_digest(runner_dir: Path) -> bytes:
    digest = hashlib.sha256()
    for rel, path in _source_files(runner_dir):
        data = path.read_bytes()
        digest.update(f"{rel}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.digest()


_cached_source_digest = functools.lru_cache(maxsize=8)(_source_digest)


def _base_key(config: ImagesConfig) -> str:
    return OFFLINE_BASE_IMAGE if config.offline_base == "always" else config.base_image


def runner_image_digest(
    flavor: str = "cpu", *, config: ImagesConfig | None = None, runner_dir: Path | None = None
) -> str:
    """The full sha256 hex that names a runner image.

    It covers every runner source file (sorted paths and bytes, no bytecode), the
    flavor's Dockerfile, its requirements and the base image setting. ``runner_dir``
    (default: the installed package, digested once per process) is read afresh each call.
    """
    spec = _flavor(flavor)
    config = config or ImagesConfig()
    source = _cached_source_digest(runner_source_dir()) if runner_dir is None else _source_digest(runner_dir)
    digest = hashlib.sha256(b"ktrdr-runner-image/1\0")
    for part in (
        spec.name.encode(),
        source,
        (IMAGES_DIR / spec.dockerfile).read_bytes(),
        "\n".join(spec.requirements).encode(),
        f"{_base_key(config)} py{PYTHON_VERSION}".encode(),
    ):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def runner_image_tag(
    flavor: str = "cpu", *, config: ImagesConfig | None = None, runner_dir: Path | None = None
) -> str:
    """The tag of the runner image for the current code: ``ktrdr-runner:<flavor>-<12 hex>``."""
    digest = runner_image_digest(flavor, config=config, runner_dir=runner_dir)
    return f"{IMAGE_REPOSITORY}:{flavor}-{digest[:12]}"


# --- helpers ----------------------------------------------------------------------------


def _image_exists(client: docker.DockerClient, ref: str) -> bool:
    try:
        client.api.inspect_image(ref)
    except docker.errors.ImageNotFound:
        return False
    return True


def _pull(client: docker.DockerClient, ref: str) -> str | None:
    """Pull ``ref``: None when it worked, else the reason it did not."""
    repository, tag = docker.utils.parse_repository_tag(ref)
    try:
        for chunk in client.api.pull(repository, tag=tag or "latest", stream=True, decode=True):
            if "error" in chunk:
                return str(chunk["error"]).strip()
    except docker.errors.APIError as exc:
        return str(exc.explanation or exc).strip() or type(exc).__name__
    except docker.errors.DockerException as exc:
        return str(exc).strip() or type(exc).__name__
    return None if _image_exists(client, ref) else "the pull ended without the image"


def _cache_root(config: ImagesConfig) -> Path:
    return Path(config.cache_dir).expanduser()


def _run_streaming(cmd: list[str], progress: Progress, what: str) -> None:
    """Run ``cmd``, passing its output lines to ``progress``; ImageBuildError on failure."""
    tail: list[str] = []
    try:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace",
        )  # fmt: skip
    except OSError as exc:
        raise ImageBuildError(f"{what}: cannot run {cmd[0]}: {exc}") from None
    assert proc.stdout is not None
    with proc:
        for line in filter(None, (raw.rstrip() for raw in proc.stdout)):
            progress(f"  {line}")
            tail = [*tail[-39:], line]
    if proc.returncode != 0:
        raise ImageBuildError(f"{what} failed (exit {proc.returncode}):\n" + "\n".join(tail))


@contextlib.contextmanager
def _build_lock(config: ImagesConfig, progress: Progress) -> Iterator[None]:
    """One build at a time per cache dir (two dispatchers on one host)."""
    root = _cache_root(config)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "build.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress("waiting for another runner image build to finish")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _engine_arch(client: docker.DockerClient) -> str:
    arch = str(client.version().get("Arch", "amd64"))
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)


# --- base image and wheelhouse ----------------------------------------------------------


def ensure_base_image(
    client: docker.DockerClient, config: ImagesConfig | None = None, *, progress: Progress = print
) -> str:
    """The base image to build on: ``config.base_image`` if local or pullable, else the
    offline Debian base (bootstrapped once with ``images/bootstrap-base.sh``)."""
    config = config or ImagesConfig()
    if config.offline_base != "always":
        if _image_exists(client, config.base_image):
            return config.base_image
        progress(f"pulling base image {config.base_image}")
        reason = _pull(client, config.base_image)
        if reason is None:
            return config.base_image
        if config.offline_base == "never":
            raise ImageBuildError(
                f"base image {config.base_image!r} is not present and cannot be pulled ({reason}); "
                "load it with `docker load`, or set offline_base to 'auto' to bootstrap a Debian "
                "base offline"
            )
        progress(f"cannot pull {config.base_image} ({reason}); using an offline Debian base")
    if _image_exists(client, OFFLINE_BASE_IMAGE):
        progress(f"re-using the offline base image {OFFLINE_BASE_IMAGE}")
        return OFFLINE_BASE_IMAGE
    cmd = ["bash", str(IMAGES_DIR / "bootstrap-base.sh"), OFFLINE_BASE_IMAGE, config.debian_mirror]
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise ImageBuildError(
                "bootstrapping the offline base needs root (debootstrap); run "
                f"`sudo bash {cmd[1]}` once, or provide {config.base_image!r} locally"
            )
        cmd = ["sudo", "-n", *cmd]
    progress(f"bootstrapping {OFFLINE_BASE_IMAGE} from {config.debian_mirror} (about a minute)")
    _run_streaming(cmd, progress, "bootstrapping the offline base image")
    if not _image_exists(client, OFFLINE_BASE_IMAGE):
        raise ImageBuildError(f"bootstrap-base.sh finished but {OFFLINE_BASE_IMAGE} is missing")
    return OFFLINE_BASE_IMAGE


def build_wheelhouse(
    config: ImagesConfig | None = None,
    *,
    flavor: str = "cpu",
    arch: str = "x86_64",
    progress: Progress = print,
) -> Path:
    """A folder of cp311 manylinux wheels for the flavor's requirements.

    ``config.wheelhouse`` is used as is when set; otherwise the wheels are downloaded
    with the host's pip into ``<cache_dir>/wheelhouse/<key>`` once and re-used.
    """
    config = config or ImagesConfig()
    spec = _flavor(flavor)
    requirements = spec.requirements
    if config.wheelhouse:
        path = Path(config.wheelhouse).expanduser()
        if not path.is_dir() or not any(path.glob("*.whl")):
            raise ImageBuildError(f"wheelhouse {str(path)!r} holds no .whl files")
        progress(f"using the wheelhouse {path}")
        return path
    key_text = "\n".join([PYTHON_ABI, arch, *requirements])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    target = _cache_root(config) / "wheelhouse" / f"{PYTHON_ABI}-{arch}-{key}"
    if (target / ".complete").is_file():
        progress(f"re-using the wheelhouse {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    platforms = [f"manylinux_2_{minor}_{arch}" for minor in range(36, 16, -1)]
    platforms.append(f"manylinux2014_{arch}")
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
           "--progress-bar", "off", "--only-binary=:all:", "--python-version", PYTHON_VERSION,
           "--implementation", "cp", "--abi", PYTHON_ABI]  # fmt: skip
    if spec.public_index_only:  # ignore pip.conf's find-links and extra indexes
        cmd.insert(3, "--isolated")
        cmd += ["--index-url", "https://pypi.org/simple"]
    for name in platforms:
        cmd += ["--platform", name]
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        progress(f"downloading wheels for {' '.join(requirements)}")
        _run_streaming([*cmd, "-d", str(tmp), *requirements], progress, "pip download")
        (tmp / ".complete").write_text(key_text + "\n")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --- the build --------------------------------------------------------------------------


def _make_context(context: Path, spec: Flavor, wheels: Path, runner_dir: Path) -> None:
    """Lay out the build context: Dockerfile, requirements.txt, wheels/, src/runner/."""
    shutil.copy2(IMAGES_DIR / spec.dockerfile, context / "Dockerfile")
    (context / "requirements.txt").write_text("\n".join(spec.requirements) + "\n")
    (context / "wheels").mkdir()
    for wheel in sorted(wheels.glob("*.whl")):
        try:
            os.link(wheel, context / "wheels" / wheel.name)
        except OSError:
            shutil.copy2(wheel, context / "wheels" / wheel.name)
    for rel, path in _source_files(runner_dir):
        dest = context / "src" / "runner" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)


def _docker_build(
    client: docker.DockerClient,
    context: Path,
    *,
    tag: str,
    base: str,
    labels: dict[str, str],
    progress: Progress,
) -> None:
    step = "the start of the build"
    output: list[str] = []
    try:
        for chunk in client.api.build(
            path=str(context), tag=tag, buildargs={"BASE": base}, labels=labels,
            rm=True, forcerm=True, pull=False, decode=True, timeout=3600,
        ):  # fmt: skip
            if "error" in chunk or "errorDetail" in chunk:
                detail = chunk.get("errorDetail") or {}
                message = str(chunk.get("error") or detail.get("message", "")).strip()
                lines = "\n".join(output[-40:])
                raise ImageBuildError(f"building {tag} failed at {step}:\n{lines}\n{message}")
            text = chunk.get("stream") or chunk.get("status") or ""
            for line in str(text).splitlines():
                line = line.rstrip()
                if not line:
                    continue
                if line.startswith("Step "):
                    step, output = line, []
                output.append(line)
                progress(f"  {line}")
    except docker.errors.APIError as exc:
        raise ImageBuildError(f"Docker refused to build {tag}: {exc.explanation or exc}") from None
    if not _image_exists(client, tag):
        raise ImageBuildError(f"the build of {tag} ended without an image")


def ensure_runner_image(
    client: docker.DockerClient,
    *,
    config: ImagesConfig | None = None,
    progress: Progress = print,
    force: bool = False,
    flavor: str = "cpu",
    runner_dir: Path | None = None,
) -> str:
    """Return the tag of the runner image for the current code, building it if missing.

    The fast path (tag present, ``force`` false) is one Docker API call. A build reports
    its steps and Docker's output through ``progress``; failures raise ImageBuildError
    with the failing step's output. ``runner_dir`` overrides the runner source (tests).
    """
    config = config or ImagesConfig()
    digest = runner_image_digest(flavor, config=config, runner_dir=runner_dir)
    tag = f"{IMAGE_REPOSITORY}:{flavor}-{digest[:12]}"
    if not force and _image_exists(client, tag):
        return tag
    with _build_lock(config, progress):
        if not force and _image_exists(client, tag):
            return tag
        started = time.monotonic()
        progress(f"building the runner image {tag}")
        base = ensure_base_image(client, config, progress=progress)
        wheels = build_wheelhouse(config, flavor=flavor, arch=_engine_arch(client), progress=progress)
        with tempfile.TemporaryDirectory(prefix="ktrdr-build-") as context:
            source = Path(runner_dir) if runner_dir is not None else runner_source_dir()
            _make_context(Path(context), _flavor(flavor), wheels, source)
            # The tag must name what is built: digest the copy, not the live (editable) tree.
            copied = runner_image_digest(flavor, config=config, runner_dir=Path(context) / "src" / "runner")
            if copied != digest:
                _cached_source_digest.cache_clear()
                digest, tag = copied, f"{IMAGE_REPOSITORY}:{flavor}-{copied[:12]}"
                progress(f"the runner source changed meanwhile; building {tag} instead")
            labels = {LABEL_IMAGE: "runner", LABEL_DIGEST: digest, LABEL_FLAVOR: flavor, LABEL_BASE: base}
            progress(f"docker build on {base}")
            _docker_build(client, Path(context), tag=tag, base=base, labels=labels, progress=progress)
        progress(f"built {tag} in {time.monotonic() - started:.0f} s")
    return tag


def prune_runner_images(
    client: docker.DockerClient, keep_tag: str, *, repository: str = IMAGE_REPOSITORY
) -> list[str]:
    """Remove every runner image tag of ``keep_tag``'s flavor but ``keep_tag`` (other
    flavors are left alone); returns them.

    An image that a container (running or stopped) still uses keeps its last tag.
    """
    flavor = keep_tag.rpartition(":")[2].rpartition("-")[0]
    in_use = {c.get("ImageID") for c in client.api.containers(all=True)}
    removed: list[str] = []
    for image in client.images.list(name=repository, filters={"label": f"{LABEL_IMAGE}=runner"}):
        stale = [t for t in image.tags if t.startswith(f"{repository}:{flavor}-") and t != keep_tag]
        remaining = len(image.tags)
        for tag in stale:
            if remaining == 1 and image.id in in_use:
                break
            try:
                client.images.remove(tag)
            except docker.errors.APIError:
                continue
            removed.append(tag)
            remaining -= 1
    return removed


@dataclass(frozen=True, slots=True)
class Exported:
    """What :func:`export_runner_image` wrote: the image, and the file's size and sha256."""

    tag: str
    image_id: str
    bytes: int
    sha256: str
    compressed: bool


class _Tee:
    """A write-only stream passing bytes on to ``out``, counting and hashing them."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.out.write(data)
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self.out.flush()


def _save(client: docker.DockerClient, tag: str, out: BinaryIO, compress: bool) -> _Tee:
    tee = _Tee(out)
    packer = gzip.GzipFile(fileobj=tee, mode="wb", compresslevel=3, mtime=0) if compress else None
    try:
        for chunk in client.api.get_image(tag, chunk_size=1 << 20):
            (packer or tee).write(chunk)
    except docker.errors.DockerException as exc:
        raise ImageBuildError(f"Docker could not export {tag}: {exc}") from None
    finally:
        if packer is not None:
            packer.close()
    tee.flush()
    return tee


def export_runner_image(
    client: docker.DockerClient, tag: str, target: Path | BinaryIO, *, compress: bool | None = None
) -> Exported:
    """Write image ``tag`` as the tarball ``docker load`` takes (``docker save``, streamed
    through the API), keeping its tag: the way to a host with no registry.

    ``target`` is a path (written atomically: a temporary file beside it, then renamed) or
    a binary stream. ``compress`` (default: the path ends in ``.gz`` / ``.tgz``) gzips it;
    ``docker load`` reads both. Raises ImageBuildError when the engine cannot export it.
    """
    try:
        image_id = str(client.api.inspect_image(tag)["Id"])
    except docker.errors.ImageNotFound:
        raise ImageBuildError(f"no image {tag} on this engine to export") from None
    if compress is None:
        compress = isinstance(target, Path) and target.name.endswith((".gz", ".tgz"))
    if not isinstance(target, Path):
        tee = _save(client, tag, target, compress)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                tee = _save(client, tag, handle, compress)
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return Exported(tag, image_id, tee.size, tee.sha256.hexdigest(), compress)
