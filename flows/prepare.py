"""Stage `prepare`: dataset source -> validated prompt tables (train + benchmarks)."""

from __future__ import annotations

from prefect import flow

from flows.common import load_stage_config, run_flow_cli
from tasks.prepare import drop_benchmark_overlap, load_tables, write_tables
from tasks.tracking import stage_run


@flow(name="prepare", log_prints=True)
def prepare(params_path: str = "params.yaml", overrides: dict | None = None) -> dict[str, str]:
    """Read the configured source, validate it with pandera and write parquet tables."""
    config = load_stage_config(params_path, overrides)
    tables = load_tables(config.prepare, config.seed)
    tables, dropped = drop_benchmark_overlap(tables, config.prepare.on_overlap)
    paths = write_tables(tables, config.prepare.output_dir)
    with stage_run(config, "prepare") as tracker:
        tracker.log_metrics({f"data/{name}_rows": float(len(t)) for name, t in tables.items()})
        tracker.log_metrics(
            {f"data/{name}_overlap_dropped": float(n) for name, n in dropped.items()}
        )
    for name, path in paths.items():
        print(f"{name}: {len(tables[name])} prompts -> {path}")
    return paths


if __name__ == "__main__":
    run_flow_cli(prepare, section="prepare")
