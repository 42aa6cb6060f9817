"""Tracking against a real MLflow store: sqlite backend and a local artifact folder in tmp_path."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from matplotlib.figure import Figure

from pipeline_lib.adapters.mlflow_tracker import (
    MAX_PARAM_VALUE_CHARS,
    PARENT_RUN_TAG,
    MlflowTracker,
    flatten_params,
    start_run,
)
from pipeline_lib.tracking import NullTracker, Tracker

if TYPE_CHECKING:
    from mlflow import MlflowClient

EXPERIMENT = "knapsack-rl-test"


@dataclasses.dataclass(frozen=True)
class Store:
    tracking_uri: str
    artifact_location: str
    artifact_dir: Path

    def client(self) -> MlflowClient:
        from mlflow import MlflowClient  # imported inside a test: telemetry is off by then

        return MlflowClient(tracking_uri=self.tracking_uri)

    def start(self, run_name: str = "run", **kwargs) -> object:
        return MlflowTracker.start(
            self.tracking_uri,
            EXPERIMENT,
            run_name,
            artifact_location=self.artifact_location,
            **kwargs,
        )


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow sqlite store; creating its schema takes seconds, copying it does not."""
    from mlflow import MlflowClient

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        path = tmp_path_factory.mktemp("template") / "mlflow.db"
        MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path: Path, migrated_db: Path) -> Store:
    shutil.copy(migrated_db, tmp_path / "mlflow.db")
    artifact_dir = tmp_path / "artifacts"
    return Store(
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        artifact_location=artifact_dir.as_uri(),
        artifact_dir=artifact_dir,
    )


def _log_one_of_everything(tracker: Tracker, workdir: Path) -> None:
    """The calls a stage makes; run against both trackers to show they share one interface."""
    tracker.log_params({"train": {"lr": 1e-4, "levels": [1, 2, 3]}, "seed": 0})
    tracker.set_tags({"stage": "train", "strategy": "knapsack"})
    for step in range(3):
        tracker.log_metrics(
            {"losses/policy": 1.0 / (step + 1), "rollout/tokens_per_s": 100.0 * step}, step=step
        )
    figure = Figure()
    figure.subplots().plot([0, 1], [1, 0])
    tracker.log_figure(figure, "plots/line.png")
    (workdir / "dvc.lock").write_text("schema: '2.0'\n")
    tracker.log_artifact(workdir / "dvc.lock")
    (workdir / "checkpoint").mkdir()
    (workdir / "checkpoint" / "config.json").write_text("{}")
    tracker.log_artifact(workdir / "checkpoint", artifact_path="checkpoint")
    tracker.log_dict({"allocation": [2, 8, 14]}, "allocation.json")
    with tracker.child("epoch-0", tags={"epoch": 0}) as child:
        child.log_metrics({"eval/accuracy": 0.5}, step=10)


def test_flatten_params_joins_nested_keys_with_dots_and_stringifies_values() -> None:
    @dataclasses.dataclass(frozen=True)
    class Grpo:
        clip_low: float = 0.2
        clip_high: float = 0.28

    nested = {"train": {"lr": 1e-4, "levels": [1, 2], "grpo": Grpo()}, "seed": 0, "on": True}

    assert flatten_params(nested) == {
        "train.lr": "0.0001",
        "train.levels": "[1, 2]",
        "train.grpo.clip_low": "0.2",
        "train.grpo.clip_high": "0.28",
        "seed": "0",
        "on": "True",
    }


def test_flatten_params_cuts_long_values_to_mlflow_limit() -> None:
    flat = flatten_params({"prompt": "x" * (MAX_PARAM_VALUE_CHARS + 10)})

    assert len(flat["prompt"]) == MAX_PARAM_VALUE_CHARS
    assert flat["prompt"].endswith("...")


def test_parent_and_child_runs_round_trip_through_mlflow(store: Store, tmp_path: Path) -> None:
    with store.start("train", tags={"stage": "train"}) as tracker:
        _log_one_of_everything(tracker, tmp_path)
    client = store.client()

    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "train"
    assert run.data.params == {"train.lr": "0.0001", "train.levels": "[1, 2, 3]", "seed": "0"}
    assert run.data.tags["strategy"] == "knapsack"
    history = client.get_metric_history(tracker.run_id, "losses/policy")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert run.data.metrics["rollout/tokens_per_s"] == 200.0

    artifacts = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert artifacts == {"plots", "dvc.lock", "checkpoint", "allocation.json"}
    run_dir = store.artifact_dir / tracker.run_id / "artifacts"
    assert (run_dir / "plots" / "line.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "checkpoint" / "config.json").is_file()
    assert json.loads((run_dir / "allocation.json").read_text()) == {"allocation": [2, 8, 14]}

    (child,) = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = '{tracker.run_id}'"
    )
    assert child.info.run_name == "epoch-0"
    assert child.info.status == "FINISHED"
    assert child.data.tags["epoch"] == "0"
    child_history = client.get_metric_history(child.info.run_id, "eval/accuracy")
    assert [(m.step, m.value) for m in child_history] == [(10, 0.5)]


def test_runs_end_failed_when_the_body_raises(store: Store) -> None:
    with pytest.raises(RuntimeError, match="diverged"):
        with store.start() as tracker:
            with tracker.child("epoch-0") as child:
                raise RuntimeError("diverged")
    client = store.client()

    assert client.get_run(child.run_id).info.status == "FAILED"
    assert client.get_run(tracker.run_id).info.status == "FAILED"


