"""The strategy registry.

A strategy turns bars into a target position per bar: ``1`` long, ``0`` flat, ``-1``
short, decided on that bar's close (the engine fills it at the next bar's open). Each
strategy is one small module in this package that builds a :class:`Strategy` and calls
:func:`register`; modules are discovered automatically (names starting with ``_`` are
helpers, not strategies). A strategy has:

- a msgspec params Struct (``forbid_unknown_fields``, ``frozen``) that validates its
  parameters, cross-field rules in ``__post_init__``;
- ``warmup(params)``: the number of leading bars on which no signal can be decided
  (the first decision is on bar index ``warmup``);
- ``positions(bars, params, long_only)``: a vectorized function returning an ``int8``
  array of -1/0/1, zero during the warm-up and never -1 when ``long_only``.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from runner.errors import KtrdrRunnerError

if TYPE_CHECKING:
    import numpy as np

    from runner.backtest.data import Bars

PositionsFn = Callable[["Bars", Any, bool], "np.ndarray"]
WarmupFn = Callable[[Any], int]
# (params, load an artifact by store name) -> params bound to what they name
BindFn = Callable[[Any, Callable[[str], bytes]], Any]
# (bound params, first bar, last bar as ISO 8601) -> warnings for the result
CaveatsFn = Callable[[Any, str, str], list[str]]


class UnknownStrategy(KtrdrRunnerError, LookupError):
    """No strategy is registered under this name."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        super().__init__(f"unknown strategy {name!r}; known strategies: {', '.join(known)}")


@dataclass(frozen=True, slots=True)
class Strategy:
    """One registered strategy."""

    name: str
    params_type: type[msgspec.Struct]
    warmup: WarmupFn
    positions: PositionsFn
    description: str = ""
    #: For strategies whose params name artifacts (a trained model): loads them, in the
    #: container, before ``warmup`` and ``positions`` see the params.
    bind: BindFn | None = None
    #: Warnings about a run (a model backtested on its own training data).
    caveats: CaveatsFn | None = None

    def parse_params(self, params: Mapping[str, Any], *, strict: bool = False) -> Any:
        """Validate ``params`` into this strategy's params Struct (defaults fill gaps).

        ``strict=False`` accepts numbers written as strings (a command line) and integral
        floats for integer fields. Raises ``msgspec.ValidationError`` naming the field.
        """
        return msgspec.convert(dict(params), self.params_type, strict=strict)

    def label(self, params: Any) -> str:
        """``name(field=value, ...)``, for messages."""
        fields = ", ".join(f"{f}={getattr(params, f)!r}" for f in params.__struct_fields__)
        return f"{self.name}({fields})"


_REGISTRY: dict[str, Strategy] = {}
_loaded = False
_load_lock = threading.RLock()


def register(strategy: Strategy) -> Strategy:
    """Add ``strategy`` to the registry (once per name) and return it."""
    existing = _REGISTRY.get(strategy.name)
    if existing is not None and existing.positions is not strategy.positions:
        raise KtrdrRunnerError(f"strategy {strategy.name!r} is registered twice")
    _REGISTRY[strategy.name] = strategy
    return strategy


def _load() -> None:
    # Admission validates jobs on worker threads: the first two at once must not see a
    # half-filled registry (one thread importing, the other told it is done).
    global _loaded
    if _loaded:
        return
    with _load_lock:
        if _loaded:
            return
        for info in pkgutil.iter_modules(__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")
        _loaded = True


def get_strategy(name: str) -> Strategy:
    """The strategy registered as ``name``; UnknownStrategy lists the known ones."""
    _load()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownStrategy(name, sorted(_REGISTRY)) from None


def strategy_names() -> list[str]:
    """Every registered strategy name, sorted."""
    _load()
    return sorted(_REGISTRY)


def strategies() -> dict[str, Strategy]:
    """A copy of the registry: name to :class:`Strategy`."""
    _load()
    return dict(_REGISTRY)
