"""The training loop: optimizer, schedule, early stopping, cancel at batch boundaries.

The whole data set (feature rows and labels, a few MB even for years of hourly bars) is put
on the device once; a batch gathers its rows there, and a recurrent model's windows are
gathered the same way (``row - sequence_length + 1 .. row``), so windows are never
materialised for the whole data set.

Reproducibility: :func:`reproducible` seeds torch's generators (weights, dropout), the
trainer shuffles with a seeded generator of its own, and (``deterministic``) turns on
``torch.use_deterministic_algorithms`` with ``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which has to
be in the environment before the CUDA context exists: call :func:`prepare_environment`
before the first CUDA call. Runs repeat exactly on one device and torch release, not
across CPU and GPU.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from runner.errors import Cancelled, KtrdrRunnerError
from runner.train.config import TrainerConfig

CUBLAS_WORKSPACE = ":4096:8"
EVAL_BATCH_SIZE = 4096  # rows per forward pass when scoring (no gradients kept)


def prepare_environment(deterministic: bool) -> None:
    """Set what CUDA reads at start-up; call before the CUDA context exists."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


def select_device() -> torch.device:
    """CUDA when a GPU is visible, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def device_info(device: torch.device) -> dict[str, Any]:
    """What the model was trained on: type, name (GPU name or CPU model), versions."""
    is_cuda = device.type == "cuda"
    return {
        "type": device.type,
        "name": torch.cuda.get_device_name(device) if is_cuda else _cpu_name(),
        "torch_version": str(torch.__version__),
        "cuda_version": torch.version.cuda,
        "threads": torch.get_num_threads(),
    }


@contextmanager
def reproducible(seed: int, deterministic: bool) -> Iterator[None]:
    """Seed torch's generators (CPU and CUDA) for the block; with ``deterministic``, use only
    deterministic kernels. The generators' states and the global switches are restored on
    exit (tests run many ops in one process)."""
    prepare_environment(deterministic)
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(deterministic)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = deterministic
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous[0])
            torch.backends.cudnn.benchmark = previous[1]
            torch.backends.cudnn.deterministic = previous[2]


class TensorData:
    """Standardized feature rows and labels on the device; gathers batches by row."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, sequence_length: int, device: torch.device):
        self.device = device
        self.sequence_length = sequence_length
        self.features = torch.as_tensor(np.ascontiguousarray(features, dtype=np.float32), device=device)
        self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64), device=device)
        self._offsets = torch.arange(-sequence_length + 1, 1, device=device)

    def rows(self, rows: np.ndarray) -> torch.Tensor:
        """Sample rows as a device tensor."""
        return torch.as_tensor(np.asarray(rows, dtype=np.int64), device=self.device)

    def inputs(self, rows: torch.Tensor) -> torch.Tensor:
        """Model input for ``rows``: ``(b, features)`` or ``(b, sequence_length, features)``."""
        if self.sequence_length == 1:
            return self.features[rows]
        return self.features[rows[:, None] + self._offsets[None, :]]


@dataclass(frozen=True, slots=True)
class EpochStats:
    """One epoch's numbers; :meth:`metrics` gives KTRDR's names (``duration`` in seconds)."""

    epoch: int
    total_epochs: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    learning_rate: float
    duration_s: float

    def metrics(self) -> dict[str, float]:
        """The per-epoch progress metrics, KTRDR's names."""
        return {
            "epoch": self.epoch,
            "total_epochs": self.total_epochs,
            "train_loss": self.train_loss,
            "train_accuracy": self.train_accuracy,
            "val_loss": self.val_loss,
            "val_accuracy": self.val_accuracy,
            "learning_rate": self.learning_rate,
            "duration": self.duration_s,
        }


@dataclass(frozen=True, slots=True)
class BatchReport:
    """A throttled in-epoch report."""

    epoch: int
    total_epochs: int
    batch: int
    total_batches: int
    train_loss: float  # running mean over the epoch's batches so far


@dataclass(slots=True)
class TrainState:
    """Where training stands: the history, and the best epoch's weights (on the CPU)."""

    history: list[EpochStats] = field(default_factory=list)
    best_epoch: int = 0
    best_value: float = math.nan
    best_state: dict[str, torch.Tensor] | None = None
    stopped_early: bool = False


@dataclass(slots=True)
class TrainHooks:
    """Callbacks: ``checkpoint`` raises Cancelled to stop (called at every batch boundary);
    ``on_cancel`` gets the state (best weights so far) before Cancelled propagates."""

    checkpoint: Callable[[], None] = lambda: None
    on_epoch: Callable[[EpochStats], None] | None = None
    on_batch: Callable[[BatchReport], None] | None = None
    on_cancel: Callable[[TrainState], None] | None = None
    batch_interval_s: float = 1.0


def class_weights(labels: np.ndarray, num_classes: int) -> list[float]:
    """``n / (classes * count)`` per class of the training labels; 0 for an absent class."""
    counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes)[:num_classes]
    n = float(counts.sum())
    return [n / (num_classes * c) if c else 0.0 for c in counts]


def _optimizer(model: nn.Module, config: TrainerConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    lr, decay = config.learning_rate, config.weight_decay
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=decay)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=decay)
    return torch.optim.Adam(params, lr=lr, weight_decay=decay)


def _scheduler(optimizer: torch.optim.Optimizer, config: TrainerConfig) -> Any:
    spec = config.lr_scheduler
    if spec.type == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=spec.step_size, gamma=spec.gamma)
    if spec.type == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs, eta_min=spec.min_lr)
    if spec.type == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=spec.factor, patience=spec.patience, min_lr=spec.min_lr
        )
    return None


