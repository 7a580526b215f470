"""The ``train`` operation run in-process with real torch (no Docker, no NATS).

Numbers the op reports are checked against computations written here from scratch: the
features and labels with numpy, the time split, the scaler, and the test accuracy with
plain torch from the saved bundle.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from runner import registry
from runner.errors import Cancelled, DataError, InvalidParams
from runner.ops.train import TrainParams
from runner.protocol import ProgressSnapshot
from runner.sdk import LocalSink, OpContext, artifact_name, local_context
from runner.train import bundle as bundles
from runner.train import run as train_run
from runner.train.dataset import window_indices
from runner.train.features import Standardizer, compute_features
from runner.train.labels import LabelSpec, make_labels
from runner.train.split import DataSplit, split_samples
from tests.conftest import ktrdr_csv

EPOCH_METRICS = {
    "epoch", "total_epochs", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
    "learning_rate", "duration",
}  # fmt: skip
STEPS = [
    "loading_data", "computing_features", "generating_labels", "splitting_data", "creating_model",
    "training", "evaluating", "saving_model", "done",
]  # fmt: skip
FAST = {"hidden_layers": [16], "batch_size": 64, "dropout": 0.0}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Any:
    """One intra-op thread: these models are tiny, and torch's spinning worker threads slow
    to a crawl when another process takes a CPU (CI shares this machine with image builds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GOOG daily and EURUSD hourly (real market data from backtesting.py), KTRDR layout."""
    bt = pytest.importorskip("backtesting.test")
    directory = tmp_path_factory.mktemp("data")
    ktrdr_csv(bt.GOOG, directory / "GOOG_1d.csv")
    ktrdr_csv(bt.EURUSD, directory / "EURUSD_1h.csv")
    return directory


def _bars(data_dir: Path, name: str) -> pd.DataFrame:
    frame = pd.read_csv(data_dir / name, index_col="timestamp")
    frame.index = pd.to_datetime(frame.index, utc=True)
    return frame


class Run:
    """One op run: its result, sink, context, the content types of its artifacts and the
    progress reports sent as milestones."""

    def __init__(
        self,
        result: dict[str, Any],
        sink: LocalSink,
        ctx: OpContext,
        types: dict[str, str],
        milestones: list[ProgressSnapshot],
    ):
        self.result, self.sink, self.ctx, self.types = result, sink, ctx, types
        self.milestones = milestones

    def artifact(self, name: str) -> bytes:
        return self.sink.stored[self.ctx.artifacts[name]]


def _run(params: dict[str, Any], data_dir: Path | None, scratch: Path, on_progress: Any = None) -> Run:
    op = registry.get("train")
    ctx, sink = local_context("train", data_dir=data_dir, scratch_dir=scratch)
    record, store = sink.progress, sink.artifact
    types: dict[str, str] = {}
    milestones: list[ProgressSnapshot] = []

    def progress(snapshot: ProgressSnapshot, milestone: bool = False) -> None:
        record(snapshot, milestone)
        if milestone:
            milestones.append(snapshot)
        if on_progress is not None:
            on_progress(ctx, snapshot)

    def artifact(name: str, object_name: str, data: bytes, content_type: str) -> None:
        types[name] = content_type
        store(name, object_name, data, content_type)

    sink.progress = progress  # type: ignore[method-assign]
    sink.artifact = artifact  # type: ignore[method-assign]
    return Run(op.fn(ctx, op.parse_params(params)), sink, ctx, types, milestones)


# -- independent computations ----------------------------------------------------------------


def reference_features(frame: pd.DataFrame) -> pd.DataFrame:
    """The default feature set computed here with numpy windows (NaN during warm-up)."""
    c, h, lo, v = (frame[k].to_numpy(np.float64) for k in ("close", "high", "low", "volume"))
    n = len(c)

    def trail(values: np.ndarray, w: int, fn: Any) -> np.ndarray:
        out = np.full(n, np.nan)
        out[w - 1 :] = fn(sliding_window_view(values, w), axis=1)
        return out

    r1 = np.concatenate([[np.nan], np.diff(np.log(c))])
    cols: dict[str, np.ndarray] = {}
    for k in (1, 5, 10, 20):
        cols[f"log_return_{k}"] = np.concatenate([np.full(k, np.nan), np.log(c[k:] / c[:-k])])
    for w in (10, 20):
        cols[f"volatility_{w}"] = trail(r1, w, lambda x, axis: np.std(x, axis=axis, ddof=1))
    d = np.concatenate([[np.nan], np.diff(c)])
    gain = trail(np.where(d > 0, d, 0.0), 14, np.mean)
    loss = trail(np.where(d < 0, -d, 0.0), 14, np.mean)
    gain[:14] = np.nan  # the first change is unknown
    with np.errstate(invalid="ignore", divide="ignore"):
        cols["rsi_14"] = np.where(gain + loss == 0, 50.0, 100 * gain / (gain + loss))
    for w in (10, 20, 50):
        cols[f"close_sma_{w}"] = c / trail(c, w, np.mean)
    pc = np.concatenate([[np.nan], c[:-1]])
    tr = np.maximum.reduce([h - lo, np.abs(h - pc), np.abs(lo - pc)])
    cols["atr_14"] = trail(tr, 14, np.mean) / c
    mean, std = trail(v, 20, np.mean), trail(v, 20, np.std)
    with np.errstate(invalid="ignore", divide="ignore"):
        cols["volume_zscore_20"] = np.where(std == 0, 0.0, (v - mean) / std)
    return pd.DataFrame(cols, index=frame.index)


def reference_samples(frame: pd.DataFrame, split: tuple[float, float, float], gap: int) -> dict[str, Any]:
    """Next-bar direction labels (threshold 0) and the time split, computed here."""
    feats = reference_features(frame).dropna()
    close = frame["close"].to_numpy()
    pos = frame.index.get_indexer(feats.index)
    keep = pos < len(close) - 1
    feats, pos = feats[keep], pos[keep]
    ret = close[pos + 1] / close[pos] - 1
    labels = np.where(ret > 0, 2, np.where(ret < 0, 0, 1))
    usable = len(feats) - 2 * gap
    n_train, n_val = int(usable * split[0]), int(usable * split[1])
    parts = {
        "train": slice(0, n_train),
        "validation": slice(n_train + gap, n_train + gap + n_val),
        "test": slice(n_train + 2 * gap + n_val, len(feats)),
    }
    return {"features": feats, "labels": labels, "parts": parts}


def plain_mlp_logits(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """An MLP's forward pass written out: linear layers with ReLU between, in key order."""
    weights = [k for k in state if k.endswith(".weight")]
    for i, key in enumerate(weights):
        x = x @ state[key].T + state[key[: -len("weight")] + "bias"]
        if i < len(weights) - 1:
            x = torch.relu(x)
    return x


# -- params ------------------------------------------------------------------------------------


def test_op_module_does_not_import_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import runner.ops.train"],
        capture_output=True,
        text=True,
        check=True,
    )
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in out.stderr.splitlines()}
    assert "runner" in imported
    assert not imported & {"torch", "numpy", "pandas", "pyarrow"}, imported & {"torch", "numpy", "pandas"}


