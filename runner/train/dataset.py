"""Samples for training and prediction: feature rows, their labels and their windows.

A *feature row* is a bar after the feature warm-up. A *sample* is a feature row whose
label is known and, for a recurrent model, whose window of ``sequence_length`` feature rows
ending at it is complete. The window of the sample at row ``r`` is rows
``r - sequence_length + 1 .. r``: the labelled bar and the ones before it, never a later
one. An MLP is the case ``sequence_length = 1``.

numpy and pandas are imported inside the functions (the op's preflight runs in the
dispatcher).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from runner.train.features import FeatureSpec, compute_features, feature_names
from runner.train.labels import UNKNOWN, LabelSpec, label_horizon, make_labels
from runner.train.split import DataSplit, SplitRanges, split_samples

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd


@dataclass(frozen=True, slots=True, eq=False)
class Prepared:
    """Feature rows of one data set, their labels, and which rows are samples."""

    timestamps: np.ndarray  # datetime64[ns] (UTC) per feature row
    features: np.ndarray  # (rows, features) float64, not yet standardized
    names: list[str]
    labels: np.ndarray  # int64 per feature row; UNKNOWN where the future is not in the data
    sample_rows: np.ndarray  # int64 rows that are samples, ascending
    sequence_length: int

    @property
    def n_rows(self) -> int:
        """Feature rows."""
        return int(self.features.shape[0])


def window_indices(rows: np.ndarray, sequence_length: int) -> np.ndarray:
    """(len(rows), sequence_length) feature-row indices: the window ending at each row."""
    import numpy as np

    offsets = np.arange(-sequence_length + 1, 1, dtype=np.int64)
    return np.asarray(rows, dtype=np.int64)[:, None] + offsets[None, :]


def usable_rows(n_rows: int, sequence_length: int) -> np.ndarray:
    """Feature rows whose window is complete (prediction needs no label)."""
    import numpy as np

    return np.arange(sequence_length - 1, n_rows, dtype=np.int64)


def prepare(frame: pd.DataFrame, feature_spec: FeatureSpec, sequence_length: int) -> Prepared:
    """The feature rows of ``frame``'s bars, without labels: every row with a complete
    window is a sample (what prediction needs)."""
    import numpy as np

    table = compute_features(frame, feature_spec)
    index = table.index
    if getattr(index, "tz", None) is not None:
        index = index.tz_convert("UTC").tz_localize(None)
    n_rows = len(table)
    return Prepared(
        timestamps=index.to_numpy(dtype="datetime64[ns]"),
        features=table.to_numpy(np.float64),
        names=feature_names(feature_spec),
        labels=np.full(n_rows, UNKNOWN, dtype=np.int64),
        sample_rows=usable_rows(n_rows, sequence_length),
        sequence_length=sequence_length,
    )


def with_labels(prepared: Prepared, close: np.ndarray, label_spec: LabelSpec) -> Prepared:
    """``prepared`` with labels from the closes of all the bars it was computed from; only
    rows with a known label remain samples (the last bars of the data drop out)."""
    import numpy as np

    first = len(close) - prepared.n_rows  # the feature warm-up
    labels = make_labels(np.asarray(close, dtype=np.float64), label_spec)[first:]
    rows = prepared.sample_rows
    return replace(prepared, labels=labels, sample_rows=rows[labels[rows] != UNKNOWN])


def split_prepared(prepared: Prepared, split: DataSplit, label_spec: LabelSpec) -> SplitRanges:
    """Split the samples in time order; the purge gap is the label horizon when asked for."""
    gap = label_horizon(label_spec) if split.purge else 0
    return split_samples(len(prepared.sample_rows), split, gap)


def scaler_rows(prepared: Prepared, ranges: SplitRanges) -> slice:
    """Feature rows the standardizer is fitted on: every row a training window reads.

    That is rows 0 through the last training sample (for an MLP exactly the training
    samples, for a recurrent model also the rows before them in their windows); no row of
    the validation or test period.
    """
    last = int(prepared.sample_rows[ranges.train.stop - 1])
    return slice(0, last + 1)
