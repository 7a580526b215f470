"""Running a ``train`` op once its bars are loaded: features, labels, split, scaling,
the model, training with progress and cancel, test metrics, the bundle and the history.

Only the running ``train`` operation imports this module (it imports torch).
"""

from __future__ import annotations

import io
import math
from typing import TYPE_CHECKING, Any

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from runner.backtest.data import format_timestamp
from runner.backtest.metrics import clean
from runner.ops.probe import cpu_quota
from runner.train import bundle as bundles
from runner.train import labels as label_set
from runner.train.config import TrainerConfig
from runner.train.dataset import Prepared, prepare, scaler_rows, split_prepared, with_labels
from runner.train.features import Standardizer
from runner.train.labels import CLASS_NAMES
from runner.train.metrics import baseline_accuracy, class_counts, classification_scores
from runner.train.models import ModelConfig, build_model, describe, parameter_count
from runner.train.params import TrainParams, check_sequence_fits, sequence_length
from runner.train.split import SplitRanges
from runner.train.trainer import (
    BatchReport,
    EpochStats,
    TensorData,
    TrainHooks,
    TrainState,
    device_info,
    evaluate,
    reproducible,
    select_device,
    train,
)

if TYPE_CHECKING:
    import pandas as pd

    from runner.sdk import OpContext

MODEL_CONTENT_TYPE = bundles.CONTENT_TYPE
PARQUET = "application/vnd.apache.parquet"
# In-epoch progress at most this often (epoch ends are milestones: always published).
BATCH_PROGRESS_INTERVAL_S = 1.0
TRAINING_START_PCT, TRAINING_END_PCT = 10.0, 95.0


def _iso(stamp: Any) -> str:
    return format_timestamp(stamp)


def _history_table(state: TrainState) -> bytes:
    rows = [stats.metrics() for stats in state.history]
    columns = {name: [row[name] for row in rows] for name in rows[0]} if rows else {}
    table = pa.table(
        {
            "epoch": pa.array(columns.get("epoch", []), type=pa.int64()),
            **{
                name: pa.array(columns.get(name, []), type=pa.float64())
                for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "learning_rate")
            },
            "duration": pa.array(columns.get("duration", []), type=pa.float64()),  # seconds
        }
    )
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _split_summary(prepared: Prepared, ranges: SplitRanges) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name in ("train", "validation", "test"):
        rows = prepared.sample_rows[getattr(ranges, name)]
        counts = class_counts(prepared.labels[rows], len(CLASS_NAMES))
        summary[name] = {
            "start": _iso(prepared.timestamps[rows[0]]),
            "end": _iso(prepared.timestamps[rows[-1]]),
            "samples": len(rows),
            "classes": dict(zip(CLASS_NAMES, counts, strict=True)),
        }
    return summary


def _training_metrics(state: TrainState) -> dict[str, Any]:
    history = [stats.metrics() for stats in state.history]
    keys = ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "learning_rate", "duration")
    return {
        "epochs_trained": len(history),
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "final_val_loss": history[-1]["val_loss"] if history else None,
        "best_val_loss": min(h["val_loss"] for h in history) if history else None,
        "best_epoch": state.best_epoch,
        "stopped_early": state.stopped_early,
        "history": {key: [h[key] for h in history] for key in keys},
    }


def _limit_threads() -> None:
    """Match torch's CPU threads to the container's CPU quota (it sees the host's cores)."""
    quota = cpu_quota()
    if quota is not None and math.floor(quota) < torch.get_num_threads():
        torch.set_num_threads(max(1, math.floor(quota)))


