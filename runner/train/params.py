"""The params of the ``train`` operation and their checks (no numpy, no torch: the
dispatcher validates jobs with them before any container starts)."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from runner.backtest import SYMBOL_PATTERN, TIMEFRAME_PATTERN, check_date_range
from runner.errors import DataError, InvalidParams
from runner.train import MODEL_TYPES, RECURRENT_MODEL_TYPES
from runner.train import features as feature_set
from runner.train import labels as label_set
from runner.train.config import (
    ClassWeights,
    EarlyStopping,
    LrScheduler,
    OptimizerName,
    SchedulerName,
    TrainerConfig,
)
from runner.train.split import DataSplit, split_problem

KIND = "train"
DEFAULT_SEQUENCE_LENGTH = 20


class TrainParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Parameters of ``train`` (KTRDR's names where KTRDR has one).

    ``start``/``end``: ISO dates, both inclusive. ``model``: ``mlp``, ``lstm`` or ``gru``;
    ``sequence_length`` (recurrent models only, default 20) is the window of feature rows
    ending at the labelled bar. ``lr_scheduler`` is a schedule name or an object with its
    options. ``labels``, ``data_split`` and ``features`` hold their specs (see
    ``runner.train``).
    """

    symbol: Annotated[str, Meta(pattern=SYMBOL_PATTERN)]
    timeframe: Annotated[str, Meta(pattern=TIMEFRAME_PATTERN)] = "1d"
    start: str | None = None
    end: str | None = None
    model: Annotated[str, Meta(max_length=64)] = "mlp"
    hidden_layers: Annotated[
        tuple[Annotated[int, Meta(ge=1, le=8192)], ...], Meta(min_length=1, max_length=16)
    ] = (64, 32)
    dropout: Annotated[float, Meta(ge=0, lt=1)] = 0.2
    sequence_length: Annotated[int, Meta(ge=1, le=10_000)] | None = None
    epochs: Annotated[int, Meta(ge=1, le=100_000)] = 100
    batch_size: Annotated[int, Meta(ge=1, le=1_048_576)] = 32
    learning_rate: Annotated[float, Meta(gt=0, le=10)] = 0.001
    optimizer: OptimizerName = "adam"
    weight_decay: Annotated[float, Meta(ge=0, le=10)] = 0.0
    lr_scheduler: SchedulerName | LrScheduler = LrScheduler()
    early_stopping: EarlyStopping = EarlyStopping()
    gradient_clip: Annotated[float, Meta(gt=0)] | None = None
    class_weights: ClassWeights = "none"
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] = 42
    deterministic: bool = True
    labels: label_set.LabelSpec = label_set.LabelSpec()
    data_split: DataSplit = DataSplit()
    features: feature_set.FeatureSpec = feature_set.FeatureSpec()


def sequence_length(params: TrainParams) -> int:
    """Feature rows per sample: 1 for an MLP, else ``sequence_length`` (default 20)."""
    if params.model not in RECURRENT_MODEL_TYPES:
        return 1
    return params.sequence_length or DEFAULT_SEQUENCE_LENGTH


def trainer_config(params: TrainParams) -> TrainerConfig:
    """The trainer's options from the params."""
    schedule = params.lr_scheduler
    return TrainerConfig(
        epochs=params.epochs,
        batch_size=params.batch_size,
        learning_rate=params.learning_rate,
        optimizer=params.optimizer,
        weight_decay=params.weight_decay,
        lr_scheduler=LrScheduler(type=schedule) if isinstance(schedule, str) else schedule,
        early_stopping=params.early_stopping,
        gradient_clip=params.gradient_clip,
        class_weights=params.class_weights,
        seed=params.seed,
        deterministic=params.deterministic,
    )


def check_params(params: TrainParams) -> None:
    """Cross-field checks: dates, model, sequence length, labels, split, feature windows."""
    check_date_range(KIND, params.start, params.end)
    if params.model not in MODEL_TYPES:
        raise InvalidParams(KIND, "model", f"unknown model {params.model!r}; known: {', '.join(MODEL_TYPES)}")
    if params.model in RECURRENT_MODEL_TYPES:
        if params.sequence_length is not None and params.sequence_length < 2:
            raise InvalidParams(KIND, "sequence_length", f"{params.model} needs at least 2 rows per window")
    elif params.sequence_length not in (None, 1):
        raise InvalidParams(
            KIND,
            "sequence_length",
            f"only used by recurrent models ({', '.join(RECURRENT_MODEL_TYPES)}); {params.model} "
            "takes one feature row",
        )
    for prefix, problem in (
        ("labels", label_set.spec_problem(params.labels)),
        ("data_split", split_problem(params.data_split)),
        ("features", feature_set.spec_problem(params.features)),
    ):
        if problem is not None:
            raise InvalidParams(KIND, f"{prefix}.{problem[0]}", problem[1])


def check_sequence_fits(params: TrainParams, feature_rows: int, n_bars: int) -> None:
    """DataError when the bars do not cover the feature warm-up; InvalidParams naming
    ``sequence_length`` when no window of it fits the feature rows."""
    if feature_rows == 0:
        raise DataError(
            f"{n_bars} bar(s) in the requested range, but the features' longest window needs "
            f"{feature_set.warmup_rows(params.features) + 1} bars to give one row; use a longer date range"
        )
    length = sequence_length(params)
    if length > feature_rows:
        raise InvalidParams(
            KIND,
            "sequence_length",
            f"{length} is longer than the data: {n_bars} bar(s) in range give {feature_rows} "
            f"feature row(s) after the {n_bars - feature_rows}-bar feature warm-up",
        )