def test_registered_with_gpu_preferred() -> None:
    op = registry.get("train")
    assert op.gpu == "preferred" and op.preflight is not None and op.check is not None
    p = op.parse_params({"symbol": "DEMO"})
    assert isinstance(p, TrainParams)
    assert (p.model, p.epochs, p.batch_size, p.learning_rate, p.optimizer) == ("mlp", 100, 32, 0.001, "adam")
    assert (p.data_split.train, p.data_split.validation, p.data_split.test) == (0.7, 0.15, 0.15)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"model": "transformer"}, "model"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"dropout": 1.0}, "dropout"),
        ({"optimizer": "adamw"}, "optimizer"),
        ({"weight_decay": -1}, "weight_decay"),
        ({"gradient_clip": 0}, "gradient_clip"),
        ({"class_weights": "auto"}, "class_weights"),
        ({"hidden_layers": []}, "hidden_layers"),
        ({"hidden_layers": [8, 0]}, "hidden_layers[1]"),
        ({"lr_scheduler": "exponential"}, "lr_scheduler"),
        ({"lr_scheduler": {"type": "step", "step_size": 0}}, "lr_scheduler.step_size"),
        ({"early_stopping": {"monitor": "loss"}}, "early_stopping.monitor"),
        ({"early_stopping": {"patience": 0}}, "early_stopping.patience"),
        ({"model": "lstm", "sequence_length": 1}, "sequence_length"),
        ({"model": "mlp", "sequence_length": 10}, "sequence_length"),
        ({"data_split": {"train": 0.7, "validation": 0.2, "test": 0.2}}, "data_split.train"),
        ({"data_split": {"train": 0.85, "validation": 0.0, "test": 0.15}}, "data_split.validation"),
        ({"labels": {"source": "zigzag"}}, "labels.source"),
        ({"labels": {"source": "next_direction", "horizon": 5}}, "labels.horizon"),
        ({"labels": {"threshold": -0.01}}, "labels.threshold"),
        ({"features": {"sma_windows": [10, 10]}}, "features.sma_windows"),
        ({"features": {"rsi_period": 1}}, "features.rsi_period"),
        ({"start": "01/02/2020"}, "start"),
        ({"start": "2021-01-01", "end": "2020-01-01"}, "end"),
        ({"seed": -1}, "seed"),
        ({"symbol": "../x"}, "symbol"),
        ({"epoch": 3}, "epoch"),
    ],
)  # fmt: skip
def test_invalid_params_name_the_field(params: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidParams) as info:
        registry.get("train").parse_params({"symbol": "DEMO", **params})
    assert info.value.field == field, str(info.value)
    if field == "model":
        assert "mlp, lstm, gru" in str(info.value)
    if field == "data_split.train":
        assert "sum to 1" in str(info.value)