def _test_metrics(
    model: torch.nn.Module, data: TensorData, prepared: Prepared, ranges: SplitRanges
) -> dict[str, Any]:
    train_rows, test_rows = prepared.sample_rows[ranges.train], prepared.sample_rows[ranges.test]
    test_loss, test_accuracy, predicted, _ = evaluate(model, data, test_rows)
    truth = prepared.labels[test_rows]
    scores = classification_scores(truth, predicted, len(CLASS_NAMES))
    return {
        "test_accuracy": test_accuracy,
        "test_loss": test_loss,
        "precision": scores["precision"],
        "recall": scores["recall"],
        "f1_score": scores["f1_score"],
        "confusion_matrix": scores["confusion_matrix"],
        "class_names": list(CLASS_NAMES),
        "baseline_accuracy": baseline_accuracy(prepared.labels[train_rows], truth, len(CLASS_NAMES)),
        "test_samples": len(test_rows),
    }


class _Reporter:
    """Turns the trainer's callbacks into progress events, and a cancel into a stored
    partial bundle."""

    def __init__(self, ctx: OpContext, bundle_bytes: Any) -> None:
        self.ctx = ctx
        self.bundle_bytes = bundle_bytes  # (state_dict, metrics, partial) -> bytes

    @staticmethod
    def percent(epochs_done: float, total_epochs: int) -> float:
        return TRAINING_START_PCT + (TRAINING_END_PCT - TRAINING_START_PCT) * epochs_done / total_epochs

    def on_epoch(self, stats: EpochStats) -> None:
        self.ctx.milestone(
            self.percent(stats.epoch, stats.total_epochs),
            f"epoch {stats.epoch}/{stats.total_epochs}: train_loss {stats.train_loss:.4f}, "
            f"val_loss {stats.val_loss:.4f}, val_accuracy {stats.val_accuracy:.3f}",
            step="training",
            **stats.metrics(),
        )

    def on_batch(self, report: BatchReport) -> None:
        self.ctx.progress(
            self.percent(report.epoch - 1 + report.batch / report.total_batches, report.total_epochs),
            f"epoch {report.epoch}/{report.total_epochs}, batch {report.batch}/{report.total_batches}",
            step="training",
            epoch=report.epoch,
            total_epochs=report.total_epochs,
            batch=report.batch,
            total_batches=report.total_batches,
            running_loss=report.train_loss,
        )

    def on_cancel(self, state: TrainState) -> None:
        ctx = self.ctx
        if state.best_state is None:
            ctx.log("cancelled before the first epoch ended: no model to store", level="warning")
            return
        summary = {"epochs_trained": len(state.history), "best_epoch": state.best_epoch}
        try:
            name = ctx.artifact(
                "model", self.bundle_bytes(state.best_state, summary, True), MODEL_CONTENT_TYPE
            )
            ctx.artifact("history", _history_table(state), PARQUET)
        except Exception as exc:  # noqa: BLE001 - the cancel must still be acknowledged
            ctx.log(f"cancelled; storing the partial model failed: {exc}", level="error")
            return
        ctx.partial_saved = True
        ctx.log(
            f"cancelled after {len(state.history)} epoch(s); the best model so far (epoch "
            f"{state.best_epoch}) is stored as {name}"
        )


