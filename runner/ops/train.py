"""The ``train`` operation: a torch classifier (mlp, lstm, gru) on one symbol's bars.

Bars are read as ``backtest`` reads them (``{symbol}_{timeframe}.csv`` in the data
directory, or the generated ``DEMO`` data set); features use trailing windows only
(``runner.train.features``), labels the price ahead (``runner.train.labels``); samples are
split in time order with a purge gap, the features standardized with the training rows'
statistics, and the model trained on the GPU when the container has one, else the CPU
(``runner.train.run``). Progress uses KTRDR's step and metric names, one event per epoch.

Every container imports this module, and the dispatcher validates params with it, so it
imports msgspec and the light ``runner.train`` modules only; numpy, pandas, pyarrow and
torch are imported inside the functions that run the op.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.errors import DataError
from runner.protocol import Resources
from runner.registry import operation
from runner.train.params import (
    KIND,
    TrainParams,
    check_params,
    check_sequence_fits,
    sequence_length,
    trainer_config,
)

if TYPE_CHECKING:
    import pandas as pd

    from runner.sdk import OpContext
    from runner.train.dataset import Prepared
    from runner.train.split import SplitRanges

__all__ = ["KIND", "TrainParams", "check_params", "preflight", "read_frame", "train"]

DEMO_SYMBOL = "DEMO"  # runner.backtest.demo.DEMO_SYMBOL, repeated to keep imports cheap


def read_frame(params: TrainParams, data_dir: Path | None) -> tuple[pd.DataFrame, str]:
    """The bars in the requested range, validated as backtest validates them, and their source."""
    from runner.backtest.data import bars_from_frame, find_data_file, read_bars_file
    from runner.backtest.demo import DEMO_DATA_SOURCE, demo_file_name, generate_demo_bars

    path: Path | None = None
    if data_dir is not None:
        try:
            path = find_data_file(Path(data_dir), params.symbol, params.timeframe)
        except DataError:
            if params.symbol != DEMO_SYMBOL:
                raise
    if path is not None:
        frame, name, source = read_bars_file(path), str(path), f"data file {path.name}"
    elif params.symbol == DEMO_SYMBOL:
        try:
            frame = generate_demo_bars(params.timeframe)
        except ValueError as exc:
            raise DataError(f"{DEMO_SYMBOL}_{params.timeframe}: {exc}") from None
        name, source = f"{demo_file_name(params.timeframe)} (generated)", DEMO_DATA_SOURCE
    else:
        raise DataError(
            f"no data directory is mounted for this op, so {params.symbol}_{params.timeframe}.csv "
            f"cannot be read; mount a data directory or use the symbol {DEMO_SYMBOL} "
            "(generated demo data)"
        )
    bars = bars_from_frame(frame, name, start=params.start, end=params.end)
    return bars.to_frame(), source


def _prepare(params: TrainParams, frame: pd.DataFrame) -> tuple[Prepared, SplitRanges]:
    from runner.train.dataset import prepare, split_prepared, with_labels

    prepared = prepare(frame, params.features, sequence_length(params))
    check_sequence_fits(params, prepared.n_rows, len(frame))
    prepared = with_labels(prepared, frame["close"].to_numpy(), params.labels)
    return prepared, split_prepared(prepared, params.data_split, params.labels)


def preflight(params: TrainParams, data_dir: Path | None) -> None:
    """Check the data of a training run before any container starts: the file reads, the
    range holds valid bars, the features compute, ``sequence_length`` fits the data and every
    split gets samples. Raises DataError or InvalidParams (naming the field)."""
    check_params(params)
    frame, _ = read_frame(params, data_dir)
    _prepare(params, frame)


@operation(
    KIND,
    params=TrainParams,
    gpu="preferred",
    resources=Resources(cpus=2.0, memory_gb=4.0, gpus=0),
    check=check_params,
    preflight=preflight,
)
def train(ctx: OpContext, params: TrainParams) -> dict[str, Any]:
    """Train a torch classifier (mlp, lstm, gru) on one symbol's bars; store the model bundle.

    Result: ``training_metrics`` (per-epoch ``history``), ``test_metrics`` (accuracy, loss,
    macro precision / recall / F1, confusion matrix, majority-class baseline),
    ``model_info``, ``data_summary`` (split ranges and sizes, features), ``device`` and
    ``artifacts`` (``model``, ``history``). On cancel the best model so far is stored as
    ``model`` and ``ctx.partial_saved`` is set.
    """
    from runner.train.trainer import prepare_environment

    config = trainer_config(params)
    prepare_environment(config.deterministic)  # before anything creates a CUDA context
    ctx.checkpoint()
    ctx.progress(0, f"loading {params.symbol} {params.timeframe}", step="loading_data")
    frame, source = read_frame(params, ctx.data_dir)
    if source.startswith("synthetic"):
        ctx.log(f"{DEMO_SYMBOL}: no data file is mounted; using {source}", level="warning")
    ctx.progress(2, f"loaded {len(frame)} bars ({source})", step="loading_data", bars=len(frame))
    ctx.checkpoint()
    from runner.train.run import run_training

    return run_training(ctx, params, config, frame, source)
