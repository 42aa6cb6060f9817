"""Benchmark metrics: hand-computed cases, a brute-force oracle for pass@k, properties."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline_lib.evaluation.metrics import avg_at_k, pass_at_k, summarize_benchmark


def pass_at_k_by_enumeration(num_samples: int, num_correct: int, k: int) -> float:
    """Share of all k-subsets of the n samples that hold at least one correct sample."""
    outcomes = [True] * num_correct + [False] * (num_samples - num_correct)
    subsets = list(itertools.combinations(outcomes, k))
    return sum(any(subset) for subset in subsets) / len(subsets)


@st.composite
def counts(draw, max_samples: int = 40):
    num_samples = draw(st.integers(1, max_samples))
    num_correct = draw(st.integers(0, num_samples))
    return num_samples, num_correct


@pytest.mark.parametrize(
    ("num_samples", "num_correct", "k", "expected"),
    [
        (4, 0, 1, 0.0),
        (4, 4, 4, 1.0),
        (4, 1, 1, 0.25),
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 4, 1 - 35 / 210),  # 1 - C(7,4)/C(10,4)
        (8, 5, 4, 1.0),  # only 3 failures: every 4-subset holds a success
    ],
)
def test_pass_at_k_hand_computed(num_samples, num_correct, k, expected):
    assert pass_at_k(num_samples, num_correct, k) == pytest.approx(expected)


def test_pass_at_k_matches_enumeration_for_all_small_cases():
    for num_samples in range(1, 11):
        for num_correct in range(num_samples + 1):
            for k in range(1, num_samples + 1):
                assert pass_at_k(num_samples, num_correct, k) == pytest.approx(
                    pass_at_k_by_enumeration(num_samples, num_correct, k), abs=1e-12
                ), (num_samples, num_correct, k)


def test_pass_at_k_is_stable_for_large_n():
    """The product form stays finite where C(n, k) as a float would overflow."""
    expected = 1 - math.comb(9_000, 500) / math.comb(10_000, 500)
    assert pass_at_k(10_000, 1_000, 500) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize(
    ("num_samples", "num_correct", "k"), [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)]
)
def test_pass_at_k_rejects_impossible_arguments(num_samples, num_correct, k):
    with pytest.raises(ValueError):
        pass_at_k(num_samples, num_correct, k)


@given(counts())
def test_pass_at_1_is_the_success_rate(sample_counts):
    num_samples, num_correct = sample_counts
    assert pass_at_k(num_samples, num_correct, 1) == pytest.approx(num_correct / num_samples)


@given(counts(), st.data())
def test_pass_at_k_is_a_probability_monotone_in_k_and_in_correct(sample_counts, data):
    num_samples, num_correct = sample_counts
    k = data.draw(st.integers(1, num_samples))
    value = pass_at_k(num_samples, num_correct, k)
    assert 0.0 <= value <= 1.0
    if k < num_samples:
        assert pass_at_k(num_samples, num_correct, k + 1) >= value - 1e-12
    if num_correct < num_samples:
        assert pass_at_k(num_samples, num_correct + 1, k) >= value - 1e-12
    assert (value == 0.0) == (num_correct == 0)


def test_avg_at_k_is_the_mean_reward():
    assert avg_at_k([1.0, 0.0, 1.0, 1.0]) == 0.75
    assert avg_at_k(np.array([[1, 0], [0, 0]])) == 0.25
    with pytest.raises(ValueError):
        avg_at_k([])


def test_summarize_benchmark_hand_computed():
    metrics = summarize_benchmark([4, 4, 2], [4, 1, 0], ks=[1, 2])
    accuracies = np.array([1.0, 0.25, 0.0])
    assert metrics["accuracy"] == pytest.approx(accuracies.mean())
    assert metrics["pass@1"] == pytest.approx(accuracies.mean())
    assert metrics["pass@2"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)
    half_width = 1.959963984540054 * accuracies.std(ddof=1) / math.sqrt(3)
    assert accuracies.mean() - half_width < 0.0 and accuracies.mean() + half_width > 1.0
    assert (metrics["accuracy_ci_low"], metrics["accuracy_ci_high"]) == (0.0, 1.0)  # clipped
    assert metrics["num_prompts"] == 3.0


def test_summarize_benchmark_interval_is_the_normal_approximation_over_prompts():
    metrics = summarize_benchmark([4, 4, 4], [1, 2, 3], ks=[1])
    half_width = 1.959963984540054 * 0.25 / math.sqrt(3)  # sd of (0.25, 0.5, 0.75) is 0.25
    assert metrics["accuracy"] == 0.5
    assert metrics["accuracy_ci_low"] == pytest.approx(0.5 - half_width)
    assert metrics["accuracy_ci_high"] == pytest.approx(0.5 + half_width)


@given(st.lists(counts(max_samples=16), min_size=2, max_size=30))
def test_summarize_benchmark_interval_holds_the_accuracy(table):
    num_samples, num_correct = zip(*table, strict=True)
    metrics = summarize_benchmark(num_samples, num_correct, ks=[1])
    assert (
        0.0
        <= metrics["accuracy_ci_low"]
        <= metrics["accuracy"]
        <= metrics["accuracy_ci_high"]
        <= 1.0
    )
    assert metrics["pass@1"] == pytest.approx(metrics["accuracy"])


def test_summarize_benchmark_single_prompt_has_no_interval():
    metrics = summarize_benchmark([8], [3], ks=[1, 8])
    assert metrics["accuracy"] == 3 / 8
    assert math.isnan(metrics["accuracy_ci_low"]) and math.isnan(metrics["accuracy_ci_high"])
    assert metrics["pass@8"] == 1.0


@pytest.mark.parametrize(
    ("num_samples", "num_correct", "ks"),
    [([4, 2], [1, 1], [4]), ([4], [5], [1]), ([], [], [1]), ([4, 4], [1], [1]), ([0], [0], [1])],
)
def test_summarize_benchmark_rejects_bad_tables(num_samples, num_correct, ks):
    with pytest.raises(ValueError):
        summarize_benchmark(num_samples, num_correct, ks)
