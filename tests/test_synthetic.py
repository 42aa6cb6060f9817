"""Tests of the synthetic arithmetic generator."""

import re

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.data.synthetic import (
    LEVELS,
    OPERAND_WIDTH,
    SOURCE,
    generate_arithmetic,
    heldout_scores,
    split_arithmetic,
)

PROBLEM = re.compile(r"^ *(\d+)([+*]) *(\d+)=$")


def test_same_seed_gives_identical_table_and_other_seed_differs():
    first = generate_arithmetic(300, seed=3)
    pd.testing.assert_frame_equal(first, generate_arithmetic(300, seed=3))
    assert set(first["id"]) != set(generate_arithmetic(300, seed=4)["id"])


def test_columns_and_types():
    table = generate_arithmetic(60, seed=0)
    assert list(table.columns) == ["id", "problem", "answer", "source", "level"]
    assert (table["source"] == SOURCE).all()
    assert table["level"].dtype == np.int64
    assert all(isinstance(value, str) for value in table["answer"])


def test_problems_and_ids_are_unique_within_a_call():
    table = generate_arithmetic(3000, seed=1)
    assert table["problem"].is_unique
    assert table["id"].is_unique


def test_answers_are_correct_by_independent_evaluation():
    table = generate_arithmetic(2000, seed=2)
    for problem, answer in zip(table["problem"], table["answer"], strict=True):
        left, operator, right = PROBLEM.match(problem).groups()
        expected = int(left) * int(right) if operator == "*" else int(left) + int(right)
        assert answer == str(expected)


def test_every_prompt_has_the_same_length():
    table = generate_arithmetic(1000, seed=0)
    assert set(table["problem"].str.len()) == {2 * OPERAND_WIDTH + 2}
    num_heldout = int((heldout_scores(1, np.arange(100)) < 0.5).sum())
    sizes = {"train": 100 - num_heldout, "heldout": num_heldout}
    level_1 = pd.concat(
        [generate_arithmetic(n, seed=0, levels=[1], split=split) for split, n in sizes.items()]
    )
    assert "  7+  5=" in set(level_1["problem"])


def test_operands_have_the_digit_counts_of_their_level():
    table = generate_arithmetic(1200, seed=5)
    for problem, level in zip(table["problem"], table["level"], strict=True):
        left, operator, right = PROBLEM.match(problem).groups()
        spec = LEVELS[level]
        assert operator == spec.operator
        assert spec.left_range[0] <= int(left) <= spec.left_range[1]
        assert spec.right_range[0] <= int(right) <= spec.right_range[1]


def test_all_levels_present_with_shares_following_weights():
    assert set(generate_arithmetic(600, seed=0)["level"]) == set(LEVELS)
    table = generate_arithmetic(500, seed=0, levels=[2, 3, 4, 5, 6])
    assert table["level"].value_counts().to_dict() == {level: 100 for level in [2, 3, 4, 5, 6]}
    weighted = generate_arithmetic(400, seed=0, levels=[3, 5], level_weights=[3, 1])
    assert weighted["level"].value_counts().to_dict() == {3: 300, 5: 100}


def test_small_level_gives_all_its_problems_and_others_make_up_the_rest():
    table = generate_arithmetic(400, seed=0, levels=[1, 3], split="train")
    level_1_train = int((heldout_scores(1, np.arange(100)) >= 0.5).sum())
    assert (table["level"] == 1).sum() == level_1_train
    assert len(table) == 400


def test_asking_for_more_problems_than_exist_fails():
    with pytest.raises(ValueError, match="distinct problems"):
        generate_arithmetic(101, seed=0, levels=[1])


def test_train_and_heldout_never_overlap_across_seeds():
    train = pd.concat([generate_arithmetic(3000, seed=s, split="train") for s in range(3)])
    heldout = pd.concat([generate_arithmetic(600, seed=s, split="heldout") for s in range(3)])
    assert set(train["problem"]).isdisjoint(heldout["problem"])
    assert set(train["id"]).isdisjoint(heldout["id"])


def test_split_arithmetic_returns_disjoint_tables_of_the_requested_sizes():
    train, heldout = split_arithmetic(2000, 300, seed=0)
    assert (len(train), len(heldout)) == (2000, 300)
    assert set(train["id"]).isdisjoint(heldout["id"])


def test_larger_draw_keeps_each_levels_earlier_problems():
    small = generate_arithmetic(120, seed=9, level_weights=[1] * 6)
    large = generate_arithmetic(600, seed=9, level_weights=[1] * 6)
    assert set(small["id"]) <= set(large["id"])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_prompts": -1},
        {"levels": [7]},
        {"levels": [1, 1]},
        {"level_weights": [1.0]},
        {"level_weights": [0.0] * 6},
        {"split": "test"},
        {"heldout_fraction": 1.0},
    ],
)
def test_bad_arguments_fail_naming_the_argument(kwargs):
    arguments = {"num_prompts": 10, "seed": 0, **kwargs}
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name.split("_")[0]):
        generate_arithmetic(**arguments)
