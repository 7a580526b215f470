"""The ``train`` op in real containers, and the model it stores backtested.

Real dispatcher, real nats-server, real containers of the runner image (torch inside),
real market data (backtesting.py's GOOG daily and EURUSD hourly). Events are read as a
plain NATS client would; the model bundle is loaded with ``weights_only=True`` and its
predictions recomputed here with plain torch and an independent feature computation.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from dispatcher.config import Config
from ktrdr_run import Client
from ktrdr_run.errors import InvalidJob
from tests.conftest import RunningDispatcher, creations, ktrdr_csv, run_cli, write_config
from tests.test_core_path import read_op_events
from tests.test_train import plain_mlp_logits, reference_features

pytestmark = [pytest.mark.docker, pytest.mark.nats]

EPOCH_METRICS = {
    "epoch", "total_epochs", "train_loss", "train_accuracy",
    "val_loss", "val_accuracy", "learning_rate", "duration",
}  # fmt: skip
FAST = ["-p", "hidden_layers=[16]", "-p", "batch_size=64", "-p", "dropout=0"]


@pytest.fixture
def data_dir(tmp_state: Path) -> Path:
    bt = pytest.importorskip("backtesting.test")
    directory = tmp_state / "data"
    directory.mkdir()
    directory.chmod(0o755)
    tmp_state.chmod(0o755)
    ktrdr_csv(bt.GOOG, directory / "GOOG_1d.csv")
    ktrdr_csv(bt.EURUSD, directory / "EURUSD_1h.csv")
    return directory


async def cli(args: list[str], config_path: Path) -> Any:
    done = await asyncio.to_thread(run_cli, args, config_path, 300)
    return done


def epoch_events(events: list[dict[str, Any]]) -> list[dict[str, float]]:
    return [
        e["metrics"]
        for e in events
        if e["event"] == "progress" and "val_loss" in e["metrics"] and "batch" not in e["metrics"]
    ]


async def test_training_in_a_container_learns_and_repeats_itself(
    config: Config, dispatcher: RunningDispatcher, tmp_state: Path, data_dir: Path
) -> None:
    config_path = write_config(config, tmp_state / "ktrdr-run.toml")
    histories = []
    for job_id in ("train-a", "train-b"):
        args = ["train", "--symbol", "GOOG", "--timeframe", "1d", "--model", "mlp", "-p", "epochs=8"]
        args += ["-p", "seed=7", *FAST, "--data-dir", str(data_dir), "--job-id", job_id, "--json"]
        done = await cli(args, config_path)
        assert done.returncode == 0, done.stderr
        record = json.loads(done.stdout)
        assert record["state"] == "completed"
        history = record["result"]["training_metrics"]["history"]
        epochs = epoch_events(await read_op_events(config.nats.url, job_id))
        # one progress event per epoch, with KTRDR's names, and the same numbers as the result
        assert [int(m["epoch"]) for m in epochs] == list(range(1, len(history["train_loss"]) + 1))
        assert all(EPOCH_METRICS <= set(m) for m in epochs)
        assert [m["train_loss"] for m in epochs] == pytest.approx(history["train_loss"])
        histories.append(history)
    first, second = histories
    assert first["train_loss"][-1] < first["train_loss"][0]  # it learns
    assert first["train_loss"] == second["train_loss"] and first["val_loss"] == second["val_loss"]
    device = record["result"]["device"]
    assert device["type"] == "cpu" and device["torch_version"].startswith("2.13")


async def test_hourly_recurrent_training_in_a_container(
    config: Config, dispatcher: RunningDispatcher, tmp_state: Path, data_dir: Path
) -> None:
    config_path = write_config(config, tmp_state / "ktrdr-run.toml")
    args = ["train", "--symbol", "EURUSD", "--timeframe", "1h", "--model", "gru", "-p", "epochs=2"]
    args += ["-p", "sequence_length=8", *FAST, "--data-dir", str(data_dir), "--json"]
    done = await cli(args, config_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)["result"]
    assert result["model_info"]["model_type"] == "gru"
    assert result["data_summary"]["timeframe"] == "1h"
    assert result["training_metrics"]["epochs_trained"] == 2


async def test_cancel_mid_epoch_is_acknowledged_within_a_batch_with_a_checkpoint(
    config: Config, dispatcher: RunningDispatcher, data_dir: Path
) -> None:
    async with Client(config) as client:
        op = await client.submit(
            "train",
            {
                "symbol": "GOOG",
                "model": "lstm",
                "epochs": 500,
                "batch_size": 16,
                "hidden_layers": [32],
                "early_stopping": {"enabled": False},
            },
            data_dir=data_dir,
        )
        requested_at = 0.0
        batches_after = 0
        ack: Any = None
        async with asyncio.timeout(240):
            async for event in op.events():
                metrics = getattr(event, "metrics", {})
                # the end of epoch 1: the cancel lands in the middle of epoch 2
                if not requested_at and metrics.get("epoch") == 1 and "val_loss" in metrics:
                    requested_at = time.time()
                    await op.cancel("enough")
                elif requested_at and "batch" in metrics and event.ts > requested_at + 0.5:
                    batches_after += 1  # published well after the request: a batch too many
                if type(event).__name__ == "CancelAckEvent":
                    ack = event
        record = await op.wait(timeout_s=60)
        assert ack is not None and ack.partial_saved, (record.state, record.error, requested_at)
        assert ack.ts - requested_at < 5.0 and batches_after == 0
        assert record.state == "cancelled" and record.cancel is not None and record.cancel.partial_saved
        bundle = torch.load(io.BytesIO(await op.artifact("model")), map_location="cpu", weights_only=True)
        assert bundle["partial"] is True and bundle["model"]["model_type"] == "lstm"


async def test_a_model_backtest_trades_the_predictions(
    config: Config, dispatcher: RunningDispatcher, tmp_state: Path, data_dir: Path
) -> None:
    config_path = write_config(config, tmp_state / "ktrdr-run.toml")
    args = ["train", "--symbol", "GOOG", "--model", "mlp", "-p", "epochs=3", *FAST]
    args += ["--data-dir", str(data_dir), "--job-id", "to-backtest", "--json"]
    trained = await cli(args, config_path)
    assert trained.returncode == 0, trained.stderr
    model = json.loads(trained.stdout)["artifacts"]["model"]

    args = ["backtest", "--strategy", "model", "-p", f"model={model}", "--symbol", "GOOG", "--long-only"]
    args += ["--data-dir", str(data_dir), "--job-id", "bt-model", "--no-chart"]
    ran = await cli(args, config_path)
    assert ran.returncode == 0, ran.stderr
    assert "WARNING: look-ahead" in ran.stdout  # the full range overlaps the training data

    async with Client(config) as client:
        op = client.op("bt-model")
        record = await op.record()
        assert record.result and record.result["warnings"][0].startswith("look-ahead")
        equity = pd.read_parquet(io.BytesIO(await op.artifact("equity_curve")))
        bundle = torch.load(io.BytesIO(await client.artifact(model)), map_location="cpu", weights_only=True)

    # the predictions, recomputed here: features by numpy, the saved scaler, the MLP by hand
    bars = pd.read_csv(data_dir / "GOOG_1d.csv", index_col="timestamp")
    bars.index = pd.to_datetime(bars.index, utc=True)
    features = reference_features(bars).dropna()
    scaled = (features.to_numpy() - np.array(bundle["scaler"]["mean"])) / np.array(bundle["scaler"]["std"])
    logits = plain_mlp_logits(bundle["state_dict"], torch.as_tensor(scaled, dtype=torch.float32))
    predicted = logits.argmax(dim=1).numpy()
    by_class = {"down": 0, "flat": 0, "up": 1}  # long-only: down means flat
    expected = np.zeros(len(bars), dtype=np.int64)
    expected[bars.index.get_indexer(features.index)] = [by_class[bundle["class_names"][c]] for c in predicted]
    target = equity["target"].to_numpy()
    assert len(target) == len(bars)
    assert np.array_equal(target, expected)
    assert expected.sum() > 10 and (expected == 0).sum() > 10  # it really trades on them


async def test_bad_options_are_refused_before_any_container(
    config: Config, dispatcher: RunningDispatcher, data_dir: Path, docker_client: Any
) -> None:
    async with Client(config) as client:
        for params, field in (
            ({"symbol": "GOOG", "model": "transformer"}, "params.model"),
            ({"symbol": "GOOG", "epochs": 0}, "params.epochs"),
        ):
            with pytest.raises(InvalidJob) as bad:
                await client.submit("train", params)
            assert bad.value.field == field
        made = creations(docker_client)
        since = time.time()
        too_long = await client.submit(
            "train", {"symbol": "GOOG", "model": "lstm", "sequence_length": 5000}, data_dir=data_dir
        )
        missing = await client.submit(
            "backtest",
            {"strategy": "model", "symbol": "GOOG", "strategy_params": {"model": "sha256-" + "e" * 64}},
            data_dir=data_dir,
        )
        for op, field in ((too_long, "params.sequence_length"), (missing, "params.strategy_params.model")):
            record = await op.wait(timeout_s=60)
            assert record.state == "failed" and record.error is not None
            assert record.error.field == field, record.error
        assert made.by_attempt(too_long.op_id, since) == made.by_attempt(missing.op_id, since) == {}
