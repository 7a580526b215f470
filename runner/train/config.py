"""The trainer's options as plain msgspec structs (no torch: the dispatcher imports them)."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, Struct

OptimizerName = Literal["adam", "sgd", "rmsprop"]
SchedulerName = Literal["none", "step", "cosine", "plateau"]
Monitor = Literal["val_loss", "val_accuracy"]
ClassWeights = Literal["none", "balanced"]


class LrScheduler(Struct, frozen=True, forbid_unknown_fields=True):
    """The learning-rate schedule, stepped once per epoch.

    - ``step``: multiply by ``gamma`` every ``step_size`` epochs;
    - ``cosine``: cosine annealing from the learning rate to ``min_lr`` over all epochs;
    - ``plateau``: multiply by ``factor`` when ``val_loss`` has not improved for
      ``patience`` epochs, not below ``min_lr``.
    """

    type: SchedulerName = "none"
    step_size: Annotated[int, Meta(ge=1, le=100_000)] = 10
    gamma: Annotated[float, Meta(gt=0, le=1)] = 0.1
    factor: Annotated[float, Meta(gt=0, lt=1)] = 0.5
    patience: Annotated[int, Meta(ge=0, le=100_000)] = 5
    min_lr: Annotated[float, Meta(ge=0)] = 0.0


class EarlyStopping(Struct, frozen=True, forbid_unknown_fields=True):
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience``
    epochs. Whether enabled or not, the weights kept are those of the best epoch by
    ``monitor``."""

    enabled: bool = True
    patience: Annotated[int, Meta(ge=1, le=100_000)] = 10
    min_delta: Annotated[float, Meta(ge=0)] = 0.0
    monitor: Monitor = "val_loss"


class TrainerConfig(Struct, frozen=True, forbid_unknown_fields=True):
    """Everything the trainer needs besides the model and the data.

    ``class_weights="balanced"`` weighs the training loss by ``n / (classes * count)`` of
    the training labels (Keras and scikit-learn's rule); validation and test losses are
    unweighted so that they compare across settings. ``gradient_clip`` is the max total
    gradient norm (None: no clipping). ``deterministic`` turns on
    ``torch.use_deterministic_algorithms`` for the run.
    """

    epochs: Annotated[int, Meta(ge=1, le=100_000)] = 100
    batch_size: Annotated[int, Meta(ge=1, le=1_048_576)] = 32
    learning_rate: Annotated[float, Meta(gt=0, le=10)] = 0.001
    optimizer: OptimizerName = "adam"
    weight_decay: Annotated[float, Meta(ge=0, le=10)] = 0.0
    lr_scheduler: LrScheduler = LrScheduler()
    early_stopping: EarlyStopping = EarlyStopping()
    gradient_clip: Annotated[float, Meta(gt=0)] | None = None
    class_weights: ClassWeights = "none"
    seed: Annotated[int, Meta(ge=0, le=2**63 - 1)] = 42
    deterministic: bool = True
