"""Train/benchmark hygiene: problems that appear on both sides, compared as normalised text."""

from __future__ import annotations

import re
import unicodedata

import pandas as pd


def normalise_problem(text: str) -> str:
    """Unicode NFKC, lower case, every run of whitespace one space, trimmed."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().lower()


def overlapping_rows(train: pd.DataFrame, benchmark: pd.DataFrame) -> pd.Series:
    """Boolean mask over `train`: rows whose problem also appears in `benchmark`."""
    held_out = set(benchmark["problem"].map(normalise_problem))
    return train["problem"].map(normalise_problem).isin(held_out)


class OverlapError(ValueError):
    """Training problems appear in a benchmark and `prepare.on_overlap` is 'error'."""


def remove_benchmark_overlap(
    tables: dict[str, pd.DataFrame], on_overlap: str
) -> tuple[dict[str, pd.DataFrame], dict[str, int]]:
    """`tables` with train rows that appear in any benchmark dropped; counts per benchmark.

    With `on_overlap="error"` any overlap raises `OverlapError` naming the benchmark,
    the count and a few of the problems.
    """
    train = tables["train"]
    dropped: dict[str, int] = {}
    keep = pd.Series(True, index=train.index)
    for name, table in tables.items():
        if name == "train":
            continue
        overlap = overlapping_rows(train, table)
        dropped[name] = int(overlap.sum())
        if dropped[name] and on_overlap == "error":
            examples = train.loc[overlap, "problem"].head(3).tolist()
            raise OverlapError(
                f"{dropped[name]} training problems also appear in benchmark {name!r} "
                f"(e.g. {examples}); set prepare.on_overlap: drop to remove them from train"
            )
        keep &= ~overlap
    return tables | {"train": train[keep].reset_index(drop=True)}, dropped
