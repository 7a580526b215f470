"""Typed configuration, decoded strictly from TOML (``ktrdr-run.toml``) by msgspec.

Library code reads settings only from here; :func:`load_config` is the one place that
looks at the environment (the config path, ``${VAR}`` substitution, XDG directories).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from discovery.config import DiscoveryConfig
from dispatcher.errors import ConfigError
from dispatcher.images import ImagesConfig

CONFIG_ENV = "KTRDR_RUN_CONFIG"
DEFAULT_CONFIG_NAME = "ktrdr-run.toml"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class NatsConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """Where NATS is, and whether to start one when nothing answers there.

    ``url``: one server, or a comma-separated list of every node of a cluster
    (``nats://n1:4222,nats://n2:4222,nats://n3:4222``); clients move to another node when
    theirs is lost, and runners get the same list. An embedded server is started only for
    a single local URL. ``replicas``: of every stream, bucket and the object store; 0 =
    auto: 3 when the server is part of a cluster (1 when the cluster cannot place 3),
    else 1.
    """

    url: str = "nats://127.0.0.1:4222"
    #: A ``.creds`` file for ktrdr-run's own connections ("" = the deployment's own
    #: credentials when this state directory holds its authority, else none).
    creds: str = ""
    embedded: bool = True
    embedded_sync: Literal["always", "default"] = "default"
    runner_url: str = ""
    connect_timeout_s: Annotated[float, Meta(gt=0)] = 2.0
    store_dir: str = ""
    dedupe_window_s: Annotated[float, Meta(gt=0)] = 600.0
    replicas: Literal[0, 1, 3, 5] = 0


class RetentionConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """How long finished ops are kept; JetStream's own limits remove them afterwards.

    ``ops_s``: a finished op record (per-message TTL on its terminal write; running ops
    never expire). ``events_s``: the event stream (max age). ``artifacts_s``: the object
    store. ``dead_letter_s``: dead-lettered jobs.
    """

    ops_s: Annotated[float, Meta(ge=1)] = 14 * 86_400.0
    events_s: Annotated[float, Meta(ge=1)] = 14 * 86_400.0
    artifacts_s: Annotated[float, Meta(ge=1)] = 30 * 86_400.0
    dead_letter_s: Annotated[float, Meta(ge=1)] = 30 * 86_400.0


class DockerConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """The local Docker engine ("" = the environment's default socket)."""

    url: str = ""
    timeout_s: Annotated[float, Meta(gt=0)] = 60.0
    #: Deadline of one control call (create, start, inspect, remove); past it the engine
    #: is treated as not answering.
    call_timeout_s: Annotated[float, Meta(gt=0)] = 20.0


class DispatcherConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """How the dispatcher runs ops."""

    dispatcher_id: str = ""
    max_concurrent_ops: Annotated[int, Meta(ge=0)] = 0
    cancel_grace_s: Annotated[float, Meta(gt=0)] = 10.0
    ack_wait_s: Annotated[float, Meta(ge=5)] = 30.0
    heartbeat_s: Annotated[float, Meta(gt=0)] = 5.0
    progress_record_interval_s: Annotated[float, Meta(ge=0)] = 1.0
    log_tail_lines: Annotated[int, Meta(ge=0, le=10_000)] = 50
    pids_limit: Annotated[int, Meta(ge=16)] = 512
    scratch_mb: Annotated[int, Meta(ge=16)] = 1024
    data_dir: str = ""
    data_roots: list[str] = []
    result_deadline_s: Annotated[float, Meta(gt=0)] = 60.0
    max_attempts: Annotated[int, Meta(ge=1, le=100)] = 3
    retry_backoff_s: Annotated[float, Meta(ge=0)] = 1.0
    poison_after_failures: Annotated[int, Meta(ge=1)] = 3
    log_lines_per_s: Annotated[int, Meta(ge=1)] = 200
    #: The runner's first heartbeat must arrive this soon after its container starts.
    runner_ready_s: Annotated[float, Meta(gt=0)] = 15.0
    #: How long an op's runner credentials live when the op has no timeout_s (with one,
    #: they expire after its timeout plus grace).
    runner_creds_max_s: Annotated[float, Meta(gt=60)] = 7 * 86_400.0
    #: Heartbeat silence this long during a run (while NATS is up) ends the attempt: lost.
    heartbeat_timeout_s: Annotated[float, Meta(gt=0)] = 30.0
    #: A dispatcher that has not renewed its lease for this long is dead; its ops are
    #: taken over by another dispatcher.
    lease_s: Annotated[float, Meta(ge=1)] = 15.0
    #: At most this many job messages held while they wait for capacity or a retry time.
    max_waiting_jobs: Annotated[int, Meta(ge=1)] = 64


class MetricsConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """Prometheus metrics of the dispatcher: ``listen`` = ``host:port`` ("" = off)."""

    listen: str = ""


class PoolShape(Struct, frozen=True, forbid_unknown_fields=True):
    """One shape of warm container (``[[pool.shapes]]``): ops whose resolved resources
    are exactly these CPUs and memory (and the default data mount, no GPU) take one."""

    cpus: Annotated[float, Meta(gt=0)]
    memory_gb: Annotated[float, Meta(gt=0)]
    #: Warm containers kept on each host, whatever the demand.
    min: Annotated[int, Meta(ge=0, le=64)] = 1
    #: At most this many per host, when ops keep finding none warm.
    max: Annotated[int, Meta(ge=0, le=64)] = 4
    #: The op kinds it is warmed for: their declared imports are done ahead (any kind
    #: may still take one). Empty: every kind's.
    kinds: list[str] = []
    #: Must stay 0: a warm container would hold its GPUs while it waits.
    gpus: int = 0

    def __post_init__(self) -> None:
        if self.gpus:
            raise ValueError(
                "gpus: warm pools are off for GPU shapes (a waiting container would hold the devices)"
            )
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) is more than max ({self.max})")


class PoolConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """The warm pool of the service dispatcher (no shapes: off)."""

    shapes: list[PoolShape] = []
    #: A warm container beyond its shape's ``min`` that waits this long is removed.
    idle_ttl_s: Annotated[float, Meta(gt=0)] = 300.0

    def __post_init__(self) -> None:
        keys = [(s.cpus, s.memory_gb) for s in self.shapes]
        if len(set(keys)) != len(keys):
            raise ValueError("shapes: two shapes have the same cpus and memory_gb")


class Config(Struct, frozen=True, forbid_unknown_fields=True):
    """All of ktrdr-run's configuration."""

    state_dir: str = ""
    nats: NatsConfig = NatsConfig()
    docker: DockerConfig = DockerConfig()
    dispatcher: DispatcherConfig = DispatcherConfig()
    retention: RetentionConfig = RetentionConfig()
    images: ImagesConfig = ImagesConfig()
    discovery: DiscoveryConfig = DiscoveryConfig()
    metrics: MetricsConfig = MetricsConfig()
    pool: PoolConfig = PoolConfig()

    def state_path(self) -> Path:
        """The directory for local state (embedded NATS store, caches)."""
        return Path(self.state_dir).expanduser()


def config_toml(config: Config) -> bytes:
    """``config`` as the TOML :func:`load_config` reads back (unset values left out)."""

    def drop_none(value: object) -> object:
        if isinstance(value, dict):
            return {k: drop_none(v) for k, v in value.items() if v is not None}
        return value

    return msgspec.toml.encode(drop_none(msgspec.to_builtins(config)))


def _substitute(text: str, env: dict[str, str], source: str) -> str:
    def repl(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in env:
            raise ConfigError(f"{source}: ${{{name}}} is referenced but not set in the environment")
        return env[name]

    return _ENV_REF.sub(repl, text)


def load_config(path: Path | None = None, env: dict[str, str] | None = None) -> Config:
    """Load the config from ``path``, $KTRDR_RUN_CONFIG or ./ktrdr-run.toml; defaults if none.

    Unknown keys and bad values raise ConfigError naming the key and the problem.
    """
    env = dict(os.environ) if env is None else env
    explicit = path is not None or CONFIG_ENV in env
    path = path or Path(env.get(CONFIG_ENV, DEFAULT_CONFIG_NAME))
    config = Config()
    if path.exists():
        try:
            text = _substitute(path.read_text(), env, str(path))
            config = msgspec.toml.decode(text.encode(), type=Config)
        except msgspec.ValidationError as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except msgspec.DecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    elif explicit:
        raise ConfigError(f"config file {path} does not exist")
    if not config.state_dir:
        state_home = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME", "~")) / ".local/state")
        config = msgspec.structs.replace(config, state_dir=str(Path(state_home) / "ktrdr-run"))
    return config
