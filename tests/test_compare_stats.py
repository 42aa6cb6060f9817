"""Comparison statistics against scipy's own tests and intervals, a slow oracle, and coverage
on data simulated with known seed and prompt variance."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pipeline_lib.comparison.stats import (
    ArmRuns,
    accuracy_interval,
    compare_summary,
    compute_at_accuracy,
    compute_to_match,
    mean_curve,
    paired_difference,
)
from pipeline_lib.comparison.table import compare_markdown_table


@pytest.mark.parametrize("values", [[0.61, 0.64, 0.66], [0.5, 0.52], [0.3, 0.35, 0.31, 0.4, 0.29]])
def test_accuracy_interval_is_scipys_t_interval_over_seeds(values):
    expected = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert accuracy_interval(values) == pytest.approx(expected, rel=1e-12)


def test_one_seed_has_no_interval():
    assert accuracy_interval([0.5]) is None


def test_with_one_prompt_it_is_scipys_paired_t_test_over_seeds():
    arm = np.array([[0.62], [0.66], [0.65], [0.70]])
    base = np.array([[0.60], [0.61], [0.66], [0.64]])
    found = paired_difference(arm, base)
    expected = stats.ttest_rel(arm[:, 0], base[:, 0])
    assert found.p_value == pytest.approx(expected.pvalue, rel=1e-10)
    assert found.ci == pytest.approx(tuple(expected.confidence_interval(0.95)), rel=1e-10)
    assert found.dof == pytest.approx(3)


def test_with_one_seed_it_is_scipys_paired_t_test_over_prompts():
    rng = np.random.default_rng(1)
    arm, base = rng.random((1, 40)), rng.random((1, 40))
    found = paired_difference(arm, base)
    expected = stats.ttest_rel(arm[0], base[0])
    assert found.p_value == pytest.approx(expected.pvalue, rel=1e-10)
    assert found.ci == pytest.approx(tuple(expected.confidence_interval(0.95)), rel=1e-10)


def oracle_standard_error(d: np.ndarray) -> float:
    """The two-way ANOVA estimate of Var(mean d), written out with loops."""
    s, j = d.shape
    grand = sum(d[a, b] for a in range(s) for b in range(j)) / (s * j)
    rows = [sum(d[a, b] for b in range(j)) / j for a in range(s)]
    cols = [sum(d[a, b] for a in range(s)) / s for b in range(j)]
    ms_seed = j * sum((r - grand) ** 2 for r in rows) / (s - 1)
    ms_prompt = s * sum((c - grand) ** 2 for c in cols) / (j - 1)
    ms_e = sum((d[a, b] - rows[a] - cols[b] + grand) ** 2 for a in range(s) for b in range(j)) / (
        (s - 1) * (j - 1)
    )
    var_seed = max(ms_seed - ms_e, 0.0) / j  # variance components, truncated at 0
    var_prompt = max(ms_prompt - ms_e, 0.0) / s
    return float(np.sqrt(var_seed / s + var_prompt / j + ms_e / (s * j)))


@pytest.mark.parametrize(("seed_sd", "prompt_sd"), [(0.05, 0.2), (0.0, 0.3), (0.1, 0.0), (0, 0)])
def test_standard_error_matches_the_variance_components_oracle(seed_sd, prompt_sd):
    rng = np.random.default_rng(7)
    d = (
        rng.normal(0, seed_sd, (3, 1))
        + rng.normal(0, prompt_sd, (1, 25))
        + rng.normal(0, 0.1, (3, 25))
    )
    found = paired_difference(d, np.zeros_like(d))
    assert found.standard_error == pytest.approx(oracle_standard_error(d), rel=1e-10)
    assert found.difference == pytest.approx(d.mean())


def coverage(seed_sd: float, prompt_sd: float, reps: int = 1000) -> tuple[float, float]:
    """Share of 95 % intervals holding the true difference 0.03: ours, and a t-interval
    over the 3 seeds' mean differences that ignores which prompts were drawn."""
    rng = np.random.default_rng(11)
    ours = seeds_only = 0
    for _ in range(reps):
        d = (
            0.03
            + rng.normal(0, seed_sd, (3, 1))
            + rng.normal(0, prompt_sd, (1, 30))
            + rng.normal(0, 0.3, (3, 30))
        )
        lo, hi = paired_difference(d, np.zeros_like(d)).ci
        ours += lo <= 0.03 <= hi
        lo, hi = accuracy_interval(d.mean(axis=1))
        seeds_only += lo <= 0.03 <= hi
    return ours / reps, seeds_only / reps