def evaluate(
    model: nn.Module, data: TensorData, rows: np.ndarray
) -> tuple[float, float, np.ndarray, np.ndarray]:
    """Unweighted mean cross-entropy, accuracy, predicted classes and probabilities."""
    model.eval()
    index = data.rows(rows)
    loss_sum = torch.zeros((), dtype=torch.float64, device=data.device)
    probabilities = []
    with torch.inference_mode():
        for start in range(0, len(index), EVAL_BATCH_SIZE):
            chunk = index[start : start + EVAL_BATCH_SIZE]
            logits = model(data.inputs(chunk))
            loss_sum += nn.functional.cross_entropy(logits, data.labels[chunk], reduction="sum").double()
            probabilities.append(torch.softmax(logits, dim=1).cpu())
    probs = torch.cat(probabilities).numpy() if probabilities else np.zeros((0, 0), np.float32)
    predicted = probs.argmax(axis=1) if len(probs) else np.zeros(0, np.int64)
    truth = data.labels[index].cpu().numpy()
    n = max(1, len(index))
    return (
        float(loss_sum.item()) / n,
        float((predicted == truth).mean()) if len(index) else 0.0,
        predicted,
        probs,
    )


def _improved(value: float, best: float, monitor: str, min_delta: float) -> bool:
    if math.isnan(best):
        return True
    if monitor == "val_accuracy":
        return value - best > min_delta
    return best - value > min_delta


def train(
    model: nn.Module,
    data: TensorData,
    train_rows: np.ndarray,
    val_rows: np.ndarray,
    config: TrainerConfig,
    hooks: TrainHooks | None = None,
) -> TrainState:
    """Train ``model`` (already on ``data.device``) and load the best epoch's weights into it.

    Call inside :func:`reproducible`. Raises Cancelled (after ``hooks.on_cancel``) when
    ``hooks.checkpoint`` does, and KtrdrRunnerError when the loss stops being finite.
    """
    hooks = hooks or TrainHooks()
    if len(train_rows) == 0 or len(val_rows) == 0:
        raise KtrdrRunnerError("training needs at least one training and one validation sample")
    num_classes = model_classes(model)
    weight = None
    if config.class_weights == "balanced":
        train_labels = data.labels[data.rows(train_rows)].cpu().numpy()
        weight = torch.tensor(
            class_weights(train_labels, num_classes), dtype=torch.float32, device=data.device
        )
    criterion = nn.CrossEntropyLoss(weight=weight)
    optimizer = _optimizer(model, config)
    scheduler = _scheduler(optimizer, config)
    shuffle = torch.Generator().manual_seed(config.seed)
    stopping = config.early_stopping
    state = TrainState()
    rows_cpu = torch.as_tensor(np.asarray(train_rows, dtype=np.int64))
    n = len(rows_cpu)
    total_batches = max(1, math.ceil(n / config.batch_size))
    wait = 0
    try:
        for epoch in range(1, config.epochs + 1):
            started = time.perf_counter()
            learning_rate = float(optimizer.param_groups[0]["lr"])
            model.train()
            order = rows_cpu[torch.randperm(n, generator=shuffle)].to(data.device)
            loss_sum = torch.zeros((), dtype=torch.float64, device=data.device)
            correct = torch.zeros((), dtype=torch.int64, device=data.device)
            last_report = time.monotonic()
            for b in range(total_batches):
                hooks.checkpoint()
                batch = order[b * config.batch_size : (b + 1) * config.batch_size]
                target = data.labels[batch]
                logits = model(data.inputs(batch))
                loss = criterion(logits, target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.gradient_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), config.gradient_clip)
                optimizer.step()
                loss_sum += loss.detach().double() * len(batch)
                correct += (logits.detach().argmax(dim=1) == target).sum()
                if hooks.on_batch is not None and time.monotonic() - last_report >= hooks.batch_interval_s:
                    last_report = time.monotonic()
                    seen = min(n, (b + 1) * config.batch_size)
                    running = float(loss_sum.item()) / seen
                    hooks.on_batch(BatchReport(epoch, config.epochs, b + 1, total_batches, running))
            hooks.checkpoint()
            train_loss = float(loss_sum.item()) / n
            if not math.isfinite(train_loss):
                raise KtrdrRunnerError(
                    f"training diverged: train_loss is {train_loss} in epoch {epoch}; lower "
                    "learning_rate or set gradient_clip"
                )
            val_loss, val_accuracy, _, _ = evaluate(model, data, val_rows)
            stats = EpochStats(
                epoch=epoch,
                total_epochs=config.epochs,
                train_loss=train_loss,
                train_accuracy=float(correct.item()) / n,
                val_loss=val_loss,
                val_accuracy=val_accuracy,
                learning_rate=learning_rate,
                duration_s=time.perf_counter() - started,
            )
            state.history.append(stats)
            value = val_accuracy if stopping.monitor == "val_accuracy" else val_loss
            if _improved(value, state.best_value, stopping.monitor, stopping.min_delta):
                state.best_value, state.best_epoch, wait = value, epoch, 0
                state.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            else:
                wait += 1
            if scheduler is not None:
                scheduler.step(val_loss) if config.lr_scheduler.type == "plateau" else scheduler.step()
            if hooks.on_epoch is not None:
                hooks.on_epoch(stats)
            if stopping.enabled and wait >= stopping.patience:
                state.stopped_early = True
                break
    except Cancelled:
        if hooks.on_cancel is not None:
            hooks.on_cancel(state)
        raise
    if state.best_state is not None:
        model.load_state_dict(state.best_state)
    return state


def model_classes(model: nn.Module) -> int:
    """Outputs of the model's last linear layer (its number of classes)."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    return int(last.out_features)