def test_cli_strings_are_accepted() -> None:
    p = registry.get("train").parse_params(
        {"symbol": "DEMO", "epochs": "3", "lr_scheduler": "cosine", "deterministic": "false"}, strict=False
    )
    assert isinstance(p, TrainParams)
    assert (p.epochs, p.lr_scheduler, p.deterministic) == (3, "cosine", False)


def test_preflight_checks_the_data(data_dir: Path, tmp_path: Path) -> None:
    op = registry.get("train")
    assert op.preflight is not None
    long = op.parse_params({"symbol": "DEMO", "model": "lstm", "sequence_length": 5000})
    with pytest.raises(InvalidParams) as info:
        op.preflight(long, None)
    assert info.value.field == "sequence_length" and "longer than the data" in str(info.value)
    with pytest.raises(InvalidParams) as info:  # the op refuses it the same way
        op.fn(local_context("train", scratch_dir=tmp_path)[0], long)
    assert info.value.field == "sequence_length"
    with pytest.raises(DataError, match="no data directory is mounted"):
        op.preflight(op.parse_params({"symbol": "GOOG"}), None)
    with pytest.raises(DataError, match=r"NOPE_1d\.csv: data file not found"):
        op.preflight(op.parse_params({"symbol": "NOPE"}), data_dir)
    short = op.parse_params({"symbol": "GOOG", "start": "2010-01-01", "end": "2010-03-22"})
    with pytest.raises(DataError, match="cannot fill train/validation/test"):
        op.preflight(short, data_dir)
    shorter = op.parse_params({"symbol": "GOOG", "start": "2010-01-01", "end": "2010-02-28"})
    with pytest.raises(DataError, match="longest window needs 50 bars"):
        op.preflight(shorter, data_dir)
    op.preflight(op.parse_params({"symbol": "GOOG", "model": "gru"}), data_dir)


# -- the building blocks -----------------------------------------------------------------------


def test_labels_by_hand() -> None:
    close = np.array([100.0, 101.0, 100.5, 100.5, 99.0])
    spec = LabelSpec(threshold=0.004)
    assert make_labels(close, spec).tolist() == [2, 0, 1, 0, -1]
    forward = LabelSpec(source="forward_return", horizon=2, threshold=0.004)
    assert make_labels(close, forward).tolist() == [2, 0, 0, -1, -1]


