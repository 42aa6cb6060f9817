"""The comparison's config, run keys (what makes a finished run reusable), records, plots and
the README table generated from compare.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ops import compare_table
from pipeline_lib.comparison import plots as compare_plots
from pipeline_lib.comparison.runs import (
    RunInputs,
    arm_runs,
    curves_table,
    egr_table,
    run_config,
    run_key,
    run_record,
)
from pipeline_lib.comparison.stats import compare_summary
from pipeline_lib.config import ConfigError, parse_config
from tests.conftest import REPO_ROOT

INPUTS = RunInputs("models/start", "s1", "train.parquet", "heldout.parquet", "d1", "c1")


def test_compare_defaults_are_the_uniform_doses_knapsack_and_dapo_over_five_seeds():
    compare = parse_config({}).compare
    assert compare.arms == ("knapsack", "uniform-0.5x", "uniform", "uniform-2x", "dynamic-sampling")
    assert compare.seeds == (0, 1, 2, 3, 4) and compare.baseline == "uniform"
    assert compare.deployment is None


@pytest.mark.parametrize(
    ("compare", "message"),
    [
        ({"baseline": "uniform-2x", "arms": ["knapsack", "uniform"]}, "baseline 'uniform-2x'"),
        ({"seeds": [0, 0]}, "seeds must not repeat"),
        ({"arms": ["knapsack", "knapsack", "uniform"]}, "arms must not repeat"),
        ({"arms": ["knapsak", "uniform"]}, "compare.arms.0"),
        ({"seeds": []}, "compare.seeds"),
        ({"steps": 0}, "compare.steps"),
        ({"step": 10}, "unknown key 'compare.step'"),
        ({"set": "followup"}, "set 'followup' is not a comparison set; known: default, followups"),
        (
            {"sets": {"mine": ["knapsack"]}},
            "baseline 'uniform' is not among the arms of set 'mine'",
        ),
        ({"sets": {"mine": ["uniform", "uniform"]}}, "set 'mine' must name distinct arms"),
        ({"sets": {"mine": ["uniform", "greedy"]}}, "compare.sets.mine.1"),
    ],
)
def test_bad_compare_settings_fail_naming_the_key(compare, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({"compare": compare})


def test_a_set_selects_its_arms_and_its_own_metrics_file_with_the_same_run_keys():
    default = parse_config({}).compare
    followups = parse_config({"compare": {"set": "followups"}})
    assert default.selected_arms == default.arms and default.result_name == "compare"
    assert followups.compare.selected_arms == followups.compare.sets["followups"]
    assert followups.compare.result_name == "compare_followups"
    # A run's key does not depend on the set that asks for it: finished runs are reused.
    assert run_key(followups, "uniform", 0, INPUTS) == run_key(
        parse_config({}), "uniform", 0, INPUTS
    )


def test_every_field_of_the_compare_section_has_a_description():
    from pipeline_lib.config import CompareConfig

    assert all(field.description for field in CompareConfig.model_fields.values())


def test_a_run_trains_with_compare_steps_its_seed_and_its_arm_only():
    config = parse_config({"compare": {"steps": 7}, "train": {"steps": 400}})
    settings = run_config(config, "uniform-2x", 2)
    assert settings.train.steps == 7 and settings.seed == 2
    assert settings.train.strategies == ("uniform-2x",)


def test_a_run_key_ignores_the_other_arms_and_seeds_but_not_its_own_inputs():
    """Adding a seed or an arm must not invalidate the runs already finished."""
    config = parse_config({})
    key = run_key(config, "knapsack", 0, INPUTS)
    more = parse_config({"compare": {"seeds": [0, 1, 2, 3], "arms": ["knapsack", "uniform"]}})
    assert run_key(more, "knapsack", 0, INPUTS) == key
    assert run_key(config, "knapsack", 1, INPUTS) != key
    assert run_key(config, "uniform", 0, INPUTS) != key
    assert run_key(parse_config({"compare": {"steps": 5}}), "knapsack", 0, INPUTS) != key
    assert run_key(parse_config({"train": {"learning_rate": 1e-3}}), "knapsack", 0, INPUTS) != key
    for field in ("start_hash", "data_hash", "code_hash"):
        changed = RunInputs(**(INPUTS.__dict__ | {field: "other"}))
        assert run_key(config, "knapsack", 0, changed) != key, field


def test_parallel_runs_are_what_the_cores_hold_unless_set(monkeypatch):
    from flows.compare import parallel_runs

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert parallel_runs(parse_config({})) == 8  # 16 cores, 2 threads a run
    assert parallel_runs(parse_config({"threads": 4})) == 4
    assert parallel_runs(parse_config({"compare": {"parallel_runs": 1}})) == 1
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert parallel_runs(parse_config({})) == 1  # 2 cores: one after another
    assert parallel_runs(parse_config({"threads": 4})) == 1
    # How many run at once is no part of a run's result: its key ignores it.
    assert run_key(parse_config({"compare": {"parallel_runs": 3}}), "uniform", 0, INPUTS) == (
        run_key(parse_config({}), "uniform", 0, INPUTS)
    )


def fake_steps(accuracies: list[float], rollouts_per_step: float) -> pd.DataFrame:
    """A metric history with an evaluation every step."""
    rows = []
    for step, accuracy in enumerate(accuracies):
        rows.append(
            {
                "step": step,
                "eval/accuracy": accuracy,
                "rollout/effective_gradient_ratio": np.nan if step == 0 else 0.5,
                "compute/rollouts_total": step * rollouts_per_step,
                "compute/completion_tokens_total": step * rollouts_per_step * 4,
                "compute/seconds_total": step * 1.5,
            }
        )
    return pd.DataFrame(rows)


def records() -> list[dict]:
    made = []
    for arm, rate, shift in (("knapsack", 100.0, 0.1), ("uniform", 100.0, 0.0)):
        for seed in (1, 0):
            scores = np.clip(np.linspace(0.2, 0.8, 6) + shift + 0.01 * seed, 0, 1)
            steps = fake_steps([0.3, 0.4 + shift, float(scores.mean())], rate)
            made.append(run_record(arm, seed, f"k{seed}", steps, scores, 3.0, None))
    return made


def test_records_survive_json_and_feed_the_statistics_seeds_in_order():
    loaded = [json.loads(json.dumps(r)) for r in records()]
    runs = arm_runs(loaded, ["knapsack", "uniform"])
    assert runs["knapsack"].seeds == (0, 1)
    assert runs["knapsack"].prompt_scores.shape == (2, 6)
    summary = compare_summary("uniform", runs)
    assert summary["arms"]["knapsack"]["vs_baseline"]["difference"] == pytest.approx(0.1, abs=0.02)
    assert summary["arms"]["uniform"]["rollouts"] == 200.0


def test_a_missing_arm_is_an_error_not_an_empty_row():
    with pytest.raises(ValueError, match="no finished run of arm 'uniform-2x'"):
        arm_runs(records(), ["knapsack", "uniform-2x"])


@pytest.mark.parametrize("x", ["rollouts", "tokens", "seconds"])
def test_accuracy_plots_have_one_line_and_one_band_per_arm(x):
    figure = compare_plots.accuracy_vs_compute(curves_table(records()), x, ["knapsack", "uniform"])
    ax = figure.axes[0]
    assert [line.get_label() for line in ax.lines] == ["knapsack (2 seeds)", "uniform (2 seeds)"]
    assert len(ax.collections) == 2  # the bands over seeds


def test_effective_gradient_ratio_plot_has_a_line_per_arm():
    figure = compare_plots.effective_gradient_ratio_per_step(
        egr_table(records()), ["knapsack", "uniform"]
    )
    assert len(figure.axes[0].lines) == 2


def test_an_arm_keeps_its_colour_in_every_plot():
    """The project's strategy colours (also the MLflow runs' colour tags), not the cycle's."""
    from matplotlib.colors import to_hex

    from pipeline_lib.adapters.mlflow_runs import STRATEGY_COLORS

    arms = ["uniform", "knapsack"]
    figures = [
        compare_plots.accuracy_vs_compute(
            curves_table(records()), "rollouts", arms, STRATEGY_COLORS
        ),
        compare_plots.effective_gradient_ratio_per_step(
            egr_table(records()), arms, colours=STRATEGY_COLORS
        ),
    ]
    for figure in figures:
        colours = [to_hex(line.get_color()) for line in figure.axes[0].lines]
        assert colours == [STRATEGY_COLORS["uniform"], STRATEGY_COLORS["knapsack"]]