def test_intervals_cover_the_true_difference_under_seed_and_prompt_variance():
    ours, _ = coverage(seed_sd=0.05, prompt_sd=0.1)
    assert 0.93 <= ours <= 0.98
    # Prompt effects shared by every seed: over seeds alone the interval is far too narrow.
    ours, seeds_only = coverage(seed_sd=0.0, prompt_sd=0.4)
    assert 0.93 <= ours <= 0.99 and seeds_only < 0.8


def test_identical_arms_differ_by_zero_with_certainty():
    scores = np.random.default_rng(0).random((3, 10))
    found = paired_difference(scores, scores)
    assert (found.difference, found.ci, found.p_value) == (0.0, (0.0, 0.0), 1.0)


def curve(accuracy, rollouts, steps=None):
    steps = steps or [0, 10, 20, 30][: len(accuracy)]
    rollouts = np.asarray(rollouts, dtype=float)
    return pd.DataFrame(
        {
            "step": steps,
            "accuracy": accuracy,
            "rollouts": rollouts,
            "tokens": 3 * rollouts,
            "seconds": rollouts / 100,
        }
    )


def test_compute_at_accuracy_interpolates_the_first_crossing():
    c = curve([0.2, 0.4, 0.6, 0.5], [0, 100, 200, 300])
    assert compute_at_accuracy(c, 0.5) == pytest.approx(
        {"rollouts": 150.0, "tokens": 450.0, "seconds": 1.5}
    )
    assert compute_at_accuracy(c, 0.2)["rollouts"] == 0.0
    assert compute_at_accuracy(c, 0.61) is None


def test_mean_curve_averages_seeds_at_steps_all_of_them_evaluated():
    a = curve([0.2, 0.4, 0.6], [0, 100, 200])
    b = curve([0.4, 0.6, 0.8, 0.9], [0, 120, 240, 360])
    mean = mean_curve([a, b])
    assert mean["step"].tolist() == [0, 10, 20]
    assert mean["accuracy"].tolist() == pytest.approx([0.3, 0.5, 0.7])
    assert mean["rollouts"].tolist() == pytest.approx([0, 110, 220])


def test_compute_to_match_is_a_ratio_to_the_baseline_and_none_when_never_reached():
    baseline = [curve([0.2, 0.3, 0.4, 0.5], [0, 100, 200, 300])]
    faster = [curve([0.2, 0.5, 0.6, 0.6], [0, 150, 300, 450])]
    slower = [curve([0.2, 0.25, 0.3, 0.35], [0, 100, 200, 300])]
    assert compute_to_match(baseline, baseline, 0.5)["rollouts_ratio"] == 1.0
    matched = compute_to_match(faster, baseline, 0.5)
    assert matched["rollouts"] == 150 and matched["rollouts_ratio"] == pytest.approx(0.5)
    assert matched["tokens_ratio"] == pytest.approx(0.5)
    assert matched["seconds_ratio"] == pytest.approx(0.5)
    assert compute_to_match(slower, baseline, 0.5) is None


