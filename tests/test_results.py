"""The results a person reads: metrics files with one number per name, the headline table,
the plot definitions, the progress lines, and the MLflow runs that carry the answer."""

from __future__ import annotations

import json
import logging
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ops.mlflow_link import experiment_url
from ops.plots_offline import TEMPLATE, html_template, vega_bundle
from pipeline_lib.adapters.mlflow_runs import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    NOTE_TAG,
    PARENT_ENV,
    RUN_COLOR_TAG,
    STRATEGY_COLORS,
    ProgressTracker,
    record_final_lock,
)
from pipeline_lib.config import load_config
from pipeline_lib.evaluation.headline import (
    headline_columns,
    headline_rows,
    markdown_table,
    text_table,
)
from pipeline_lib.evaluation.summary import HEADLINE_KEYS, eval_metrics, summarize
from pipeline_lib.tracking import NullTracker
from pipeline_lib.training.outputs import timing_metrics, train_metrics
from tasks.evaluate import log_pipeline_result
from tasks.tracking import stage_run
from tests.conftest import REPO_ROOT

SUMMARY = {
    "start_accuracy": 0.39,
    "knapsack_accuracy": 0.669,
    "knapsack_accuracy_ci_low": 0.623,
    "knapsack_accuracy_ci_high": 0.715,
    "knapsack_effective_gradient_ratio": 0.709,
    "knapsack_step_seconds": 1.02,
    "uniform_accuracy": 0.673,
    "uniform_accuracy_ci_low": 0.626,
    "uniform_accuracy_ci_high": 0.719,
    "uniform_effective_gradient_ratio": 0.414,
    "uniform_step_seconds": 0.83,
    "effective_gradient_ratio_gain": 1.71,
}


def leaves(tree) -> list:
    return [v for x in tree.values() for v in leaves(x)] if isinstance(tree, dict) else [tree]


def test_committed_metrics_files_hold_numbers_only():
    for name in ("train.json", "timing.json", "summary.json", "eval.json"):
        values = leaves(json.loads((REPO_ROOT / "metrics" / name).read_text()))
        assert values and all(isinstance(v, int | float) for v in values), name


def test_train_metrics_keep_numbers_and_drop_paths_timings_and_the_in_training_accuracy():
    summary = {
        "final_accuracy": 0.6,
        "mean_effective_gradient_ratio": 0.7,
        "rollout_tokens_per_second": 10.0,
        "mean_step_seconds": 1.0,
        "policy_dir": "models/trained/knapsack",
        "steps_csv": "models/trained/knapsack/steps.csv",
    }
    assert train_metrics({"knapsack": summary}) == {"knapsack": {"effective_gradient_ratio": 0.7}}
    # Wall-clock numbers go to metrics/timing.json alone (they differ on every run).
    assert timing_metrics({"knapsack": summary}) == {
        "knapsack_rollout_tokens_per_second": 10.0,
        "knapsack_step_seconds": 1.0,
    }


