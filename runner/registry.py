"""The registry of operation kinds.

An operation is a plain function ``fn(ctx, params) -> dict`` declared with
:func:`operation`. Declaring it validates its options at once (dramatiq style) and
normalises it into a small frozen :class:`Operation`. The dispatcher imports this
registry to validate params before any container starts, so operation modules must
stay cheap to import: heavy libraries (torch) are imported inside the function.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from runner.errors import InvalidParams, KtrdrRunnerError, UnknownKind
from runner.protocol import KIND_PATTERN, GpuPolicy, Resources

if TYPE_CHECKING:
    from runner.sdk import OpContext

OpFunction = Callable[["OpContext", Any], dict[str, Any]]
ParamsCheck = Callable[[Any], None]
# (parsed params, host data directory or None) -> None; raises DataError
Preflight = Callable[[Any, Path | None], None]
# parsed params -> {params field: artifact store name} the op will read
ArtifactReads = Callable[[Any], dict[str, str]]

# Modules that declare the built-in operations, imported on first registry use.
BUILTIN_MODULES: tuple[str, ...] = (
    "runner.ops.probe",
    "runner.ops.backtest",
    "runner.ops.train",
    "runner.ops.sweep_chunk",
    "runner.ops.sweep",
)


@dataclass(frozen=True, slots=True)
class Operation:
    """One registered operation kind."""

    kind: str
    fn: OpFunction
    params_type: type[msgspec.Struct]
    gpu: GpuPolicy
    default_resources: Resources
    description: str
    check: ParamsCheck | None = None
    preflight: Preflight | None = None
    #: The artifacts the op will read, by params field: the dispatcher checks that each
    #: exists before any container starts.
    reads: ArtifactReads | None = None
    #: Run by the dispatcher's coordinator, never in a container (a sweep): it holds no
    #: capacity of its own and submits child ops that do.
    coordinated: bool = False
    #: Modules a warm pool container imports ahead of an op of this kind (the op's own
    #: heavy imports, done before it arrives).
    preload: tuple[str, ...] = ()

    def parse_params(self, params: dict[str, Any], *, strict: bool = True) -> msgspec.Struct:
        """Validate ``params`` into the kind's params struct.

        Raises InvalidParams naming the field and what is wrong. ``strict=False`` accepts
        strings for numbers and booleans (what a command line produces).
        """
        try:
            parsed = msgspec.convert(params, self.params_type, strict=strict)
        except msgspec.ValidationError as exc:
            raise InvalidParams.from_validation(self.kind, exc) from None
        if self.check is not None:
            self.check(parsed)
        return parsed


_REGISTRY: dict[str, Operation] = {}
_loaded = False
_load_lock = threading.RLock()


def operation(
    kind: str,
    *,
    params: type[msgspec.Struct],
    gpu: GpuPolicy = "never",
    resources: Resources | None = None,
    check: ParamsCheck | None = None,
    preflight: Preflight | None = None,
    reads: ArtifactReads | None = None,
    coordinated: bool = False,
    preload: tuple[str, ...] = (),
) -> Callable[[OpFunction], OpFunction]:
    """Declare ``fn`` as the operation ``kind`` with params struct ``params``.

    ``gpu`` is the kind's default GPU policy; ``check`` runs cross-field checks on the
    parsed params and raises InvalidParams; ``preflight`` checks the op's input data
    where the dispatcher can see it (raising DataError) before any container starts.
    ``preload``: modules a warm pool container imports before an op of this kind arrives.
    """
    import re

    if not re.fullmatch(KIND_PATTERN, kind):
        raise KtrdrRunnerError(f"operation kind {kind!r} must match {KIND_PATTERN}")
    if not (isinstance(params, type) and issubclass(params, msgspec.Struct)):
        raise KtrdrRunnerError(f"operation {kind!r}: params must be a msgspec.Struct type")
    if gpu not in ("required", "preferred", "never"):
        raise KtrdrRunnerError(f"operation {kind!r}: gpu must be required|preferred|never")

    def register(fn: OpFunction) -> OpFunction:
        if kind in _REGISTRY and _REGISTRY[kind].fn is not fn:
            raise KtrdrRunnerError(f"operation kind {kind!r} is declared twice")
        _REGISTRY[kind] = Operation(
            kind=kind,
            fn=fn,
            params_type=params,
            gpu=gpu,
            default_resources=resources or Resources(cpus=1.0, memory_gb=1.0, gpus=0),
            description=(fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "",
            check=check,
            preflight=preflight,
            reads=reads,
            coordinated=coordinated,
            preload=preload,
        )
        return fn

    return register


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    with _load_lock:  # the dispatcher admits jobs on worker threads: load once, fully
        if not _loaded:
            for module in BUILTIN_MODULES:
                importlib.import_module(module)
            _loaded = True


def get(kind: str) -> Operation:
    """The operation registered as ``kind``; UnknownKind lists the known ones."""
    _load_builtins()
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise UnknownKind(kind, sorted(_REGISTRY)) from None


def kinds() -> list[str]:
    """Every registered kind, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)