def test_split_is_time_ordered_with_a_purge_gap() -> None:
    ranges = split_samples(100, DataSplit(), gap=2)
    assert (len(ranges.train), len(ranges.validation), len(ranges.test)) == (67, 14, 15)
    assert ranges.train.start == 0 and ranges.test.stop == 100
    assert ranges.validation.start - ranges.train.stop == 2 == ranges.test.start - ranges.validation.stop
    with pytest.raises(DataError, match="cannot fill"):
        split_samples(5, DataSplit(), gap=1)


def test_standardizer_floors_a_constant_feature() -> None:
    values = np.array([[1.0, 5.0], [3.0, 5.0], [5.0, 5.0]])
    scaler = Standardizer.fit(values, ["a", "b"])
    assert scaler.mean == [3.0, 5.0] and scaler.std == [pytest.approx(np.sqrt(8 / 3)), 1.0]
    assert np.isfinite(scaler.transform(np.array([[2.0, 7.0]]))).all()


def test_features_match_an_independent_computation(data_dir: Path) -> None:
    frame = _bars(data_dir, "GOOG_1d.csv")
    ours = compute_features(frame)
    theirs = reference_features(frame).dropna()
    assert list(ours.index) == list(theirs.index) and list(ours.columns) == list(theirs.columns)
    np.testing.assert_allclose(ours.to_numpy(), theirs.to_numpy(), rtol=1e-9, atol=1e-12)


def test_no_look_ahead_in_features_and_windows(data_dir: Path) -> None:
    frame = _bars(data_dir, "GOOG_1d.csv")
    t = frame.index[1200]
    changed = frame.copy()
    later = changed.index >= t
    rng = np.random.default_rng(7)
    scale = np.exp(rng.normal(0, 0.05, later.sum()))
    for col in ("open", "high", "low", "close"):
        changed.loc[later, col] *= scale
    changed.loc[later, "volume"] *= 3
    before, after = compute_features(frame), compute_features(changed)
    pd.testing.assert_frame_equal(before[before.index < t], after[after.index < t], check_exact=True)
    assert not np.allclose(before.loc[t], after.loc[t]), "the changed bar itself must show"
    # Windows of a recurrent model end at their own row.
    rows = np.array([30, 31, 99])
    assert window_indices(rows, 5).tolist() == [
        [26, 27, 28, 29, 30],
        [27, 28, 29, 30, 31],
        [95, 96, 97, 98, 99],
    ]


# -- the op on real data -----------------------------------------------------------------------

GOOG_MLP = {
    "symbol": "GOOG", "model": "mlp", "hidden_layers": [32, 16], "dropout": 0.0, "epochs": 8,
    "batch_size": 64, "learning_rate": 0.005, "early_stopping": {"enabled": False}, "seed": 3,
}  # fmt: skip