def test_summary_is_flat_numbers_with_the_effective_gradient_gain(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("metrics").mkdir()
    Path("metrics/train.json").write_text(
        json.dumps(
            {
                "knapsack": {"effective_gradient_ratio": 0.8},
                "uniform": {"effective_gradient_ratio": 0.4},
            }
        )
    )
    metrics = {"accuracy": 0.5, "accuracy_ci_low": 0.4, "accuracy_ci_high": 0.6, "pass@1": 0.5}
    results = {name: {"arithmetic": metrics} for name in ("start", "knapsack", "uniform")}
    summary = summarize(results, [Path("arithmetic.parquet")], ("knapsack", "uniform"))
    assert all(isinstance(v, float) for v in summary.values())
    assert summary["effective_gradient_ratio_gain"] == pytest.approx(2.0)
    assert "pass@1" not in eval_metrics(results, "arithmetic")["knapsack"]["arithmetic"]


def dvc_metrics_files() -> list[str]:
    dvc = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    return [
        next(iter(entry)) if isinstance(entry, dict) else entry
        for stage in dvc["stages"].values()
        for entry in stage.get("metrics", [])
    ]


def test_each_number_has_one_name_in_dvc_metrics(tmp_path, monkeypatch):
    """summary.json, eval.json and timing.json (DVC's metrics) share no number and together
    hold every result but pass@1; train.json, whose numbers summary.json repeats, is a
    plain output; the timings stay out of summary.json (they differ on every run)."""
    monkeypatch.chdir(tmp_path)
    Path("metrics").mkdir()
    train = {s: {"effective_gradient_ratio": r} for s, r in (("knapsack", 0.71), ("uniform", 0.41))}
    Path("metrics/train.json").write_text(json.dumps(train))
    keys = (*HEADLINE_KEYS, "accuracy_level_1", "num_prompts", "pass@1", "pass@4")
    results = {
        policy: {
            bench: {key: 1000 * i + 100 * j + k for k, key in enumerate(keys)}
            for j, bench in enumerate(("arithmetic", "gsm8k"))
        }
        for i, policy in enumerate(("start", "knapsack", "uniform"))
    }
    benchmarks = [Path("arithmetic.parquet"), Path("gsm8k.parquet")]
    summary = summarize(results, benchmarks, ("knapsack", "uniform"))
    summary.pop("effective_gradient_ratio_gain")  # derived, not a result
    details = eval_metrics(results, "arithmetic")
    named = leaves(summary) + leaves(details)
    assert len(named) == len(set(named)), "a number under two names"
    results_less_pass1 = [
        v for per in results.values() for m in per.values() for k, v in m.items() if k != "pass@1"
    ]
    assert set(named) == set(results_less_pass1) | set(leaves(train))
    assert "accuracy" in details["knapsack"]["gsm8k"], "other benchmarks keep their accuracy"
    assert not any(key.endswith("_seconds") for key in summary)
    assert dvc_metrics_files() == [
        "metrics/timing.json",
        "metrics/summary.json",
        "metrics/eval.json",
    ]


def committed_metrics(name: str) -> dict:
    """metrics/<name> as committed at HEAD (the reference run), not as the working tree
    holds it: `make run` rewrites metrics/, and on another CPU its floats differ."""
    try:
        text = subprocess.run(
            ["git", "show", f"HEAD:metrics/{name}"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the files as they are
        text = (REPO_ROOT / "metrics" / name).read_text()
    return json.loads(text)


def test_the_reference_numbers_come_from_git_not_from_the_working_tree():
    """A `make run` that rewrote metrics/summary.json (another CPU's floats) leaves the
    committed reference, which the README's tests read, as it was."""
    path = REPO_ROOT / "metrics" / "summary.json"
    original = path.read_text()
    committed = committed_metrics("summary.json")
    try:
        path.write_text(json.dumps({key: value + 0.1 for key, value in committed.items()}))
        assert committed_metrics("summary.json") == committed
        test_readme_results_table_is_the_committed_reference_run()
    finally:
        path.write_text(original)


def test_committed_metrics_hold_each_number_once():
    """The committed reference run in the same shape: eval.json leaves the main benchmark's
    accuracy and interval to summary.json, which repeats every number of train.json."""
    summary = committed_metrics("summary.json")
    details = committed_metrics("eval.json")
    train = committed_metrics("train.json")
    for policy in ("start", "knapsack", "uniform"):
        assert not set(HEADLINE_KEYS) & set(details[policy]["arithmetic"]), policy
        assert {f"{policy}_{key}" for key in HEADLINE_KEYS} <= set(summary), policy
    for strategy, facts in train.items():
        for name, value in facts.items():
            assert summary[f"{strategy}_{name}"] == value, (strategy, name)


def test_headline_table_has_one_row_per_policy_with_intervals():
    rows = headline_rows(SUMMARY, ["knapsack", "uniform"])
    assert [r[0] for r in rows] == ["start", "knapsack", "uniform"]
    assert rows[1][1] == "0.669 (0.623-0.715)" and rows[2][2] == "0.414"
    assert rows[0][1:] == ["0.390", "", ""]
    untimed = {k: v for k, v in SUMMARY.items() if not k.endswith("_step_seconds")}
    assert "s / step" not in markdown_table(untimed, ["knapsack", "uniform"])
    assert [len(row) for row in headline_rows(untimed, ["knapsack"])] == [3, 3]
    start_interval = SUMMARY | {"start_accuracy_ci_low": 0.345, "start_accuracy_ci_high": 0.433}
    assert headline_rows(start_interval, [])[0][1] == "0.390 (0.345-0.433)"
    assert "1.71x" in markdown_table(SUMMARY, ["knapsack", "uniform"])
    lines = text_table(rows).splitlines()
    assert len(lines) == 5 and lines[1].startswith("------")


def test_each_plot_is_defined_once_with_axes_titles_and_a_template():
    dvc = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    assert all("plots" not in stage for stage in dvc["stages"].values())
    for entry in dvc["plots"]:
        ((name, plot),) = entry.items()
        assert {"x", "y", "title", "x_label", "y_label", "template"} <= set(plot), name
        assert (REPO_ROOT / plot["template"]).exists()
        template = json.loads((REPO_ROOT / plot["template"]).read_text())
        color = template["encoding"]["color"]
        assert color["field"] == "field", "one colour per strategy"
        scale = color["scale"]
        shown = dict(zip(scale["domain"], scale["range"], strict=True))
        assert {"knapsack", "uniform"} <= shown.keys(), "the default strategies"
        assert all(STRATEGY_COLORS[name] == colour for name, colour in shown.items())


def test_offline_template_inlines_the_libraries_and_drops_dvc_cdn_tags():
    page = html_template("window.vegaEmbed = function () {};", "1.0")
    assert "{plot_divs}" in page and "{scripts}" not in page
    assert "window.vegaEmbed" in page and "src=" not in page


def test_plain_dvc_plots_show_inlines_vega_and_loads_no_remote_script(tmp_path):
    """.dvc/config's `plots.html_template` (relative to .dvc/) names the template that
    `make install` writes, so `dvc plots show` with no options makes a page that renders
    offline: Vega, Vega-Lite and Vega-Embed inlined, no script from http(s)."""
    from dvc.repo import Repo

    with Repo(str(REPO_ROOT)) as repo:
        configured = Path(repo.dvc_dir) / repo.config["plots"]["html_template"]
    assert configured == REPO_ROOT / TEMPLATE
    assert configured.is_file(), f"no {TEMPLATE}: `make install` writes it"
    subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "plots", "show", "-o", str(tmp_path)],
        cwd=REPO_ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    remote = re.findall(r"<script[^>]*\ssrc\s*=\s*[\"']?https?:[^>]*>", page, re.IGNORECASE)
    assert not remote, f"the page loads scripts from the network: {remote}"
    assert vega_bundle()[0] in page, "Vega, Vega-Lite and Vega-Embed are not inlined"
    assert "{plot_divs}" not in page and "vegaEmbed('#" in page, "DVC did not fill in the plots"


def test_progress_tracker_writes_a_line_every_n_steps_and_forwards_everything(caplog):
    tracker = ProgressTracker(NullTracker(), "train", every=2)
    with caplog.at_level(logging.INFO, logger="knapsack_rl"):
        for step in range(1, 5):
            tracker.log_metrics({"rollout/effective_gradient_ratio": 0.5, "other": 1.0}, step)
        with tracker.child("train/knapsack") as child:
            assert isinstance(child, ProgressTracker)
            child.log_metrics({"train/loss": 0.25}, step=2)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "train step 2: effective_gradient_ratio 0.5",
        "train step 4: effective_gradient_ratio 0.5",
        "train/knapsack step 2: loss 0.25",
    ]


def test_mlflow_link_points_at_the_experiments_training_view(tmp_path):
    store = tmp_path / "mlflow.db"
    with sqlite3.connect(store) as db:
        db.execute("CREATE TABLE experiments (experiment_id INTEGER, name TEXT)")
        db.execute("INSERT INTO experiments VALUES (7, 'knapsack-rl')")
    url = experiment_url("http://127.0.0.1:5000", store, "knapsack-rl")
    assert url == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert experiment_url("http://h", tmp_path / "none.db", "x").endswith(
        "workflowType=machine_learning"
    )


def test_mlflow_link_finds_the_newest_comparison_and_charts_its_children(tmp_path):
    from ops.mlflow_link import chart_url, newest_comparison

    store = tmp_path / "mlflow.db"
    with sqlite3.connect(store) as db:
        db.execute("CREATE TABLE experiments (experiment_id INTEGER, name TEXT)")
        db.execute("INSERT INTO experiments VALUES (7, 'knapsack-rl')")
        db.execute(
            "CREATE TABLE runs (run_uuid TEXT, experiment_id INTEGER, start_time INTEGER,"
            " lifecycle_stage TEXT)"
        )
        db.execute("CREATE TABLE tags (run_uuid TEXT, key TEXT, value TEXT)")
        for run, start, parent in (("old", 1, None), ("new", 2, None), ("child", 3, "new")):
            db.execute("INSERT INTO runs VALUES (?, 7, ?, 'active')", (run, start))
            db.execute("INSERT INTO tags VALUES (?, 'stage', 'compare')", (run,))
            if parent:
                db.execute("INSERT INTO tags VALUES (?, 'mlflow.parentRunId', ?)", (run, parent))
    assert newest_comparison(store, "knapsack-rl") == "new"  # a parent, the newest one
    assert newest_comparison(store, "other") is None
    url = chart_url("http://h", store, "knapsack-rl", "new")
    assert url.startswith("http://h/#/experiments/7/runs?workflowType=machine_learning")
    assert "compareRunsMode=CHART" in url and "orderByKey=" in url
    assert "searchFilter=tags.%60mlflow.parentRunId%60%20%3D%20%27new%27" in url


@pytest.fixture
def config(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(PARENT_ENV, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO_ROOT / "params.yaml", "params.yaml")
    overrides = {
        "tracking.uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.artifact_location": str(tmp_path / "mlruns"),
    }
    return load_config("params.yaml", overrides)


def test_parent_run_spans_the_stages_and_carries_the_answer(config, tmp_path):
    """Stages reopen the parent; evaluate's result lands in the parent and the strategy
    runs; the final dvc.lock is added afterwards without changing any run's end time."""
    from mlflow import MlflowClient

    with stage_run(config, "train") as tracker:
        for strategy in ("knapsack", "uniform"):
            with tracker.child(f"train/{strategy}", {"strategy": strategy, "stage": "train"}):
                pass
    Path("metrics").mkdir()
    Path("metrics/summary.json").write_text(json.dumps(SUMMARY))
    results = {
        s: {"arithmetic": {"accuracy": SUMMARY[f"{s}_accuracy"], "pass@4": 0.8}}
        for s in ("knapsack", "uniform")
    }
    with stage_run(config, "evaluate"):
        log_pipeline_result(config, SUMMARY, results, "arithmetic")
    client = MlflowClient(tracking_uri=config.tracking.uri)
    experiment = client.get_experiment_by_name(config.tracking.experiment)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    parent = next(r for name, r in runs.items() if name.startswith("pipeline-"))
    assert parent.info.status == "FINISHED"
    assert parent.info.end_time >= runs["evaluate"].info.end_time
    assert parent.data.metrics["knapsack_accuracy"] == SUMMARY["knapsack_accuracy"]
    assert "| knapsack | 0.669 (0.623-0.715)" in parent.data.tags[NOTE_TAG]
    assert "[train](#/experiments/" in parent.data.tags[NOTE_TAG]
    knapsack = runs["train/knapsack"]
    assert knapsack.data.tags[RUN_COLOR_TAG] != runs["train/uniform"].data.tags[RUN_COLOR_TAG]
    assert knapsack.data.metrics["heldout/arithmetic/pass_at_4"] == 0.8
    assert knapsack.data.params["train.steps"] == str(config.train.steps)

    ended = {r.info.run_id: r.info.end_time for r in runs.values()}
    Path("dvc.lock").write_text("schema: '2.0'\n")
    assert record_final_lock(config) == parent.info.run_id
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "dvc")] == ["dvc/dvc.lock"]
    for run in client.search_runs([experiment.experiment_id]):
        assert run.info.end_time == ended[run.info.run_id]
    artifacts = client.list_artifacts(runs["train"].info.run_id, "pipeline")
    assert "pipeline/dvc.lock" in [a.path for a in artifacts]


def test_readme_results_table_is_the_committed_reference_run():
    """The README's table shows what `make results` prints for the committed metrics
    (a new reference run must update both)."""
    summary = committed_metrics("summary.json")
    timing = committed_metrics("timing.json")
    expected = headline_rows(summary | timing, ["knapsack", "uniform"])
    readme = (REPO_ROOT / "README.md").read_text()
    # The headline table: the first one under the column header `make results` prints
    # (the comparison's table further down has rows for the same policies).
    lines = readme.splitlines()
    header = lines.index("| " + " | ".join(headline_columns(summary | timing)) + " |")
    table = []
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    assert [row[1:] for row in table] == [row[1:] for row in expected]
