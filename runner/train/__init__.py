"""Model training for ktrdr-run: features, labels, splits, torch models, the trainer and the
model bundle.

Modules:

- :mod:`runner.train.features` turns OHLCV bars into a versioned set of trailing-window
  features (no look-ahead) and standardizes them with statistics of the training rows;
- :mod:`runner.train.labels` turns future returns into three classes (down, flat, up);
- :mod:`runner.train.split` splits samples in time order, with a purge gap;
- :mod:`runner.train.dataset` joins features and labels into samples (and the windows of
  recurrent models);
- :mod:`runner.train.config` holds the trainer's options and :mod:`runner.train.params` the
  op's params and their checks (plain msgspec structs);
- :mod:`runner.train.models`, :mod:`runner.train.trainer`, :mod:`runner.train.bundle` and
  :mod:`runner.train.run` (the op's body) use torch; :mod:`runner.train.metrics` scores
  predictions.

The operation (``runner.ops.train``) and the dispatcher import the light modules (params,
features, labels, split, config) to validate params, so those import numpy and pandas only
inside functions; the torch modules are loaded only by a running ``train`` op and by the
backtest strategy ``model`` when it loads a bundle.
"""

# KTRDR's model names; the recurrent ones take windows of ``sequence_length`` rows.
MODEL_TYPES: tuple[str, ...] = ("mlp", "lstm", "gru")
RECURRENT_MODEL_TYPES: tuple[str, ...] = ("lstm", "gru")