def arm_runs(rng, shift, seeds=(0, 1, 2), prompts=50):
    scores = np.clip(0.5 + shift + rng.normal(0, 0.3, (len(seeds), prompts)), 0, 1)
    final = scores.mean(axis=1)
    curves = tuple(
        curve([0.4, (0.4 + f) / 2, f], [0, 1000 * (1 + shift), 2000 * (1 + shift)]) for f in final
    )
    return ArmRuns(tuple(seeds), scores, rng.uniform(0.3, 0.7, len(seeds)), curves)


def test_compare_json_has_the_issue_shape_and_recomputable_numbers():
    rng = np.random.default_rng(3)
    arms = {"uniform": arm_runs(rng, 0.0), "knapsack": arm_runs(rng, 0.05)}
    summary = compare_summary("uniform", arms)
    json.dumps(summary, allow_nan=False)  # valid JSON: no NaN or inf anywhere
    assert summary["baseline"] == "uniform" and set(summary["arms"]) == {"uniform", "knapsack"}
    entry = summary["arms"]["knapsack"]
    required = {
        "seeds",
        "accuracy",
        "accuracy_mean",
        "accuracy_ci",
        "effective_gradient_ratio_mean",
        "rollouts",
        "tokens",
        "seconds",
        "vs_baseline",
        "compute_to_match_baseline",
    }
    assert required <= set(entry)
    assert {"difference", "ci", "p_value"} <= set(entry["vs_baseline"])
    assert {"rollouts_ratio", "tokens_ratio", "seconds_ratio"} <= set(
        entry["compute_to_match_baseline"]
    )
    accuracy = entry["accuracy"]
    assert entry["seeds"] == [0, 1, 2]
    assert entry["accuracy_mean"] == pytest.approx(np.mean(accuracy))
    assert entry["accuracy_ci"] == pytest.approx(
        stats.t.interval(0.95, 2, loc=np.mean(accuracy), scale=stats.sem(accuracy))
    )
    base = summary["arms"]["uniform"]
    assert entry["vs_baseline"]["difference"] == pytest.approx(
        entry["accuracy_mean"] - base["accuracy_mean"]
    )
    assert base["vs_baseline"] == (
        {"difference": 0.0, "ci": [0.0, 0.0], "p_value": 1.0, "standard_error": 0.0, "dof": None}
    )
    assert base["compute_to_match_baseline"]["rollouts_ratio"] == pytest.approx(1.0)
    assert entry["rollouts"] == pytest.approx(2000 * 1.05)


def test_arms_are_paired_on_the_seeds_they_share_with_the_baseline():
    rng = np.random.default_rng(4)
    baseline = arm_runs(rng, 0.0, seeds=(0, 1, 2))
    arm = arm_runs(rng, 0.0, seeds=(2, 0))
    summary = compare_summary("uniform", {"uniform": baseline, "arm": arm})
    expected = np.mean(arm.accuracies - baseline.accuracies[[2, 0]])
    assert summary["arms"]["arm"]["vs_baseline"]["difference"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="no seed in common"):
        compare_summary("uniform", {"uniform": baseline, "x": arm_runs(rng, 0, seeds=(5,))})


def test_markdown_table_shows_each_arm_as_compare_json_has_it():
    rng = np.random.default_rng(5)
    arms = {"uniform": arm_runs(rng, 0.0), "knapsack": arm_runs(rng, 0.05)}
    summary = compare_summary("uniform", arms)
    table = compare_markdown_table(summary).splitlines()
    assert table[0].startswith(
        "| arm | seeds | held-out accuracy (95 % CI) | difference vs uniform"
    )
    knapsack = summary["arms"]["knapsack"]
    row = next(line for line in table if line.startswith("| knapsack |"))
    assert f"{knapsack['accuracy_mean']:.3f} ({knapsack['accuracy_ci'][0]:.3f} to" in row
    assert f"{knapsack['vs_baseline']['difference']:+.3f} (" in row
    ratio = knapsack["compute_to_match_baseline"]["rollouts_ratio"]
    assert f"| {ratio:.2f}x / " in row
    assert "(baseline)" in next(line for line in table if line.startswith("| uniform |"))