def test_resuming_a_run_id_appends_metrics_and_finishes_it(store: Store) -> None:
    with pytest.raises(RuntimeError):
        with store.start() as first:
            first.log_params({"seed": 0})
            first.log_metrics({"losses/policy": 1.0}, step=0)
            raise RuntimeError("crash")
    with store.start(run_id=first.run_id) as resumed:
        resumed.log_params({"seed": 0})  # re-logging an unchanged param is allowed
        resumed.log_metrics({"losses/policy": 0.5}, step=1)
    client = store.client()

    assert resumed.run_id == first.run_id
    history = client.get_metric_history(first.run_id, "losses/policy")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5)]
    assert client.get_run(first.run_id).info.status == "FINISHED"


def test_resuming_refuses_a_run_of_another_experiment(store: Store) -> None:
    with store.start() as tracker:
        pass

    with pytest.raises(ValueError, match="belongs to experiment"):
        with MlflowTracker.start(store.tracking_uri, "other", run_id=tracker.run_id):
            pass


def test_a_stage_in_another_process_nests_its_run_under_the_parent(
    store: Store, tmp_path: Path
) -> None:
    stage = textwrap.dedent(
        f"""
        import sys
        from pipeline_lib.adapters.mlflow_tracker import MlflowTracker
        with MlflowTracker.start({store.tracking_uri!r}, {EXPERIMENT!r}, "train",
                                 parent_run_id=sys.argv[1]) as tracker:
            tracker.log_metrics({{"losses/policy": 0.25}}, step=7)
            print(tracker.run_id)
        """
    )
    with store.start("pipeline") as parent:
        done = subprocess.run(
            [sys.executable, "-c", stage, parent.run_id],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parents[1],
        )
    child_run_id = done.stdout.strip().splitlines()[-1]
    client = store.client()

    child = client.get_run(child_run_id)
    assert child.data.tags[PARENT_RUN_TAG] == parent.run_id
    assert child.info.experiment_id == client.get_run(parent.run_id).info.experiment_id
    assert child.data.metrics == {"losses/policy": 0.25}


def test_buffered_metrics_are_written_every_k_calls_and_when_the_run_fails(store: Store) -> None:
    client = store.client()

    def logged_steps(run_id: str) -> list[int]:
        return [m.step for m in client.get_metric_history(run_id, "losses/policy")]

    with pytest.raises(RuntimeError):
        with store.start(flush_every=3) as tracker:
            for step in range(2):
                tracker.log_metrics({"losses/policy": 1.0}, step=step)
            assert logged_steps(tracker.run_id) == []
            tracker.log_metrics({"losses/policy": 1.0}, step=2)
            assert logged_steps(tracker.run_id) == [0, 1, 2]
            tracker.log_metrics({"losses/policy": math.nan}, step=3)
            raise RuntimeError("diverged")

    assert logged_steps(tracker.run_id) == [0, 1, 2, 3]
    assert client.get_run(tracker.run_id).info.status == "FAILED"


def test_non_finite_metrics_are_logged_not_dropped(store: Store) -> None:
    with store.start() as tracker:
        tracker.log_metrics({"losses/policy": math.nan, "losses/kl": math.inf}, step=0)
    metrics = store.client().get_run(tracker.run_id).data.metrics

    assert math.isnan(metrics["losses/policy"])
    assert metrics["losses/kl"] > 1e300


def test_null_tracker_takes_the_same_calls_and_records_nothing(tmp_path: Path) -> None:
    with start_run(None, EXPERIMENT, "train") as tracker:
        _log_one_of_everything(tracker, tmp_path)
        tracker.log_model(tmp_path / "checkpoint", "policy")

    assert isinstance(tracker, NullTracker)
    assert isinstance(tracker, Tracker)
    assert tracker.run_id is None


def test_a_policy_is_logged_as_a_transformers_model_that_loads_back(
    store: Store, tmp_path: Path
) -> None:
    """The tiny Qwen2 policy with its character tokenizer, logged from its checkpoint folder:
    a text-generation model in the run's experiment, linked to the run, that loads back as
    a pipeline generating what the model generates, and as a pyfunc model."""
    import mlflow.pyfunc
    import mlflow.transformers

    from pipeline_lib.policy.checkpoint import save_policy
    from pipeline_lib.policy.tiny import build_tiny_qwen2
    from pipeline_lib.policy.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    model = build_tiny_qwen2(tokenizer)
    policy_dir = save_policy(model, tokenizer, tmp_path / "policy")
    with store.start("train/knapsack") as tracker:
        tracker.log_model(policy_dir, "policy")

    client = store.client()
    run = client.get_run(tracker.run_id)
    (output,) = run.outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert logged.name == "policy" and logged.source_run_id == tracker.run_id
    assert logged.experiment_id == run.info.experiment_id
    assert logged.artifact_location.startswith(store.artifact_location)

    prompt = "12+7="
    ids = tokenizer(prompt, return_tensors="pt")
    greedy = model.generate(**ids, max_new_tokens=4, do_sample=False)
    expected = tokenizer.decode(greedy[0], skip_special_tokens=True)
    pipeline = mlflow.transformers.load_model(logged.artifact_location)
    generated = pipeline(prompt, max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert generated == expected
    predictions = mlflow.pyfunc.load_model(logged.artifact_location).predict([prompt])
    assert len(predictions) == 1 and isinstance(predictions[0], str)
