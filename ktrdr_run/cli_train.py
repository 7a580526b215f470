"""``ktrdr-run train``: train a model in a fresh container (on a GPU where the fleet has
one), with a line per epoch, then the result tables."""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from dispatcher.config import Config
from ktrdr_run.cli_submit import UsageError, add_job_options, build_job, parse_pairs, submit_and_report
from ktrdr_run.client import Client
from runner.protocol import OpRecord, ProgressEvent

MODELS = ("mlp", "lstm", "gru")


def add_train_parser(sub: Any) -> None:
    """Register the ``train`` subcommand."""
    p = sub.add_parser(
        "train",
        help="train a model (mlp, lstm, gru) on a symbol's bars in a fresh container",
        description=(
            "Train a classifier of the next move on features of a symbol's bars. Options of the "
            "train op go in --param, dotted for nested ones: -p epochs=50 -p hidden_layers=[128,64] "
            "-p early_stopping.patience=5 -p labels.source=forward_return. With no --data-dir, "
            "symbol DEMO uses generated demo data."
        ),
    )
    p.add_argument("--symbol", required=True, help="reads {symbol}_{timeframe}.csv|parquet")
    p.add_argument("--timeframe", default="1d", help="e.g. 1d, 1h (default 1d)")
    p.add_argument("--start", help="first date (ISO, inclusive)")
    p.add_argument("--end", help="last date (ISO, inclusive)")
    p.add_argument("--model", choices=MODELS, default="mlp", help="model type (default mlp)")
    p.add_argument("--param", "-p", action="append", metavar="K=V", help="train option (repeatable)")
    add_job_options(p)
    p.set_defaults(handler=cmd_train)


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"a.b": 1}`` → ``{"a": {"b": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(f"--param {key}: {part!r} is given both as a value and as a section")
            node = child
        node[leaf] = value
    return out


async def cmd_train(args: argparse.Namespace, config: Config) -> int:
    params: dict[str, Any] = nest(parse_pairs(args.param or [], "--param"))
    params.update({"symbol": args.symbol, "timeframe": args.timeframe, "model": args.model})
    if args.start:
        params["start"] = args.start
    if args.end:
        params["end"] = args.end
    job = build_job("train", params, args)

    async def render(_client: Client, record: OpRecord) -> None:
        print_training(record)

    return await submit_and_report(job, args, config, render=render, milestone=epoch_line)


def epoch_line(event: ProgressEvent) -> str | None:
    """``epoch 3/20  train loss 0.6931 acc 51.2 %  val loss ...`` for an epoch's end."""
    m = event.metrics
    if "val_loss" not in m or "epoch" not in m or "batch" in m:
        return None
    return (
        f"epoch {int(m['epoch'])}/{int(m.get('total_epochs', 0))}  "
        f"train loss {m.get('train_loss', float('nan')):.4f} acc {m.get('train_accuracy', 0) * 100:5.1f} %  "
        f"val loss {m['val_loss']:.4f} acc {m.get('val_accuracy', 0) * 100:5.1f} %  "
        f"lr {m.get('learning_rate', 0):.3g}  {m.get('duration', 0):.2f}s"
    )


def _pct(value: Any) -> str:
    return f"{value * 100:.2f} %" if isinstance(value, int | float) else "n/a"


def print_training(record: OpRecord, out: TextIO = sys.stdout) -> None:
    """The result tables of a completed training op."""
    result = record.result or {}
    training = result.get("training_metrics", {})
    test = result.get("test_metrics", {})
    info = result.get("model_info", {})
    data = result.get("data_summary", {})
    device = result.get("device", {})
    print(
        f"train {record.op_id}: {info.get('model_type')} on {data.get('symbol')} {data.get('timeframe')}",
        file=out,
    )
    print(f"  data: {data.get('data_source', '')}", file=out)
    if data.get("synthetic_data"):
        print("  NOTE: these are generated demo bars, not market data.", file=out)
    for name, split in (data.get("splits") or {}).items():
        print(
            f"  {name:<10} {split.get('start')} .. {split.get('end')}  {split.get('samples')} samples",
            file=out,
        )
    print(
        f"  device: {device.get('name')} ({device.get('type')}), torch {device.get('torch_version')}"
        + (f", CUDA {device['cuda_version']}" if device.get("cuda_version") else ""),
        file=out,
    )
    print(f"  model: {info.get('architecture')}  ({info.get('parameters_count'):,} parameters)", file=out)
    print("  training:", file=out)
    for key in ("epochs_trained", "best_epoch", "final_train_loss", "final_val_loss", "best_val_loss"):
        value = training.get(key)
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"    {key:<22} {shown:>12}", file=out)
    print("  test:", file=out)
    accuracy, baseline = test.get("test_accuracy"), test.get("baseline_accuracy")
    print(f"    {'test_accuracy':<22} {_pct(accuracy):>12}", file=out)
    verdict = ""
    if isinstance(accuracy, float) and isinstance(baseline, float):
        verdict = "  (beats the baseline)" if accuracy > baseline else "  (does NOT beat the baseline)"
    print(f"    {'baseline_accuracy':<22} {_pct(baseline):>12}{verdict}", file=out)
    for key in ("test_loss", "precision", "recall", "f1_score"):
        value = test.get(key)
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"    {key:<22} {shown:>12}", file=out)
    matrix = test.get("confusion_matrix")
    classes = result.get("class_names") or ["down", "flat", "up"]
    if isinstance(matrix, list) and matrix:
        print("  confusion (rows: true, columns: predicted):", file=out)
        print("    " + " " * 8 + "".join(f"{c:>8}" for c in classes), file=out)
        for name, row in zip(classes, matrix, strict=False):
            print(f"    {name:<8}" + "".join(f"{v:>8}" for v in row), file=out)
    if record.artifacts:
        print("  artifacts (backtest the model with --strategy model -p model=<model>):", file=out)
        for name, digest in record.artifacts.items():
            print(f"    {name:<10} {digest}", file=out)
