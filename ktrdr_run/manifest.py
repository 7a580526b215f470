"""Job manifests: a lab's batch of work in one TOML file, with stable job ids.

::

    [[jobs]]
    name = "sma"                      # optional; unique in the file
    kind = "backtest"
    params = { symbol = "GOOG", timeframe = "1d", strategy = "sma_cross" }
    resources = { cpus = 1 }
    matrix = { "strategy_params.fast" = [5, 10, 20], symbol = ["GOOG", "MSFT"] }
    repeat = 1

An entry expands into one job per combination of its ``matrix`` values (dotted keys reach
into nested params) times ``repeat``. Each job's id is a digest of its normalised spec —
kind, params, resources, timeout, data directory, the entry's name and the repeat index —
so submitting the same manifest again names the same ops (nothing new starts) and an
edited entry names new ones. Labels are not part of the id: relabelling reruns nothing.
Every entry is checked (its kind known, its params valid for the kind) before anything
is submitted; errors name the entry and the field.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

from ktrdr_run.errors import ClientError
from runner import registry
from runner.errors import InvalidParams, UnknownKind
from runner.protocol import Job, Resources

MAX_JOBS = 10_000


class ManifestError(ClientError):
    """A manifest that cannot be submitted; the message names the entry and field."""


class Entry(Struct, frozen=True, forbid_unknown_fields=True):
    """One ``[[jobs]]`` entry."""

    kind: str
    name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")] | None = None
    params: dict[str, Any] = {}
    resources: Resources = Resources()
    timeout_s: Annotated[float, Meta(gt=0, le=1e9)] | None = None
    labels: dict[str, str] = {}
    data_dir: str = ""
    #: Param (dotted path) -> the values to run it with; every combination is a job.
    matrix: dict[str, Annotated[list[Any], Meta(min_length=1)]] = {}
    repeat: Annotated[int, Meta(ge=1, le=1000)] = 1


class Manifest(Struct, frozen=True, forbid_unknown_fields=True):
    """A manifest file: its ``[[jobs]]``."""

    jobs: Annotated[list[Entry], Meta(min_length=1)]


@dataclass(frozen=True, slots=True)
class Planned:
    """One job a manifest entry expands into."""

    entry: int  # index in the file
    label: str  # the entry's name (or kind#index) with the combination, for tables
    job: Job


def _set_path(params: dict[str, Any], dotted: str, value: Any) -> None:
    node = params
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ValueError(f"matrix.{dotted}: params.{key} is not a table")
        node = child
    node[leaf] = value


def job_id_of(kind: str, spec: dict[str, Any]) -> str:
    """The stable id of a manifest job: ``<kind>-`` and 16 hex digits of the digest of
    its normalised spec (keys sorted, JSON)."""
    digest = hashlib.sha256(msgspec.json.encode(spec, order="sorted")).hexdigest()
    return f"{kind.replace('_', '-')}-{digest[:16]}"


def _where(index: int, entry: Entry | None) -> str:
    name = f" ({entry.name})" if entry is not None and entry.name else ""
    return f"jobs[{index}]{name}"


def expand(manifest: Manifest, *, submitted_by: str = "") -> list[Planned]:
    """Every job of the manifest, checked; ManifestError names the entry and field."""
    names: dict[str, int] = {}
    planned: list[Planned] = []
    for index, entry in enumerate(manifest.jobs):
        where = _where(index, entry)
        if entry.name is not None:
            if entry.name in names:
                raise ManifestError(f"{where}: name {entry.name!r} is used by jobs[{names[entry.name]}] too")
            names[entry.name] = index
        try:
            op = registry.get(entry.kind)
        except UnknownKind as exc:
            raise ManifestError(f"{where}: kind: {exc}") from None
        keys = sorted(entry.matrix)
        for combo in itertools.product(*(entry.matrix[k] for k in keys)):
            params = copy.deepcopy(entry.params)
            try:
                for key, value in zip(keys, combo, strict=True):
                    _set_path(params, key, value)
            except ValueError as exc:
                raise ManifestError(f"{where}: {exc}") from None
            try:
                op.parse_params(params)
            except InvalidParams as exc:
                raise ManifestError(f"{where}{_combo_text(keys, combo)}: {exc}") from None
            for copy_index in range(entry.repeat):
                spec = {
                    "kind": entry.kind,
                    "params": params,
                    "resources": msgspec.to_builtins(entry.resources),
                    "timeout_s": entry.timeout_s,
                    "data_dir": entry.data_dir,
                    "name": entry.name or "",
                    "repeat": copy_index,
                }
                job = Job(
                    job_id=job_id_of(entry.kind, spec),
                    kind=entry.kind,
                    params=params,
                    resources=entry.resources,
                    timeout_s=entry.timeout_s,
                    labels={**entry.labels, **({"manifest.entry": entry.name} if entry.name else {})},
                    submitted_by=submitted_by,
                    data_dir=entry.data_dir,
                )
                label = (entry.name or f"{entry.kind}#{index}") + _combo_text(keys, combo)
                label += f" #{copy_index + 1}" if entry.repeat > 1 else ""
                planned.append(Planned(index, label, job))
                if len(planned) > MAX_JOBS:
                    raise ManifestError(f"{where}: the manifest expands to more than {MAX_JOBS:,} jobs")
    return planned


def _combo_text(keys: list[str], combo: tuple[Any, ...]) -> str:
    return " [" + ", ".join(f"{k}={v}" for k, v in zip(keys, combo, strict=True)) + "]" if keys else ""


def load_manifest(path: Path, *, submitted_by: str = "") -> list[Planned]:
    """Read, check and expand a manifest file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"manifest {path}: {exc.strerror or exc}") from None
    try:
        manifest = msgspec.toml.decode(raw, type=Manifest)
    except msgspec.ValidationError as exc:
        raise ManifestError(f"manifest {path}: {_readable(exc)}") from None
    except msgspec.DecodeError as exc:
        raise ManifestError(f"manifest {path}: not valid TOML: {exc}") from None
    try:
        return expand(manifest, submitted_by=submitted_by)
    except ManifestError as exc:
        raise ManifestError(f"manifest {path}: {exc}") from None


def _readable(exc: msgspec.ValidationError) -> str:
    """msgspec's ``... - at `$.jobs[2].params``` as ``jobs[2].params: ...``."""
    text = str(exc)
    message, sep, where = text.rpartition(" - at `$.")
    if not sep:
        return text
    return f"{where.rstrip('`')}: {message}"
