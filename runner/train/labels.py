"""Labels for training: the direction of the price ahead, in three classes.

A label at bar ``t`` is the simple return ``close[t+h] / close[t] - 1`` cut into classes
with a dead zone ``threshold``: ``0`` down (return < -threshold), ``1`` flat, ``2`` up
(return > threshold). ``source`` picks ``h``:

- ``next_direction``: the next bar (h = 1);
- ``forward_return``: KTRDR's name, the return over ``horizon`` bars.

The last ``h`` bars have no known label and give no sample. numpy is imported inside the
functions: the dispatcher imports :class:`LabelSpec` to validate params.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from msgspec import Meta, Struct

if TYPE_CHECKING:
    import numpy as np

CLASS_NAMES: tuple[str, ...] = ("down", "flat", "up")
UNKNOWN = -1  # the label of a bar whose future is not in the data
LabelSource = Literal["next_direction", "forward_return"]


class LabelSpec(Struct, frozen=True, forbid_unknown_fields=True):
    """How labels are made. ``horizon`` (bars) is used by ``forward_return`` only;
    ``threshold`` is the dead zone as a fraction (0.002 = 0.2 %)."""

    source: LabelSource = "next_direction"
    horizon: Annotated[int, Meta(ge=1, le=10_000)] = 1
    threshold: Annotated[float, Meta(ge=0, lt=1)] = 0.0


def spec_problem(spec: LabelSpec) -> tuple[str, str] | None:
    """(field, problem) when the options contradict each other, else None."""
    if spec.source == "next_direction" and spec.horizon != 1:
        return "horizon", "next_direction looks one bar ahead; use source 'forward_return' for a horizon"
    return None


def label_horizon(spec: LabelSpec) -> int:
    """Bars a label looks ahead."""
    return 1 if spec.source == "next_direction" else spec.horizon


def make_labels(close: np.ndarray, spec: LabelSpec) -> np.ndarray:
    """One int64 label per bar: 0 down, 1 flat, 2 up, :data:`UNKNOWN` for the last bars."""
    import numpy as np

    prices = np.asarray(close, dtype=np.float64)
    h = label_horizon(spec)
    labels = np.full(prices.shape[0], UNKNOWN, dtype=np.int64)
    if prices.shape[0] <= h:
        return labels
    future_return = prices[h:] / prices[:-h] - 1.0
    known = np.ones(future_return.shape[0], dtype=np.int64)
    known[future_return > spec.threshold] = 2
    known[future_return < -spec.threshold] = 0
    labels[:-h] = known
    return labels


def spec_to_dict(spec: LabelSpec) -> dict[str, Any]:
    """The spec as plain builtins, with the class names, for the model bundle."""
    return {
        "source": spec.source,
        "horizon": label_horizon(spec),
        "threshold": spec.threshold,
        "class_names": list(CLASS_NAMES),
    }
