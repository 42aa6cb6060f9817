"""Where the prepare stage's tables live: the train table and one table per benchmark."""

from __future__ import annotations

from pathlib import Path

TRAIN_FILE = "train.parquet"
SYNTHETIC_BENCHMARK = "arithmetic"


def benchmark_tables(prepared: Path) -> list[Path]:
    """Every benchmark table of a prepared-data folder (all but the train table), sorted."""
    return sorted(p for p in prepared.glob("*.parquet") if p.name != TRAIN_FILE)


def heldout_table(prepared: Path) -> Path:
    """The benchmark used for the training curves: the synthetic one, else the first."""
    synthetic = prepared / f"{SYNTHETIC_BENCHMARK}.parquet"
    if synthetic.exists():
        return synthetic
    others = benchmark_tables(prepared)
    if not others:
        raise FileNotFoundError(f"no benchmark table in {prepared}: run the prepare stage")
    return others[0]
