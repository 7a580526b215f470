"""``model(model, threshold)``: trade a trained model's predicted class.

``model`` is the store name of a ``train`` op's ``model`` artifact (``sha256-...``). The
container fetches the bundle, rebuilds the features with the spec and scaler saved in it,
and predicts a class for every bar that has its features (and, for recurrent models, a
full window) — from bars up to and including that bar only. On that bar's close the
target becomes long for ``up``, short (flat when long-only) for ``down``, flat for
``flat``; with ``threshold`` > 0 a prediction whose probability is below it means flat.
Warm-up: the bundle's feature warm-up plus ``sequence_length - 1`` bars.

torch is imported when the bundle is bound (in the container), never at import.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import numpy as np
from msgspec import Meta

from runner.backtest.data import Bars
from runner.backtest.strategies import Strategy, register
from runner.backtest.strategies._common import finish

#: The classes a bundle predicts, in order, and the position each one means.
CLASS_POSITIONS = {"down": -1, "flat": 0, "up": 1}


class ModelParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Parameters of ``model``: the bundle's store name, and a probability threshold."""

    model: Annotated[str, Meta(pattern=r"^sha256-[0-9a-f]{64}$")]
    threshold: Annotated[float, Meta(ge=0, lt=1)] = 0.0


@dataclass(frozen=True, slots=True)
class BoundModel:
    """The params with the bundle they name, loaded."""

    params: ModelParams
    bundle: dict[str, Any]

    @property
    def sequence_length(self) -> int:
        return int(self.bundle["model"].get("sequence_length", 1))


def bind(params: ModelParams, load: Callable[[str], bytes]) -> BoundModel:
    """Fetch and load the bundle ``params.model`` names."""
    from runner.train.bundle import load_bundle

    return BoundModel(params, load_bundle(load(params.model)))


def warmup(params: ModelParams | BoundModel) -> int:
    """Bars before the first prediction (unbound: the default feature spec's warm-up,
    the least any bundle needs)."""
    from runner.train.features import FeatureSpec, spec_from_dict, warmup_rows

    if isinstance(params, BoundModel):
        spec = spec_from_dict(params.bundle["features"]["spec"])
        return warmup_rows(spec) + params.sequence_length - 1
    return warmup_rows(FeatureSpec())


def frame_of(bars: Bars) -> Any:
    """The bars as the OHLCV frame features are computed from."""
    import pandas as pd

    index = pd.DatetimeIndex(bars.timestamps).tz_localize("UTC")
    columns = {
        "open": bars.open,
        "high": bars.high,
        "low": bars.low,
        "close": bars.close,
        "volume": bars.volume,
    }
    return pd.DataFrame(columns, index=index)


def positions(bars: Bars, params: BoundModel, long_only: bool) -> np.ndarray:
    """Target position per bar from the model's predictions."""
    from runner.train.bundle import predict

    if not isinstance(params, BoundModel):
        raise TypeError("the model strategy needs its bundle: bind() it first")
    stamps, classes, probabilities = predict(params.bundle, frame_of(bars))
    names = list(params.bundle["class_names"])
    by_class = np.array([CLASS_POSITIONS.get(name, 0) for name in names], dtype=np.int8)
    decided = by_class[classes]
    if params.params.threshold > 0:
        decided = np.where(probabilities.max(axis=1) >= params.params.threshold, decided, 0).astype(np.int8)
    target = np.zeros(len(bars), dtype=np.int8)
    where = np.searchsorted(bars.timestamps, stamps)
    target[where] = decided
    return finish(target, warmup(params), long_only)


def caveats(params: BoundModel, first_bar: str, last_bar: str) -> list[str]:
    """The look-ahead warning, when there is one."""
    warning = training_overlap(params, first_bar, last_bar)
    return [warning] if warning else []


def training_overlap(params: BoundModel, first_bar: str, last_bar: str) -> str:
    """A look-ahead warning when the backtest's bars overlap the data the model was
    fitted and selected on (its train and validation splits; ISO 8601 UTC strings)."""
    splits = params.bundle.get("data", {})
    start = splits.get("train", {}).get("start")
    end = splits.get("validation", {}).get("end") or splits.get("train", {}).get("end")
    if not start or not end or last_bar < start or first_bar > end:
        return ""
    return (
        f"look-ahead: the backtest ({first_bar} .. {last_bar}) overlaps the data the model was "
        f"trained and validated on ({start} .. {end}); its results there are not out of sample"
    )


STRATEGY = register(
    Strategy(
        name="model",
        params_type=ModelParams,
        warmup=warmup,
        positions=positions,
        description="trade a trained model's predicted class (a train op's model artifact)",
        bind=bind,
        caveats=caveats,
    )
)