def test_the_readme_table_is_rewritten_between_the_markers_only():
    summary = compare_summary("uniform", arm_runs(records(), ["knapsack", "uniform"]))
    readme = f"intro\n{compare_table.START}\nold\n{compare_table.END}\noutro\n"
    block = "| new |"
    assert compare_table.rewrite(readme, block) == (
        f"intro\n{compare_table.START}\n{block}\n{compare_table.END}\noutro\n"
    )
    assert summary["arms"]["knapsack"]["accuracy_mean"] > 0


@pytest.mark.parametrize("comparison_set", ["default", "followups", "ablations"])
def test_readme_comparison_block_is_generated_from_the_committed_compare_json(comparison_set):
    """The README's table equals what ops/compare_table.py makes of metrics/compare.json
    (metrics/compare_<set>.json for another set; the placeholder while none is
    committed): it is never typed by hand."""
    readme = (REPO_ROOT / "README.md").read_text()
    path = REPO_ROOT / compare_table.compare_json_path(comparison_set)
    block = compare_table.table_block(path)
    assert compare_table.rewrite(readme, block, comparison_set) == readme


def test_the_block_does_not_depend_on_where_compare_json_is_read_from(tmp_path):
    summary = compare_summary("uniform", arm_runs(records(), ["knapsack", "uniform"]))
    for folder in (tmp_path / "a", tmp_path / "b"):
        folder.mkdir()
        (folder / "compare.json").write_text(json.dumps(summary))
    first, second = (compare_table.table_block(tmp_path / f / "compare.json") for f in "ab")
    assert first == second and "| knapsack | 2 |" in first