def run_training(
    ctx: OpContext, params: TrainParams, config: TrainerConfig, frame: pd.DataFrame, source: str
) -> dict[str, Any]:
    """Everything after loading the bars; returns the op's result (see ``runner.ops.train``)."""
    ctx.progress(4, "computing features", step="computing_features")
    prepared = prepare(frame, params.features, sequence_length(params))
    check_sequence_fits(params, prepared.n_rows, len(frame))
    ctx.progress(
        5, f"{len(prepared.names)} features", step="computing_features", features=len(prepared.names)
    )
    ctx.checkpoint()
    ctx.progress(6, f"labels: {params.labels.source}", step="generating_labels")
    prepared = with_labels(prepared, frame["close"].to_numpy(np.float64), params.labels)
    ctx.checkpoint()
    ctx.progress(8, "splitting in time order", step="splitting_data")
    ranges = split_prepared(prepared, params.data_split, params.labels)
    scaler = Standardizer.fit(prepared.features[scaler_rows(prepared, ranges)], prepared.names)
    sizes = [len(r) for r in (ranges.train, ranges.validation, ranges.test)]
    ctx.progress(
        9,
        "{}/{}/{} train/validation/test samples".format(*sizes),
        step="splitting_data",
        **dict(zip(("train_samples", "val_samples", "test_samples"), map(float, sizes), strict=True)),
    )
    ctx.checkpoint()

    _limit_threads()
    device = select_device()
    model_config = ModelConfig(
        model_type=params.model,
        input_size=len(prepared.names),
        hidden_layers=tuple(params.hidden_layers),
        dropout=params.dropout,
        sequence_length=sequence_length(params),
        num_classes=len(CLASS_NAMES),
    )
    splits = _split_summary(prepared, ranges)
    data_summary: dict[str, Any] = {
        "symbol": params.symbol,
        "timeframe": params.timeframe,
        "data_source": source,
        "synthetic_data": source.startswith("synthetic"),
        "bars": len(frame),
        "first_bar": _iso(frame.index[0]),
        "last_bar": _iso(frame.index[-1]),
        "splits": splits,
        "purge_gap": ranges.gap,
        "feature_count": len(prepared.names),
        "feature_names": list(prepared.names),
        "sequence_length": model_config.sequence_length,
        "labels": label_set.spec_to_dict(params.labels),
    }
    data_info = {
        **{k: data_summary[k] for k in ("symbol", "timeframe", "data_source", "first_bar", "last_bar")},
        **{k: {"start": v["start"], "end": v["end"], "samples": v["samples"]} for k, v in splits.items()},
    }
    training_info = {
        "params": msgspec.to_builtins(params),
        "device_type": device.type,
        "torch_version": str(torch.__version__),
    }

    def bundle_bytes(state_dict: dict[str, torch.Tensor], metrics: dict[str, Any], partial: bool) -> bytes:
        return bundles.save_bundle(
            bundles.bundle_dict(
                state_dict=state_dict,
                model_config=model_config,
                feature_spec=params.features,
                scaler=scaler,
                label_spec=params.labels,
                metrics=metrics,
                data=data_info,
                training=training_info,
                partial=partial,
            )
        )

    reporter = _Reporter(ctx, bundle_bytes)
    with reproducible(config.seed, config.deterministic):
        ctx.progress(10, f"creating {params.model} on {device.type}", step="creating_model")
        model = build_model(model_config).to(device)
        data = TensorData(
            scaler.transform(prepared.features), prepared.labels, model_config.sequence_length, device
        )
        hooks = TrainHooks(
            checkpoint=ctx.checkpoint,
            on_epoch=reporter.on_epoch,
            on_batch=reporter.on_batch,
            on_cancel=reporter.on_cancel,
            batch_interval_s=BATCH_PROGRESS_INTERVAL_S,
        )
        train_rows, val_rows = (prepared.sample_rows[r] for r in (ranges.train, ranges.validation))
        state = train(model, data, train_rows, val_rows, config, hooks)

    ctx.progress(
        TRAINING_END_PCT, f"scoring epoch {state.best_epoch}'s model on the test split", step="evaluating"
    )
    test_metrics = _test_metrics(model, data, prepared, ranges)
    training_metrics = _training_metrics(state)
    ctx.progress(97, "storing the model bundle and the history", step="saving_model")
    summary = {k: v for k, v in training_metrics.items() if k != "history"}
    artifacts = {
        "model": ctx.artifact(
            "model", bundle_bytes(model.state_dict(), {**test_metrics, **summary}, False), MODEL_CONTENT_TYPE
        ),
        "history": ctx.artifact("history", _history_table(state), PARQUET),
    }
    ctx.progress(100, "training complete", step="done")
    return clean(
        {
            "training_metrics": training_metrics,
            "test_metrics": test_metrics,
            "model_info": {
                "model_type": params.model,
                "parameters_count": parameter_count(model),
                "architecture": describe(model_config),
                "config": model_config.to_dict(),
            },
            "data_summary": data_summary,
            "device": device_info(device),
            "settings": msgspec.to_builtins(params),
            "artifacts": artifacts,
        }
    )
