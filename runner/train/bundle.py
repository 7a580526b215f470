"""The model bundle: one ``torch.save`` of a plain dict, loadable with ``weights_only=True``.

Layout (format ``ktrdr-run.model-bundle``, version 1)::

    {
      "format": {"name": "ktrdr-run.model-bundle", "version": 1},
      "state_dict": {parameter name: CPU tensor},
      "model": {"model_type", "input_size", "hidden_layers", "dropout",
                "sequence_length", "num_classes"},
      "features": {"version", "names", "spec": {windows of runner.train.features}},
      "scaler": {"names", "mean", "std"},            # fitted on the training rows
      "labels": {"source", "horizon", "threshold", "class_names"},
      "class_names": ["down", "flat", "up"],
      "metrics": {...},                             # test metrics and the training summary
      "data": {"symbol", "timeframe", "data_source", "first_bar", "last_bar",
               "train" | "validation" | "test": {"start", "end", "samples"}},
      "training": {"params", "device_type", "torch_version"},
      "partial": bool,                              # saved on cancel: best epoch so far
    }

Only tensors, dicts, lists, str, int, float, bool and None are stored, so
``torch.load(f, map_location="cpu", weights_only=True)`` reads it on any machine, whether
it was trained on a GPU or not. Only the training code imports this module (torch).
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from runner.errors import DataError
from runner.train.dataset import prepare
from runner.train.features import FeatureSpec, Standardizer, feature_names, spec_from_dict, spec_to_dict
from runner.train.labels import CLASS_NAMES, LabelSpec
from runner.train.labels import spec_to_dict as label_spec_to_dict
from runner.train.models import ModelConfig, build_model

if TYPE_CHECKING:
    import pandas as pd

BUNDLE_FORMAT = "ktrdr-run.model-bundle"
BUNDLE_VERSION = 1
CONTENT_TYPE = "application/x-pytorch"
PREDICT_BATCH_SIZE = 4096


def plain(value: Any) -> Any:
    """``value`` as the builtins ``weights_only`` loading accepts (str subclasses such as
    ``torch.__version__`` and numpy scalars included); TypeError on anything else."""
    if value is None or isinstance(value, bool | torch.Tensor):
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    raise TypeError(f"a model bundle holds plain values only, not {type(value).__name__}")


def bundle_dict(
    *,
    state_dict: dict[str, torch.Tensor],
    model_config: ModelConfig,
    feature_spec: FeatureSpec,
    scaler: Standardizer,
    label_spec: LabelSpec,
    metrics: dict[str, Any],
    data: dict[str, Any],
    training: dict[str, Any],
    partial: bool = False,
) -> dict[str, Any]:
    """The bundle as a plain dict (``state_dict``: the model's weights, on any device)."""
    return plain(
        {
            "format": {"name": BUNDLE_FORMAT, "version": BUNDLE_VERSION},
            "state_dict": {k: v.detach().to("cpu").clone().contiguous() for k, v in state_dict.items()},
            "model": model_config.to_dict(),
            "features": {
                "version": spec_to_dict(feature_spec)["version"],
                "names": feature_names(feature_spec),
                "spec": spec_to_dict(feature_spec),
            },
            "scaler": scaler.to_dict(),
            "labels": label_spec_to_dict(label_spec),
            "class_names": list(CLASS_NAMES),
            "metrics": metrics,
            "data": data,
            "training": training,
            "partial": partial,
        }
    )


def save_bundle(bundle: dict[str, Any]) -> bytes:
    """The bytes of one ``torch.save`` of a :func:`bundle_dict`; identical content gives
    identical bytes (and so one stored artifact)."""
    buffer = io.BytesIO()
    torch.save(bundle, buffer)
    return buffer.getvalue()


def load_bundle(data: bytes) -> dict[str, Any]:
    """Read a bundle on the CPU with ``weights_only=True``; DataError when it is not one."""
    try:
        bundle = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable content is the same user error
        raise DataError(f"not a readable model bundle: {type(exc).__name__}: {exc}") from None
    fmt = bundle.get("format") if isinstance(bundle, dict) else None
    if not isinstance(fmt, dict) or fmt.get("name") != BUNDLE_FORMAT:
        raise DataError(f"not a {BUNDLE_FORMAT} (format {fmt!r})")
    if fmt.get("version") != BUNDLE_VERSION:
        raise DataError(
            f"model bundle version {fmt.get('version')!r} is not supported (this runner reads "
            f"version {BUNDLE_VERSION})"
        )
    spec_from_dict(bundle["features"]["spec"])  # refuses another feature set version
    return bundle


def build_model_from_bundle(bundle: dict[str, Any]) -> nn.Module:
    """The bundle's model with its weights, on the CPU, in eval mode."""
    model = build_model(ModelConfig.from_dict(bundle["model"]))
    model.load_state_dict(bundle["state_dict"])
    model.eval()
    return model


def predict(
    bundle: dict[str, Any], frame: pd.DataFrame, *, device: str | torch.device = "cpu"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class predictions for the bars of ``frame`` with the bundle's features and scaler.

    Returns ``(timestamps, classes, probabilities)``: one entry per bar that has every
    feature and (recurrent models) a complete window, i.e. from bar ``warm-up +
    sequence_length - 1`` on; ``timestamps`` are UTC ``datetime64[ns]``, ``classes`` int64
    indices into ``bundle["class_names"]``, ``probabilities`` float32 ``(n, classes)``. The
    prediction at a bar uses that bar and earlier ones only.
    """
    spec = spec_from_dict(bundle["features"]["spec"])
    scaler = Standardizer.from_dict(bundle["scaler"])
    config = ModelConfig.from_dict(bundle["model"])
    if scaler.names != feature_names(spec):
        raise DataError("model bundle: the scaler's feature names do not match its feature spec")
    prepared = prepare(frame, spec, config.sequence_length)
    rows = prepared.sample_rows
    if len(rows) == 0:
        return (
            np.zeros(0, dtype="datetime64[ns]"),
            np.zeros(0, dtype=np.int64),
            np.zeros((0, config.num_classes), dtype=np.float32),
        )
    model = build_model_from_bundle(bundle).to(device)
    features = torch.as_tensor(scaler.transform(prepared.features), device=device)
    offsets = torch.arange(-config.sequence_length + 1, 1, device=device)
    index = torch.as_tensor(rows, device=device)
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(index), PREDICT_BATCH_SIZE):
            chunk = index[start : start + PREDICT_BATCH_SIZE]
            inputs = features[chunk] if config.sequence_length == 1 else features[chunk[:, None] + offsets]
            chunks.append(torch.softmax(model(inputs), dim=1).cpu())
    probabilities = torch.cat(chunks).numpy()
    return prepared.timestamps[rows], probabilities.argmax(axis=1).astype(np.int64), probabilities