@pytest.fixture(scope="module")
def goog_mlp(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return _run(GOOG_MLP, data_dir, tmp_path_factory.mktemp("scratch"))


def test_training_loss_falls_and_each_epoch_is_reported_once(goog_mlp: Run) -> None:
    result = goog_mlp.result
    history = result["training_metrics"]["history"]
    assert result["training_metrics"]["epochs_trained"] == 8 == len(history["train_loss"])
    assert history["train_loss"][-1] < history["train_loss"][0] * 0.98
    epoch_events = [
        r for r in goog_mlp.sink.progress_reports if r.step == "training" and "batch" not in r.metrics
    ]
    assert [set(r.metrics) for r in epoch_events] == [EPOCH_METRICS] * 8
    assert [r.metrics["epoch"] for r in epoch_events] == list(range(1, 9))
    assert goog_mlp.milestones == epoch_events, "every epoch event is published for sure"
    for key in EPOCH_METRICS - {"epoch", "total_epochs"}:
        assert [r.metrics[key] for r in epoch_events] == pytest.approx(history[key]), key
    steps = [r.step for r in goog_mlp.sink.progress_reports]
    assert sorted(set(steps), key=steps.index) == STEPS
    percents = [r.percent for r in goog_mlp.sink.progress_reports]
    assert percents == sorted(percents) and percents[-1] == 100


def test_result_shape_and_artifacts(goog_mlp: Run) -> None:
    result = goog_mlp.result
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    assert set(result) >= {
        "training_metrics",
        "test_metrics",
        "model_info",
        "data_summary",
        "device",
        "artifacts",
    }
    tm = result["training_metrics"]
    assert tm["best_val_loss"] == min(tm["history"]["val_loss"])
    assert tm["history"]["val_loss"][tm["best_epoch"] - 1] == tm["best_val_loss"]  # monitor val_loss
    assert tm["final_train_loss"] == tm["history"]["train_loss"][-1]
    assert (
        result["device"]["type"] in ("cpu", "cuda") and result["device"]["torch_version"] == torch.__version__
    )
    summary = result["data_summary"]
    assert summary["feature_count"] == 12 == len(summary["feature_names"])
    assert goog_mlp.types == {"model": "application/x-pytorch", "history": "application/vnd.apache.parquet"}
    for name, stored in result["artifacts"].items():
        assert stored == artifact_name(goog_mlp.artifact(name)), name
    table = pq.read_table(io.BytesIO(goog_mlp.artifact("history"))).to_pandas()
    assert list(table["epoch"]) == list(range(1, 9))
    for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy", "learning_rate", "duration"):
        assert list(table[key]) == pytest.approx(tm["history"][key]), key
    assert all(d > 0 for d in table["duration"])


def test_test_accuracy_recomputed_from_the_bundle(goog_mlp: Run, data_dir: Path) -> None:
    saved = torch.load(io.BytesIO(goog_mlp.artifact("model")), map_location="cpu", weights_only=True)
    assert saved["format"] == {"name": "ktrdr-run.model-bundle", "version": 1} and saved["partial"] is False
    frame = _bars(data_dir, "GOOG_1d.csv")
    ref = reference_samples(frame, (0.7, 0.15, 0.15), gap=1)
    feats, labels, parts = ref["features"], ref["labels"], ref["parts"]
    summary = goog_mlp.result["data_summary"]["splits"]
    for name, part in parts.items():
        stamps = feats.index[part]
        assert summary[name]["samples"] == len(stamps), name
        assert summary[name]["start"] == stamps[0].strftime("%Y-%m-%dT%H:%M:%SZ"), name
        assert summary[name]["end"] == stamps[-1].strftime("%Y-%m-%dT%H:%M:%SZ"), name
    mean, std = np.array(saved["scaler"]["mean"]), np.array(saved["scaler"]["std"])
    x = torch.tensor(((feats.to_numpy()[parts["test"]] - mean) / std).astype(np.float32))
    logits = plain_mlp_logits(saved["state_dict"], x)
    truth = torch.tensor(labels[parts["test"]])
    accuracy = float((logits.argmax(dim=1) == truth).double().mean())
    tested = goog_mlp.result["test_metrics"]
    n_test = len(truth)
    # Features computed two ways differ by ~1e-15: allow one sample whose logits tie that closely.
    assert abs(accuracy - tested["test_accuracy"]) * n_test <= 1 + 1e-9
    loss = float(torch.nn.functional.cross_entropy(logits, truth))
    assert tested["test_loss"] == pytest.approx(loss, rel=1e-4)
    majority = np.bincount(labels[parts["train"]], minlength=3).argmax()
    assert tested["baseline_accuracy"] == pytest.approx(float(np.mean(labels[parts["test"]] == majority)))
    assert np.array(tested["confusion_matrix"]).sum() == n_test
    assert (
        np.array(tested["confusion_matrix"]).sum(axis=1).tolist() == np.bincount(truth, minlength=3).tolist()
    )
    # The op's own prediction path agrees with the plain one.
    stamps, classes, probabilities = bundles.predict(bundles.load_bundle(goog_mlp.artifact("model")), frame)
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    test_stamps = feats.index[parts["test"]].tz_localize(None).to_numpy(dtype="datetime64[ns]")
    picked = np.isin(stamps, test_stamps)
    agree = classes[picked] == logits.argmax(dim=1).numpy()
    assert agree.sum() >= n_test - 1


def test_scaler_is_fitted_on_training_rows_only(goog_mlp: Run, data_dir: Path) -> None:
    saved = torch.load(io.BytesIO(goog_mlp.artifact("model")), map_location="cpu", weights_only=True)
    ref = reference_samples(_bars(data_dir, "GOOG_1d.csv"), (0.7, 0.15, 0.15), gap=1)
    train = ref["features"].to_numpy()[ref["parts"]["train"]]
    assert saved["scaler"]["names"] == list(ref["features"].columns)
    np.testing.assert_allclose(saved["scaler"]["mean"], train.mean(axis=0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(saved["scaler"]["std"], train.std(axis=0), rtol=1e-9, atol=1e-12)
    everything = ref["features"].to_numpy()
    assert not np.allclose(saved["scaler"]["mean"], everything.mean(axis=0), rtol=1e-3)


def test_same_seed_same_losses(data_dir: Path, tmp_path: Path) -> None:
    params = {"symbol": "EURUSD", "timeframe": "1h", "epochs": 3, **FAST, "dropout": 0.2}
    first = _run(params, data_dir, tmp_path / "a").result
    second = _run(params, data_dir, tmp_path / "b").result
    other = _run({**params, "seed": 7}, data_dir, tmp_path / "c").result
    for key in ("train_loss", "val_loss", "train_accuracy", "val_accuracy"):
        assert first["training_metrics"]["history"][key] == second["training_metrics"]["history"][key], key
    assert first["artifacts"]["model"] == second["artifacts"]["model"], "identical runs, identical bundle"
    assert (
        first["training_metrics"]["history"]["train_loss"]
        != other["training_metrics"]["history"]["train_loss"]
    )


@pytest.mark.parametrize("model", ["mlp", "lstm", "gru"])
def test_every_model_type_trains(model: str, data_dir: Path, tmp_path: Path) -> None:
    extra = {"sequence_length": 8} if model != "mlp" else {}
    run = _run(
        {"symbol": "EURUSD", "timeframe": "1h", "model": model, "epochs": 2, **FAST, **extra},
        data_dir,
        tmp_path,
    )
    result = run.result
    assert result["training_metrics"]["epochs_trained"] == 2
    assert result["model_info"]["model_type"] == model
    saved = torch.load(io.BytesIO(run.artifact("model")), map_location="cpu", weights_only=True)
    assert result["model_info"]["parameters_count"] == sum(t.numel() for t in saved["state_dict"].values())
    assert saved["model"]["sequence_length"] == (8 if model != "mlp" else 1)
    built = bundles.build_model_from_bundle(saved)
    assert not built.training


def test_recurrent_predictions_do_not_look_ahead(data_dir: Path, tmp_path: Path) -> None:
    run = _run({**GOOG_MLP, "model": "lstm", "sequence_length": 10, "epochs": 1}, data_dir, tmp_path)
    saved = bundles.load_bundle(run.artifact("model"))
    frame = _bars(data_dir, "GOOG_1d.csv")
    stamps, _, probs = bundles.predict(saved, frame)
    # The first feature row is bar 49 (the 50-bar SMA); a 10-row window ends 9 rows later.
    assert stamps[0] == frame.index[49 + 10 - 1].tz_localize(None).to_datetime64()
    cut = 1200
    changed = frame.copy()
    changed.iloc[cut:, :4] *= 1.5
    changed_stamps, _, changed_probs = bundles.predict(saved, changed)
    t = frame.index[cut].tz_localize(None).to_datetime64()
    early = stamps < t
    assert (changed_stamps == stamps).all()
    np.testing.assert_array_equal(changed_probs[early], probs[early])
    assert not np.array_equal(changed_probs[stamps == t], probs[stamps == t]), "bar t itself must show"
    # Cutting the data off at t predicts the same for every bar before it.
    cut_stamps, _, cut_probs = bundles.predict(saved, frame.iloc[:cut])
    np.testing.assert_array_equal(cut_stamps, stamps[early])
    np.testing.assert_allclose(cut_probs, probs[early], rtol=0, atol=1e-7)


def test_schedule_weights_and_early_stopping(data_dir: Path, tmp_path: Path) -> None:
    params = {
        **GOOG_MLP, "epochs": 3, "optimizer": "sgd", "learning_rate": 0.04, "gradient_clip": 1.0,
        "class_weights": "balanced", "lr_scheduler": {"type": "step", "step_size": 1, "gamma": 0.5},
    }  # fmt: skip
    history = _run(params, data_dir, tmp_path / "a").result["training_metrics"]["history"]
    assert history["learning_rate"] == pytest.approx([0.04, 0.02, 0.01])
    stop = {"enabled": True, "patience": 2, "monitor": "val_accuracy", "min_delta": 1.0}
    result = _run({**GOOG_MLP, "epochs": 10, "early_stopping": stop}, data_dir, tmp_path / "b").result
    tm = result["training_metrics"]
    assert (tm["epochs_trained"], tm["best_epoch"], tm["stopped_early"]) == (3, 1, True)


def test_cancel_mid_epoch_stores_the_best_model_so_far(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(train_run, "BATCH_PROGRESS_INTERVAL_S", 0.0)  # report every batch

    def trip(ctx: OpContext, snapshot: ProgressSnapshot) -> None:
        if snapshot.metrics.get("epoch") == 2 and snapshot.metrics.get("batch") == 5:
            ctx.cancel_token.cancel("user asked")

    op = registry.get("train")
    ctx, sink = local_context("train", data_dir=data_dir, scratch_dir=tmp_path)
    record = sink.progress

    def progress(snapshot: ProgressSnapshot, milestone: bool = False) -> None:
        record(snapshot, milestone)
        trip(ctx, snapshot)

    sink.progress = progress  # type: ignore[method-assign]
    with pytest.raises(Cancelled, match="user asked"):
        op.fn(ctx, op.parse_params({**GOOG_MLP, "batch_size": 32}))
    batches = [
        (r.metrics["epoch"], r.metrics["batch"]) for r in sink.progress_reports if "batch" in r.metrics
    ]
    assert batches[-1] == (2, 5), "no batch ran after the one during which cancel was asked"
    assert ctx.partial_saved is True and set(ctx.artifacts) == {"model", "history"}
    saved = torch.load(io.BytesIO(sink.stored[ctx.artifacts["model"]]), map_location="cpu", weights_only=True)
    assert saved["partial"] is True and saved["metrics"] == {"epochs_trained": 1, "best_epoch": 1}
    assert bundles.build_model_from_bundle(saved) is not None


def test_cancel_in_the_first_epoch_has_nothing_to_store(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(train_run, "BATCH_PROGRESS_INTERVAL_S", 0.0)
    op = registry.get("train")
    ctx, sink = local_context("train", data_dir=data_dir, scratch_dir=tmp_path)
    record = sink.progress

    def progress(snapshot: ProgressSnapshot, milestone: bool = False) -> None:
        record(snapshot, milestone)
        if snapshot.metrics.get("batch") == 2:
            ctx.cancel_token.cancel("stop")

    sink.progress = progress  # type: ignore[method-assign]
    with pytest.raises(Cancelled):
        op.fn(ctx, op.parse_params(GOOG_MLP))
    assert ctx.partial_saved is False and ctx.artifacts == {} and sink.stored == {}
    assert any("no model to store" in message for _, message in sink.logs)


def test_bundle_params_round_trip(goog_mlp: Run) -> None:
    saved = bundles.load_bundle(goog_mlp.artifact("model"))
    params = msgspec.convert(saved["training"]["params"], TrainParams)
    assert params.model == "mlp" and params.seed == 3
    splits = goog_mlp.result["data_summary"]["splits"]
    for name in ("train", "validation", "test"):  # the backtest model strategy reads these
        assert saved["data"][name] == {k: splits[name][k] for k in ("start", "end", "samples")}
    assert (saved["data"]["symbol"], saved["data"]["timeframe"]) == ("GOOG", "1d")
    with pytest.raises(DataError, match="not a readable model bundle"):
        bundles.load_bundle(b"not a bundle")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trains_on_the_gpu_and_loads_on_the_cpu(data_dir: Path, tmp_path: Path) -> None:
    run = _run({**GOOG_MLP, "epochs": 2}, data_dir, tmp_path)
    assert run.result["device"]["type"] == "cuda" and run.result["device"]["cuda_version"]
    saved = torch.load(io.BytesIO(run.artifact("model")), map_location="cpu", weights_only=True)
    assert all(t.device.type == "cpu" for t in saved["state_dict"].values())
    bundles.predict(saved, _bars(data_dir, "GOOG_1d.csv"))
