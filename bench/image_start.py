"""Does torch in the runner image slow the ops that do not use it?

Times ``docker run --rm IMAGE --stdout probe`` (hardened as the dispatcher runs it, the
probe's result printed) with the ``cpu`` image (torch for the train op inside) beside the
``slim`` image (the same runner without torch), alternating, so both see the same machine
state; and the Python start of the runner in each (``python -c "import runner.ops..."``,
every op module imported as the runner does, inside the container). Builds either image
when missing. Prints medians, p95 and the ratio cpu / slim.

    python bench/image_start.py [--runs 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import uuid

import docker
from harness import percentile

from dispatcher.engine import RUNNER_USER
from dispatcher.images import ensure_runner_image

HARDENING = [
    "--init", "--user", RUNNER_USER, "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true",
    "--read-only", "--tmpfs", "/tmp:rw,nosuid,nodev,size=1024m,mode=1777",
    "--memory", str(512 * 1024**2), "--memory-swap", str(512 * 1024**2),
    "--cpus", "0.5", "--pids-limit", "512",
]  # fmt: skip
#: What the runner imports at start (every op module registers itself).
IMPORT_ALL = "import time; t = time.perf_counter(); import runner.__main__, runner.registry as r; r.kinds(); "


def timed_run(image: str, args: list[str]) -> tuple[float, str]:
    """One ``docker run --rm``; (seconds, stdout). Fails loudly when the run fails."""
    name = f"bench-start-{uuid.uuid4().hex[:10]}"
    start = time.perf_counter()
    done = subprocess.run(["docker", "run", "--rm", "--name", name, *HARDENING, image, *args],
                          capture_output=True, text=True)  # fmt: skip
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"docker run {image} {' '.join(args)} failed ({done.returncode}): {done.stderr[-500:]}")
    return elapsed, done.stdout


def import_time(image: str) -> float:
    """Seconds the runner's imports take inside a container of ``image``."""
    code = IMPORT_ALL + "print(time.perf_counter() - t); import sys; print('torch' in sys.modules)"
    done = subprocess.run(
        ["docker", "run", "--rm", *HARDENING, "--entrypoint", "python", image, "-c", code],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"import check in {image} failed: {done.stderr[-500:]}")
    seconds, torch_loaded = done.stdout.split()
    if torch_loaded != "False":
        sys.exit(f"{image}: importing the runner loaded torch")
    return float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    client = docker.from_env()
    say = lambda line: print(line, file=sys.stderr)  # noqa: E731
    images = {flavor: ensure_runner_image(client, flavor=flavor, progress=say) for flavor in ("cpu", "slim")}
    sizes = {f: client.images.get(tag).attrs["Size"] / 1e6 for f, tag in images.items()}
    for tag in images.values():  # warm-up: page cache, first container of the image
        timed_run(tag, ["--stdout", "probe"])
    probe: dict[str, list[float]] = {"cpu": [], "slim": []}
    imports: dict[str, list[float]] = {"cpu": [], "slim": []}
    for _ in range(args.runs):
        for flavor, tag in images.items():
            probe[flavor].append(timed_run(tag, ["--stdout", "probe"])[0])
            imports[flavor].append(import_time(tag))
    print(f"runs                        {args.runs} each, alternating, after one warm-up each")
    for flavor, tag in images.items():
        print(f"{flavor:<5} {tag:<34} {sizes[flavor]:8.0f} MB")
    for label, series, unit in (("docker run probe", probe, 1000.0), ("runner imports", imports, 1000.0)):
        cpu, slim = statistics.median(series["cpu"]) * unit, statistics.median(series["slim"]) * unit
        print(
            f"{label:<18} cpu (torch) median {cpu:7.1f} ms p95 {percentile(series['cpu'], 95) * unit:7.1f} ms"
            f" | slim median {slim:7.1f} ms p95 {percentile(series['slim'], 95) * unit:7.1f} ms"
            f" | ratio {cpu / slim:.2f}"
        )


if __name__ == "__main__":
    main()