def test_a_resumed_run_continues_its_mlflow_run_under_the_new_comparison(tmp_path):
    """An interrupted arm x seed run, resumed by a later `make compare`, keeps one MLflow
    run (its history so far and what follows) and moves under the comparison that
    finishes it; a run started afresh gets a new child."""
    from mlflow import MlflowClient

    from pipeline_lib.adapters.mlflow_runs import RUN_KEY_TAG, open_child_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = parse_config({"tracking": {"uri": uri, "artifact_location": str(tmp_path / "mlruns")}})
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("knapsack-rl")
    first_parent = client.create_run(experiment).info.run_id
    second_parent = client.create_run(experiment)
    tags = {"arm": "knapsack", "seed": 0, RUN_KEY_TAG: "k123"}
    with open_child_run(config, "compare/knapsack/seed0", tags, first_parent, False) as run:
        run.log_metrics({"eval/accuracy": 0.4}, step=1)
        interrupted = run.run_id
    with open_child_run(
        config, "compare/knapsack/seed0", tags, second_parent.info.run_id, True
    ) as run:
        run.log_metrics({"eval/accuracy": 0.5}, step=2)
        resumed = run.run_id
    assert resumed == interrupted
    history = client.get_metric_history(resumed, "eval/accuracy")
    assert [(m.step, m.value) for m in history] == [(1, 0.4), (2, 0.5)]
    assert client.get_run(resumed).data.tags["mlflow.parentRunId"] == second_parent.info.run_id
    with open_child_run(config, "compare/knapsack/seed0", tags, first_parent, False) as run:
        assert run.run_id != interrupted


def _copy_code(root: Path) -> None:
    for package in ("pipeline_lib", "tasks", "flows"):
        shutil.copytree(
            REPO_ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__")
        )


def test_the_run_key_covers_every_module_the_training_imports(tmp_path):
    """The code hash follows the import graph: editing a module the training task imports
    (directly or not, e.g. the config or the atomic-file adapter) changes it; editing a
    module it does not import (the comparison's plots) does not."""
    from tasks.compare import code_hash

    _copy_code(tmp_path)
    before = code_hash(tmp_path)
    assert code_hash(tmp_path) == before
    plots = tmp_path / "pipeline_lib" / "comparison" / "plots.py"
    plots.write_text(plots.read_text() + "\n# not training code\n")
    assert code_hash(tmp_path) == before
    for module in ("pipeline_lib/config.py", "pipeline_lib/adapters/atomic.py"):
        path = tmp_path / module
        original = path.read_text()
        path.write_text(original + "\n# changed\n")
        assert code_hash(tmp_path) != before, module
        path.write_text(original)
    assert code_hash(tmp_path) == before
