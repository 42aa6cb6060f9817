"""Dataset sources -> raw prompt tables (validated later by `schema.validate_prompts`).

A source string names where the rows are:
  - "synthetic": the embedded arithmetic generator (see `synthetic.py`);
  - a local path to a .jsonl / .json / .parquet file;
  - "hf:<dataset id or local dataset directory>": Hugging Face `datasets`;
  - any fsspec URL such as "s3://bucket/key.jsonl" (read through s3fs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

HF_PREFIX = "hf:"


class SourceError(ValueError):
    """A dataset source could not be read; the message names the source."""


def _read_table(location: str, storage_options: dict[str, Any] | None) -> pd.DataFrame:
    suffix = location.rsplit("?", 1)[0].lower()
    options = {"storage_options": storage_options} if "://" in location else {}
    # dtype=False keeps answers as written: "007" stays a string, 7 is reported as a number.
    if suffix.endswith(".jsonl"):
        return pd.read_json(location, lines=True, dtype=False, **options)
    if suffix.endswith(".json"):
        return pd.read_json(location, dtype=False, **options)
    if suffix.endswith(".parquet"):
        return pd.read_parquet(location, **options)
    raise SourceError(f"unsupported file type for {location!r}: use .jsonl, .json or .parquet")


def _read_hf(name: str, split: str) -> pd.DataFrame:
    import datasets  # heavy import, only for this source

    local = Path(name)
    if local.is_dir() and (local / "dataset_info.json").exists():
        loaded = datasets.load_from_disk(str(local))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[split]
        return loaded.to_pandas()
    # A hub id, or a local folder of data files that `datasets` knows how to read.
    return datasets.load_dataset(name, split=split).to_pandas()


def read_source(
    source: str,
    *,
    split: str = "train",
    limit: int | None = None,
    storage_options: dict[str, Any] | None = None,
) -> pd.DataFrame:
    """Read the rows of a non-synthetic source as a DataFrame (not yet validated).

    Raises SourceError naming the source when it is missing or unreadable.
    """
    try:
        if source.startswith(HF_PREFIX):
            table = _read_hf(source[len(HF_PREFIX) :], split)
        elif "://" in source:
            table = _read_table(source, storage_options)
        else:
            if not Path(source).exists():
                raise SourceError(f"dataset file not found: {source}")
            table = _read_table(source, None)
    except SourceError:
        raise
    except Exception as error:  # noqa: BLE001 - any reader failure becomes one clear error
        raise SourceError(f"could not read dataset source {source!r}: {error}") from error
    if limit is not None:
        table = table.head(limit)
    return table.reset_index(drop=True)
