"""Prefect tasks and flow helpers called directly (`.fn`), without a Prefect server."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from flows.common import parse_overrides
from flows.pipeline import dvc_command
from pipeline_lib.config import ConfigError, PrepareConfig
from pipeline_lib.data.schema import PromptTableError, read_prompts
from pipeline_lib.evaluation.summary import mlflow_name, summarize
from pipeline_lib.training.outputs import write_curves
from tasks.hashing import content_hash
from tasks.prepare import load_tables, write_tables


def test_prepare_tasks_write_validated_synthetic_tables(tmp_path):
    config = PrepareConfig(synthetic={"train_prompts": 40, "benchmark_prompts": 12})
    tables = load_tables.fn(config, seed=0)
    paths = write_tables.fn(tables, str(tmp_path))
    assert set(paths) == {"train", "arithmetic"}
    assert len(read_prompts(paths["train"])) == 40
    assert not set(read_prompts(paths["train"])["id"]) & set(
        read_prompts(paths["arithmetic"])["id"]
    )


def test_a_bad_benchmark_stops_prepare_before_anything_is_written(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "problem": "", "answer": "1", "source": "s"}))
    config = PrepareConfig(benchmarks=[{"name": "bad", "source": str(bad)}])
    with pytest.raises(PromptTableError, match="non_blank"):
        load_tables.fn(config, seed=0)
    assert list(tmp_path.iterdir()) == [bad]


def test_content_hash_tracks_bytes_and_names(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.bin").write_bytes(b"1")
    first = content_hash(tmp_path / "a")
    (tmp_path / "a" / "w.bin").write_bytes(b"2")
    assert content_hash(tmp_path / "a") != first
    assert content_hash(tmp_path / "a" / "w.bin") == content_hash(tmp_path / "a" / "w.bin")


def test_cli_overrides_parse_json_values_and_reject_bare_words():
    assert parse_overrides(["train.steps=10", 'train.strategies=["uniform"]', "x=abc"]) == {
        "train.steps": 10,
        "train.strategies": ["uniform"],
        "x": "abc",
    }
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        parse_overrides(["train.steps"])


def test_pipeline_uses_dvc_experiments_for_overrides():
    assert dvc_command(None) == ["dvc", "repro"]
    assert dvc_command({"train.steps": 2}) == ["dvc", "exp", "run", "-S", "train.steps=2"]


def test_curves_are_wide_tables_one_column_per_strategy(tmp_path):
    for strategy, value in (("knapsack", 0.7), ("uniform", 0.4)):
        pd.DataFrame(
            {
                "step": [0, 1, 2],
                "eval/accuracy": [0.1, None, 0.5],
                "rollout/effective_gradient_ratio": [None, value, value],
            }
        ).to_csv(tmp_path / f"{strategy}.csv", index=False)
    write_curves({s: tmp_path / f"{s}.csv" for s in ("knapsack", "uniform")}, tmp_path / "curves")
    ratio = pd.read_csv(tmp_path / "curves/effective_gradient_ratio.csv")
    assert list(ratio.columns) == ["step", "knapsack", "uniform"] and ratio["step"].tolist() == [
        1,
        2,
    ]
    assert pd.read_csv(tmp_path / "curves/accuracy.csv")["step"].tolist() == [0, 2]


def test_summary_names_the_keys_dvc_metrics_promise(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("metrics").mkdir()
    Path("metrics/train.json").write_text(
        json.dumps(
            {
                s: {"mean_effective_gradient_ratio": r}
                for s, r in (("knapsack", 0.7), ("uniform", 0.4))
            }
        )
    )
    metrics = {"accuracy": 0.5, "accuracy_ci_low": 0.4, "accuracy_ci_high": 0.6}
    results = {name: {"arithmetic": metrics} for name in ("start", "knapsack", "uniform")}
    summary = summarize(results, [Path("arithmetic.parquet")], ("knapsack", "uniform"))
    assert {
        "start_accuracy",
        "knapsack_accuracy",
        "uniform_accuracy",
        "knapsack_effective_gradient_ratio",
        "uniform_effective_gradient_ratio",
    } <= set(summary)
    # Wall-clock numbers live in metrics/timing.json, never in the headline.
    assert not any(key.endswith(("_seconds", "_per_second")) for key in summary)
    assert mlflow_name("eval/start/arithmetic/pass@4") == "eval/start/arithmetic/pass_at_4"
