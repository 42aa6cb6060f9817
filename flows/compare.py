"""Stage `compare`: allocation strategies (arms) x seeds at their own budgets, paired by seed.

`compare` trains every arm x seed run that has no finished record yet, then writes
metrics/compare.json (pipeline_lib/comparison/stats.py), the plots and the curves.
Locally (`compare.deployment: null`) the runs train one after another in this
process with one rollout engine, or, where the cores hold several runs
(`compare.parallel_runs`), as tasks of Prefect's ProcessPoolTaskRunner, each process
with its own engine. With a deployment name each run is a flow run of that deployment
of `compare_run` (`run_deployment`), which a work pool's workers run in parallel,
each with its own engine.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path

from prefect import flow
from prefect.task_runners import ProcessPoolTaskRunner

from flows.common import load_stage_config, run_flow_cli
from pipeline_lib.adapters.mlflow_runs import comparison_run
from pipeline_lib.comparison.runs import RunInputs, Stopwatch, overhead
from pipeline_lib.config import PipelineConfig
from pipeline_lib.data.layout import TRAIN_FILE, heldout_table
from tasks.compare import (
    cached_record,
    deployed_run,
    log_reused_run,
    run_inputs,
    save_record,
    train_arm_seed,
    train_with_own_engine,
    write_comparison,
)
from tasks.engines import open_engine
from tasks.train import check_training_pool

METRICS_DIR = Path("metrics")  # <result_name>.json and <result_name>/ plots per set


def shared_inputs(config: PipelineConfig) -> RunInputs:
    """The start policy, data and code every run of this comparison starts from."""
    prepared = Path(config.prepare.output_dir)
    check_training_pool(config, prepared / TRAIN_FILE)  # before any engine starts
    return run_inputs(config, prepared / TRAIN_FILE, heldout_table(prepared))


@flow(name="compare", log_prints=True)
def compare(params_path: str = "params.yaml", overrides: dict | None = None) -> dict:
    """Every arm x seed of `compare` (finished runs reused), then compare.json and plots."""
    clock = Stopwatch()
    with clock.phase("setup"):
        config = load_stage_config(params_path, overrides)
        inputs = shared_inputs(config)
        # Seed-major: each seed's arms finish together, so a stopped comparison leaves pairs.
        arms = config.compare.selected_arms
        pairs = [(arm, seed) for seed in config.compare.seeds for arm in arms]
    with comparison_run(config) as parent:
        records, missing = [], []
        with clock.phase("reuse"):
            for arm, seed in pairs:
                record = cached_record(config, arm, seed, inputs)
                if record is None:
                    missing.append((arm, seed))
                else:
                    log_reused_run(parent, record)
                    records.append(record)
        print(f"{len(records)} runs reused, {len(missing)} to train: {missing}")
        if config.compare.deployment is None:
            trained = train_locally(config, missing, inputs, str(parent.run_id), clock)
        else:
            trained = train_deployed(config, missing, inputs, params_path, overrides, parent)
        with clock.phase("outputs"):
            name = config.compare.result_name
            summary = write_comparison(
                config, records + trained, METRICS_DIR / f"{name}.json", METRICS_DIR / name, parent
            )
        timing = overhead(clock, trained)
        parent.log_metrics({f"compare/{k}": v for k, v in timing.items()})
    print(f"compare: {json.dumps(timing)}")
    return summary | {"timing": timing}


def parallel_runs(config: PipelineConfig) -> int:
    """Runs trained at once locally: `compare.parallel_runs`, else cores // threads."""
    if config.compare.parallel_runs is not None:
        return config.compare.parallel_runs
    return max(1, len(os.sched_getaffinity(0)) // config.threads)


def train_locally(
    config: PipelineConfig,
    pairs: list[tuple[str, int]],
    inputs: RunInputs,
    parent_id: str,
    clock: Stopwatch,
) -> list[dict]:
    """The runs one after another in this process with one rollout engine for all, or
    several at once in worker processes where the cores hold them."""
    if not pairs:
        return []
    workers = min(parallel_runs(config), len(pairs))
    if workers > 1:
        print(f"training {len(pairs)} runs, {workers} at once (one process and engine each)")
        with clock.phase("runs"), ProcessPoolTaskRunner(max_workers=workers) as runner:
            futures = [
                runner.submit(
                    train_with_own_engine,
                    {"config": config, "arm": arm, "seed": seed, "inputs": inputs,
                     "parent_id": parent_id},
                )
                for arm, seed in pairs
            ]  # fmt: skip
            return [future.result() for future in futures]
    train, records = config.train, []
    with ExitStack() as stack:
        with clock.phase("engine"):
            engine = stack.enter_context(
                open_engine(
                    train.backend, inputs.start_policy, config.seed, train.vllm_engine_kwargs
                )
            )
        for arm, seed in pairs:
            with clock.phase("runs"):
                records.append(train_arm_seed(config, arm, seed, inputs, engine, parent_id))
    return records


def train_deployed(
    config: PipelineConfig,
    pairs: list[tuple[str, int]],
    inputs: RunInputs,
    params_path: str,
    overrides: dict | None,
    parent,
) -> list[dict]:
    """The runs as parallel flow runs of the deployment; their records saved here too
    (which checks that they trained from this comparison's code, start policy and data)."""
    parameters = {"params_path": params_path, "overrides": overrides}
    futures = [
        deployed_run.submit(config.compare.deployment, arm, seed, parameters, str(parent.run_id))
        for arm, seed in pairs
    ]
    records = [future.result() for future in futures]
    for record in records:
        save_record(config, record, inputs)
    return records


@flow(name="compare-run", log_prints=True, persist_result=True)
def compare_run(
    arm: str,
    seed: int,
    parent_run_id: str | None = None,
    params_path: str = "params.yaml",
    overrides: dict | None = None,
) -> dict:
    """One arm x seed run of a comparison (what `compare.deployment` runs), its record."""
    config = load_stage_config(params_path, overrides)
    inputs = shared_inputs(config)
    train = config.train
    with open_engine(train.backend, inputs.start_policy, seed, train.vllm_engine_kwargs) as engine:
        return train_arm_seed(config, arm, seed, inputs, engine, parent_run_id)


if __name__ == "__main__":
    run_flow_cli(compare, section="compare")
