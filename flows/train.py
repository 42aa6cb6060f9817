"""Stage `train`: Knapsack-GRPO and the uniform baseline, at the same rollout budget and seed."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from prefect import flow

from flows.common import load_stage_config, run_flow_cli
from pipeline_lib.plots import training_curves
from tasks.engines import open_engine
from tasks.hashing import content_hash
from tasks.prepare import SYNTHETIC_BENCHMARK, TRAIN_FILE
from tasks.tracking import stage_run
from tasks.train import train_strategy


def heldout_table(prepared: Path) -> Path:
    """The benchmark used for the training curves: the synthetic one, else the first."""
    synthetic = prepared / f"{SYNTHETIC_BENCHMARK}.parquet"
    if synthetic.exists():
        return synthetic
    others = sorted(p for p in prepared.glob("*.parquet") if p.name != TRAIN_FILE)
    if not others:
        raise FileNotFoundError(f"no benchmark table in {prepared}: run the prepare stage")
    return others[0]


@flow(name="train", log_prints=True)
def train(params_path: str = "params.yaml", overrides: dict | None = None) -> dict:
    """Train one policy per configured allocation strategy; one rollout engine for all."""
    config = load_stage_config(params_path, overrides)
    prepared = Path(config.prepare.output_dir)
    train_path, heldout_path = prepared / TRAIN_FILE, heldout_table(prepared)
    start = config.bootstrap.output_dir
    start_hash = content_hash(start)
    data_hash = content_hash(train_path) + content_hash(heldout_path)
    summaries = {}
    with (
        stage_run(config, "train") as tracker,
        open_engine(
            config.train.backend, start, config.seed, config.train.vllm_engine_kwargs
        ) as engine,
    ):
        for strategy in config.train.strategies:
            args = (
                config,
                strategy,
                start,
                start_hash,
                str(train_path),
                str(heldout_path),
                data_hash,
                engine,
                tracker,
            )
            summary = train_strategy(*args)
            summaries[strategy] = summary
            print(f"{strategy}: {json.dumps(summary)}")
        steps = {s: Path(str(summary["steps_csv"])) for s, summary in summaries.items()}
        tracker.log_figure(
            training_curves(strategy_steps(steps), tuple(CURVES.values())), CURVES_PNG
        )
    Path("metrics").mkdir(exist_ok=True)
    Path("metrics/train.json").write_text(json.dumps(train_metrics(summaries), indent=2))
    TIMING.write_text(json.dumps(timing_metrics(summaries), indent=2, sort_keys=True))
    write_curves(steps)
    return summaries


# train_strategy's summary key -> metrics/train.json name. Numbers only (no paths), and
# not the in-training held-out accuracy: the evaluate stage's accuracy is the one result
# (metrics/summary.json); the curve of the in-training one is metrics/curves/accuracy.csv.
TRAIN_METRICS = {"mean_effective_gradient_ratio": "effective_gradient_ratio"}
# Wall-clock numbers differ on every run, so they get a file of their own: every other
# output of a run is bit-identical on the same machine (README, Reproducibility).
TIMING = Path("metrics/timing.json")
TIMING_METRICS = {
    "rollout_tokens_per_second": "rollout_tokens_per_second",
    "mean_step_seconds": "step_seconds",
}


def train_metrics(summaries: dict[str, dict]) -> dict[str, dict[str, float]]:
    """metrics/train.json: per strategy, the training facts DVC compares between runs."""
    return {
        strategy: {name: float(summary[key]) for key, name in TRAIN_METRICS.items()}
        for strategy, summary in summaries.items()
    }


def timing_metrics(summaries: dict[str, dict]) -> dict[str, float]:
    """metrics/timing.json: `<strategy>_step_seconds` and `_rollout_tokens_per_second`."""
    return {
        f"{strategy}_{name}": float(summary[key])
        for strategy, summary in summaries.items()
        for key, name in TIMING_METRICS.items()
    }


CURVES = {
    "accuracy": "eval/accuracy",
    "effective_gradient_ratio": "rollout/effective_gradient_ratio",
}
CURVES_PNG = "plots/training_curves.png"


def strategy_steps(steps_csvs: dict[str, Path]) -> pd.DataFrame:
    """Every strategy's per-step metrics in one long table with a `strategy` column."""
    return pd.concat(
        [pd.read_csv(path).assign(strategy=strategy) for strategy, path in steps_csvs.items()],
        ignore_index=True,
    )


def write_curves(steps_csvs: dict[str, Path], out_dir: Path = Path("metrics/curves")) -> None:
    """One wide CSV per curve (step, one column per strategy) for `dvc plots`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {strategy: pd.read_csv(path) for strategy, path in steps_csvs.items()}
    for name, column in CURVES.items():
        wide = None
        for strategy, steps in tables.items():
            series = steps[["step", column]].dropna().rename(columns={column: strategy})
            wide = series if wide is None else wide.merge(series, on="step", how="outer")
        wide.sort_values("step").to_csv(out_dir / f"{name}.csv", index=False)


if __name__ == "__main__":
    run_flow_cli(train, section="train")
