"""Time-ordered train / validation / test splits.

Samples stay in time order: the training split is the oldest, the test split the newest,
and nothing is shuffled across them (batches are shuffled inside the training split only,
by the trainer). With ``purge`` a gap of the label horizon lies between two splits, so no
training label looks at bars of the validation period, nor a validation label at the test
period's bars.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

from msgspec import Meta, Struct

from runner.errors import DataError

Fraction = Annotated[float, Meta(gt=0, lt=1)]
FRACTION_TOLERANCE = 1e-6


class DataSplit(Struct, frozen=True, forbid_unknown_fields=True):
    """Fractions of the samples per split (KTRDR's ``data_split``); they must sum to 1."""

    train: Fraction = 0.7
    validation: Fraction = 0.15
    test: Fraction = 0.15
    purge: bool = True


def split_problem(split: DataSplit) -> tuple[str, str] | None:
    """(field, problem) when the fractions do not sum to 1, else None."""
    total = split.train + split.validation + split.test
    if not math.isclose(total, 1.0, abs_tol=FRACTION_TOLERANCE):
        return "train", (
            f"train + validation + test must sum to 1, got {split.train} + {split.validation} + "
            f"{split.test} = {total:.6g}"
        )
    return None


@dataclass(frozen=True, slots=True)
class SplitRanges:
    """Positions (into the time-ordered samples) of each split, and the gap between them."""

    train: range
    validation: range
    test: range
    gap: int


def split_sizes(n_samples: int, split: DataSplit, gap: int) -> tuple[int, int, int]:
    """Samples in train, validation and test once ``2 * gap`` purged samples are set aside."""
    usable = max(0, n_samples - 2 * gap)
    n_train = int(usable * split.train)
    n_val = int(usable * split.validation)
    return n_train, n_val, max(0, usable - n_train - n_val)


def split_samples(n_samples: int, split: DataSplit, gap: int) -> SplitRanges:
    """Cut ``n_samples`` time-ordered samples; ``gap`` samples are dropped between splits.

    Raises DataError when a split would be empty, saying how many samples there are.
    """
    n_train, n_val, n_test = split_sizes(n_samples, split, gap)
    if min(n_train, n_val, n_test) < 1:
        raise DataError(
            f"{n_samples} labelled sample(s) cannot fill train/validation/test "
            f"({split.train}/{split.validation}/{split.test}, purge gap {gap}): that gives "
            f"{n_train}/{n_val}/{n_test}; use more bars (a longer date range)"
        )
    train = range(0, n_train)
    validation = range(n_train + gap, n_train + gap + n_val)
    test = range(validation.stop + gap, n_samples)
    return SplitRanges(train, validation, test, gap)
