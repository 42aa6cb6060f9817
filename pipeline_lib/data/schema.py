"""The prompt table every stage reads: one row per prompt, validated by pandera.

Columns: id (unique), problem (non-empty text), answer (non-empty text),
source (where the row came from), level (difficulty, -1 when unknown).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaError, SchemaErrors

from pipeline_lib.adapters.atomic import atomic_file

PROMPT_COLUMNS = ["id", "problem", "answer", "source", "level"]
UNKNOWN_LEVEL = -1


def _non_blank(series: pd.Series) -> pd.Series:
    return series.str.strip().str.len() > 0


PROMPT_SCHEMA = pa.DataFrameSchema(
    {
        "id": pa.Column(str, pa.Check(_non_blank, name="non_blank"), unique=True),
        "problem": pa.Column(str, pa.Check(_non_blank, name="non_blank")),
        "answer": pa.Column(str, pa.Check(_non_blank, name="non_blank")),
        "source": pa.Column(str),
        "level": pa.Column("int64", pa.Check.ge(UNKNOWN_LEVEL)),
    },
    strict="filter",  # extra source columns (solution, url, ...) are dropped
    ordered=False,
    name="prompt_table",
)


class PromptTableError(ValueError):
    """A prompt table broke the schema; the message lists every failure case."""


def validate_prompts(table: pd.DataFrame, *, origin: str) -> pd.DataFrame:
    """Validate a prompt table, collecting every failure; raise PromptTableError listing them.

    A missing `level` column is filled with -1 (unknown); nothing else is coerced,
    so a numeric answer or an empty problem is reported rather than guessed at.
    """
    if "level" not in table.columns:
        table = table.assign(level=UNKNOWN_LEVEL)
    try:
        valid = PROMPT_SCHEMA.validate(table, lazy=True)
    except (SchemaErrors, SchemaError) as error:
        cases = getattr(error, "failure_cases", None)
        listing = (
            cases[["column", "check", "index", "failure_case"]].to_string(index=False, max_rows=40)
            if isinstance(cases, pd.DataFrame) and not cases.empty
            else str(error)
        )
        raise PromptTableError(f"invalid prompt table from {origin}:\n{listing}") from None
    return valid[PROMPT_COLUMNS].reset_index(drop=True)


def write_prompts(table: pd.DataFrame, path: str | Path) -> Path:
    """Validate, then write parquet atomically (temp file + rename): never a half-written file."""
    table = validate_prompts(table, origin=str(path))
    with atomic_file(path) as tmp:
        table.to_parquet(tmp, index=False)
    return Path(path)


def read_prompts(path: str | Path) -> pd.DataFrame:
    """Read and validate a prompt table written by `write_prompts`."""
    return validate_prompts(pd.read_parquet(path), origin=str(path))
