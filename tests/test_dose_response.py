"""The uniform dose-response: primary metric, positive control and uniform-equivalent
compute, against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pipeline_lib.comparison.dose_response import (
    heldout_auc,
    multiplier_at,
    positive_control,
    primary_value,
    uniform_equivalent,
)
from pipeline_lib.comparison.stats import ArmRuns, compare_summary
from pipeline_lib.comparison.table import compare_markdown_table, positive_control_text

DOSES = [(0.5, 0.60), (1.0, 0.64), (2.0, 0.70)]


def test_heldout_auc_is_the_trapezoid_area_over_the_steps_spanned():
    curve = pd.DataFrame({"step": [0, 10, 30], "accuracy": [0.4, 0.6, 0.7]})
    # (0.4 + 0.6) / 2 * 10 + (0.6 + 0.7) / 2 * 20 = 5 + 13 = 18, over 30 steps
    assert heldout_auc(curve) == pytest.approx(18 / 30)
    assert heldout_auc(curve.iloc[::-1]) == pytest.approx(18 / 30)  # any row order
    assert primary_value({"curve": curve.to_dict(orient="list")}, "heldout_auc") == 0.6
    assert primary_value({"final_accuracy": 0.7}, "final_accuracy") == 0.7
    with pytest.raises(ValueError, match="unknown primary metric 'auc'"):
        primary_value({}, "auc")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.67, 2**0.5),  # halfway from 1x to 2x in log2 budget
        (0.62, 2**-0.5),  # halfway from 0.5x to 1x
        (0.64, 1.0),
        (0.60, 0.5),
        (0.70, 2.0),
        (0.59, "below"),
        (0.71, "beyond"),
    ],
)
def test_multiplier_at_interpolates_linearly_in_log2_budget(value, expected):
    found = multiplier_at(value, DOSES)
    if isinstance(expected, str):
        assert found == expected
    else:
        assert found == pytest.approx(expected)


def test_multiplier_at_takes_the_first_crossing_of_a_non_monotone_response():
    doses = [(0.5, 0.60), (1.0, 0.70), (2.0, 0.65)]
    assert multiplier_at(0.66, doses) == pytest.approx(2 ** (-1 + 0.6))
    assert multiplier_at(0.72, doses) == "beyond"


def _uniform(low, mid, high):
    """Per-seed values (seeds 0, 1, 2) of the three uniform doses."""
    return {
        name: dict(enumerate(values))
        for name, values in (("uniform-0.5x", low), ("uniform", mid), ("uniform-2x", high))
    }


def test_uniform_equivalent_is_a_geometric_mean_over_seeds_with_a_log2_interval():
    uniform = _uniform([0.60, 0.58, 0.61], [0.64, 0.62, 0.66], [0.70, 0.70, 0.70])
    arm = {0: 0.67, 1: 0.66, 2: 0.68}
    # per seed: 2^0.5; 0.66 on 0.62 -> 0.70: share 0.5 -> 2^0.5; 0.68 on 0.66 -> 0.70: 2^0.5
    found = uniform_equivalent(arm, uniform)
    assert found["doses"] == [0.5, 1.0, 2.0] and found["outside"] is None
    assert found["multiplier"] == pytest.approx(2**0.5)
    assert found["ci"] == pytest.approx([2**0.5, 2**0.5])
    logs = [math.log2(multiplier_at(v, [(m, uniform[n][s]) for n, m in
            (("uniform-0.5x", 0.5), ("uniform", 1.0), ("uniform-2x", 2.0))]))
            for s, v in {0: 0.67, 1: 0.64, 2: 0.69}.items()]  # fmt: skip
    spread = uniform_equivalent({0: 0.67, 1: 0.64, 2: 0.69}, uniform)
    half = stats.t.ppf(0.975, 2) * np.std(logs, ddof=1) / math.sqrt(3)
    assert spread["multiplier"] == pytest.approx(2 ** np.mean(logs))
    assert spread["ci"] == pytest.approx([2 ** (np.mean(logs) - half), 2 ** (np.mean(logs) + half)])


def test_uniform_equivalent_outside_the_measured_range_is_a_bound_not_a_number():
    uniform = {"uniform": {0: 0.64, 1: 0.62}, "uniform-2x": {0: 0.70, 1: 0.70}}
    beyond = uniform_equivalent({0: 0.75, 1: 0.66}, uniform)
    assert beyond["multiplier"] is None and beyond["outside"] == "beyond 2x"
    below = uniform_equivalent({0: 0.50, 1: 0.80}, uniform)
    assert below["outside"] == "below 1x / beyond 2x"
    assert uniform_equivalent({0: 0.6}, {"uniform": {0: 0.6}}) is None  # one dose


def test_positive_control_needs_both_contrasts_above_two_points_with_intervals_above_zero():
    sensitive = positive_control(
        _uniform([0.50, 0.52, 0.51], [0.55, 0.56, 0.57], [0.60, 0.62, 0.61])
    )
    assert sensitive["testbed_sensitive"] is True
    contrast = sensitive["contrasts"]["uniform - uniform-0.5x"]
    assert contrast["per_seed"] == pytest.approx([0.05, 0.04, 0.06])
    half = stats.t.ppf(0.975, 2) * np.std([0.05, 0.04, 0.06], ddof=1) / math.sqrt(3)
    assert contrast["ci"] == pytest.approx([0.05 - half, 0.05 + half])
    flat = positive_control(_uniform([0.50, 0.52, 0.51], [0.55, 0.56, 0.57], [0.56, 0.57, 0.57]))
    assert flat["testbed_sensitive"] is False  # 2x - 1x is +0.007: below the 2 points
    noisy = positive_control(_uniform([0.50, 0.52, 0.51], [0.60, 0.50, 0.60], [0.70, 0.50, 0.70]))
    assert noisy["contrasts"]["uniform-2x - uniform"]["difference"] > 0.02
    assert noisy["testbed_sensitive"] is False  # its interval reaches below 0
    assert positive_control({"uniform": {0: 0.5}, "uniform-2x": {0: 0.6}}) is None


def _runs(primary, accuracy, rollouts=10):
    seeds = tuple(range(len(primary)))
    curve = pd.DataFrame(
        {"step": [0, 10], "accuracy": [0.5, 0.6], "rollouts": [0, rollouts], "tokens": [0, 5],
         "seconds": [0.0, 1.0]}
    )  # fmt: skip
    return ArmRuns(
        seeds=seeds,
        prompt_scores=np.array([[accuracy, accuracy]] * len(seeds)),
        effective_gradient_ratios=np.full(len(seeds), 0.5),
        curves=tuple(curve for _ in seeds),
        primary=tuple(primary[s] for s in seeds),
    )


def test_compare_summary_carries_per_seed_primary_values_the_control_and_equivalents():
    arms = {
        "knapsack": _runs([0.67, 0.66, 0.68], 0.6),
        "uniform-0.5x": _runs([0.60, 0.58, 0.61], 0.5),
        "uniform": _runs([0.64, 0.62, 0.66], 0.55),
        "uniform-2x": _runs([0.70, 0.70, 0.70], 0.6, rollouts=20),
    }
    summary = compare_summary("uniform", arms, "heldout_auc")
    assert summary["primary_metric"] == "heldout_auc"
    assert summary["arms"]["knapsack"]["primary"] == [0.67, 0.66, 0.68]
    assert summary["positive_control"]["testbed_sensitive"] is True
    assert summary["arms"]["knapsack"]["uniform_equivalent"]["multiplier"] == pytest.approx(2**0.5)
    assert "uniform_equivalent" not in summary["arms"]["uniform-2x"]  # a dose, not an arm
    table = compare_markdown_table(summary).splitlines()
    assert table[0].endswith(
        "| heldout_auc (95 % CI) | rollouts spent (x uniform) "
        "| uniform-equivalent compute (95 % CI) |"
    )
    knapsack = next(line for line in table if line.startswith("| knapsack "))
    spent = summary["arms"]["knapsack"]["rollouts"] / summary["arms"]["uniform"]["rollouts"]
    assert knapsack.endswith(f"| {spent:.2f}x | 1.41x (1.41x to 1.41x) |")
    double = next(line for line in table if line.startswith("| uniform-2x "))
    assert "| 2.00x | (dose) |" in double  # what it spent, beside what it is worth
    assert "the testbed is sensitive" in positive_control_text(summary)
    assert "predates the positive control" in positive_control_text(
        compare_summary("uniform", arms)
    )


def test_the_hardest_level_secondary_averages_only_that_levels_prompts_per_seed():
    seeds = (0, 1, 2)
    curve = _runs([0.5, 0.5, 0.5], 0.5).curves[0]
    # Prompts at levels 2, 5, 5, 3: the hardest level is 5, prompts 1 and 2.
    scores = np.array([[1.0, 0.2, 0.4, 0.9], [1.0, 0.4, 0.6, 0.9], [1.0, 0.0, 0.2, 0.9]])
    runs = ArmRuns(seeds, scores, np.full(3, 0.5), (curve,) * 3, (0.5, 0.5, 0.5))
    summary = compare_summary("uniform", {"uniform": runs}, None, np.array([2, 5, 5, 3]))
    entry = summary["arms"]["uniform"]
    assert summary["hardest_level"] == 5
    assert entry["hardest_level_accuracy"] == pytest.approx([0.3, 0.5, 0.1])
    low, high = entry["hardest_level_accuracy_ci"]
    assert low < 0.3 < high
    with pytest.raises(ValueError, match="3 levels for 4 held-out prompts"):
        compare_summary("uniform", {"uniform": runs}, None, np.array([2, 5, 5]))
    table = compare_markdown_table(summary).splitlines()
    assert table[0].endswith("| level 5 accuracy (95 % CI) |")
    assert table[2].endswith(f"| 0.300 ({low:.3f} to {high:.3f}) |")
