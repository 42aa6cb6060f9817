"""Stage `train`: Knapsack-GRPO and the uniform baseline, at the same rollout budget and seed."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow

from flows.common import load_stage_config, run_flow_cli
from pipeline_lib.data.layout import TRAIN_FILE, heldout_table
from pipeline_lib.training.outputs import (
    CURVES,
    CURVES_PNG,
    TIMING,
    strategy_steps,
    timing_metrics,
    train_metrics,
    write_curves,
)
from pipeline_lib.training.plots import training_curves
from tasks.engines import open_engine
from tasks.hashing import content_hash
from tasks.tracking import stage_run
from tasks.train import check_training_pool, train_strategy


@flow(name="train", log_prints=True)
def train(params_path: str = "params.yaml", overrides: dict | None = None) -> dict:
    """Train one policy per configured allocation strategy; one rollout engine for all."""
    config = load_stage_config(params_path, overrides)
    prepared = Path(config.prepare.output_dir)
    train_path, heldout_path = prepared / TRAIN_FILE, heldout_table(prepared)
    check_training_pool(config, train_path)  # before the engine starts
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


if __name__ == "__main__":
    run_flow_cli(train, section="train")
