"""Prefect tasks of stage `prepare`: read a dataset source, validate, write prompt tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task

from pipeline_lib.config import PrepareConfig
from pipeline_lib.data.layout import SYNTHETIC_BENCHMARK
from pipeline_lib.data.overlap import remove_benchmark_overlap
from pipeline_lib.data.schema import validate_prompts, write_prompts
from pipeline_lib.data.sources import read_source
from pipeline_lib.data.synthetic import split_arithmetic


@task(retries=2, retry_delay_seconds=[2, 10])  # network sources (hub, S3) fail transiently
def load_tables(config: PrepareConfig, seed: int) -> dict[str, pd.DataFrame]:
    """Validated tables: 'train' plus one per benchmark. Raises before anything is written."""
    if config.source == "synthetic":
        synthetic = config.synthetic
        train, heldout = split_arithmetic(
            synthetic.train_prompts, synthetic.benchmark_prompts, seed, list(synthetic.levels)
        )
        tables = {"train": train, SYNTHETIC_BENCHMARK: heldout}
    else:
        tables = {"train": read_source(config.source, split=config.split, limit=config.limit)}
    for benchmark in config.benchmarks:
        tables[benchmark.name] = read_source(
            benchmark.source, split=benchmark.split, limit=benchmark.limit
        )
    # Validate everything first: a bad benchmark must not leave a new train table behind.
    return {name: validate_prompts(table, origin=name) for name, table in tables.items()}


@task  # no retries: an overlap under on_overlap=error is a finding, not a transient fault
def drop_benchmark_overlap(
    tables: dict[str, pd.DataFrame], on_overlap: str
) -> tuple[dict[str, pd.DataFrame], dict[str, int]]:
    """Train without problems that appear in a benchmark; overlapping rows per benchmark."""
    tables, dropped = remove_benchmark_overlap(tables, on_overlap)
    for name, count in dropped.items():
        get_run_logger().info("benchmark %s: %d overlapping training problems dropped", name, count)
    return tables, dropped


@task
def write_tables(tables: dict[str, pd.DataFrame], output_dir: str) -> dict[str, str]:
    """Write each table as `<output_dir>/<name>.parquet` (atomically); return the paths."""
    out = Path(output_dir)
    paths = {}
    for name, table in tables.items():
        paths[name] = str(write_prompts(table, out / f"{name}.parquet"))
    return paths
