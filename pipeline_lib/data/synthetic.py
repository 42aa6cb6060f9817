"""Seeded synthetic arithmetic prompts with graded difficulty.

Levels (an n-digit operand is 0-9 for n = 1, else 10^(n-1) .. 10^n - 1):

| level | problem             | distinct problems |
|-------|---------------------|-------------------|
| 1     | 1-digit + 1-digit   | 100               |
| 2     | 2-digit + 1-digit   | 900               |
| 3     | 2-digit + 2-digit   | 8,100             |
| 4     | 3-digit + 2-digit   | 81,000            |
| 5     | 3-digit + 3-digit   | 810,000           |
| 6     | 2-digit * 1-digit   | 900               |

Operands are right-aligned to `OPERAND_WIDTH` characters, so every prompt has
the same length (`"  7+  5="`, answer `"12"`); with the character tokenizer that
means every prompt has the same number of tokens and batches need no padding.

Every problem belongs to exactly one side, train or held-out, decided by a
hash of its identity (not of the seed), so no train set drawn with any seed
overlaps any held-out set drawn with any seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd

SOURCE = "synthetic-arithmetic"
OPERAND_WIDTH = 3
Split = Literal["train", "heldout"]


@dataclass(frozen=True)
class ArithmeticLevel:
    """One difficulty level: digit counts of the two operands and the operator."""

    level: int
    left_digits: int
    right_digits: int
    operator: str

    @property
    def left_range(self) -> tuple[int, int]:
        """Smallest and largest left operand."""
        return _digit_range(self.left_digits)

    @property
    def right_range(self) -> tuple[int, int]:
        """Smallest and largest right operand."""
        return _digit_range(self.right_digits)

    @property
    def num_problems(self) -> int:
        """Number of distinct problems at this level (both sides)."""
        (left_low, left_high), (right_low, right_high) = self.left_range, self.right_range
        return (left_high - left_low + 1) * (right_high - right_low + 1)


LEVELS: dict[int, ArithmeticLevel] = {
    spec.level: spec
    for spec in (
        ArithmeticLevel(1, 1, 1, "+"),
        ArithmeticLevel(2, 2, 1, "+"),
        ArithmeticLevel(3, 2, 2, "+"),
        ArithmeticLevel(4, 3, 2, "+"),
        ArithmeticLevel(5, 3, 3, "+"),
        ArithmeticLevel(6, 2, 1, "*"),
    )
}


def _digit_range(digits: int) -> tuple[int, int]:
    return (0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def format_problem(left: int, operator: str, right: int) -> str:
    """Return the prompt text, operands right-aligned: `format_problem(7, "+", 5) == "  7+  5="`."""
    return f"{left:>{OPERAND_WIDTH}}{operator}{right:>{OPERAND_WIDTH}}="


def solve(left: int, operator: str, right: int) -> int:
    """Return the value of `left operator right`."""
    if operator == "+":
        return left + right
    if operator == "*":
        return left * right
    raise ValueError(f"unknown operator {operator!r}")


def heldout_scores(level: int, indices: np.ndarray) -> np.ndarray:
    """Map problems (level, index within level) to fixed pseudo-random numbers in [0, 1).

    A problem is held out when its score is below the held-out fraction. The
    score is the splitmix64 hash of the problem's identity: independent of any
    seed, so the split never moves. indices: (n,) ints -> (n,) floats.
    """
    with np.errstate(over="ignore"):
        x = indices.astype(np.uint64) + np.uint64(level) * np.uint64(0x9E3779B97F4A7C15)
        x = x + np.uint64(0x6B6E61707361636B)  # fixed salt ("knapsack")
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)


def _side_indices(spec: ArithmeticLevel, split: Split, heldout_fraction: float) -> np.ndarray:
    indices = np.arange(spec.num_problems, dtype=np.int64)
    heldout = heldout_scores(spec.level, indices) < heldout_fraction
    return indices[heldout if split == "heldout" else ~heldout]


def _allocate_counts(total: int, weights: Sequence[float], capacities: Sequence[int]) -> list[int]:
    """Split `total` across levels in proportion to `weights`, capped by `capacities`.

    A level whose share exceeds its capacity gets all its problems and the rest
    is shared among the others (largest-remainder rounding, ties to earlier levels).
    """
    counts = [0] * len(weights)
    open_levels = [i for i, weight in enumerate(weights) if weight > 0]
    if total > sum(capacities[i] for i in open_levels):
        raise ValueError(
            f"asked for {total} distinct problems but the chosen levels and split "
            f"hold only {sum(capacities[i] for i in open_levels)}"
        )
    remaining = total
    while open_levels:
        weight_sum = sum(weights[i] for i in open_levels)
        ideal = {i: remaining * weights[i] / weight_sum for i in open_levels}
        share = {i: int(np.floor(ideal[i])) for i in open_levels}
        leftover = remaining - sum(share.values())
        for i in sorted(open_levels, key=lambda i: (-(ideal[i] - share[i]), i))[:leftover]:
            share[i] += 1
        full = [i for i in open_levels if share[i] > capacities[i]]
        if not full:
            for i in open_levels:
                counts[i] = share[i]
            break
        for i in full:
            counts[i] = capacities[i]
            remaining -= capacities[i]
        open_levels = [i for i in open_levels if i not in full]
    return counts


def generate_arithmetic(
    num_prompts: int,
    seed: int,
    levels: Sequence[int] | None = None,
    level_weights: Sequence[float] | None = None,
    *,
    split: Split = "train",
    heldout_fraction: float = 0.5,
) -> pd.DataFrame:
    """Draw `num_prompts` distinct problems from one side of the train/held-out split.

    levels: which of `LEVELS` to draw from (default: all); level_weights: their
    relative shares (default: equal), aligned with `levels`. A level with fewer
    problems than its share gives all of them and the others make up the rest.
    Deterministic in its arguments; a larger `num_prompts` with the same seed
    keeps every level's earlier draws. Rows are shuffled.

    Returns columns id (stable per problem, e.g. "arith-L3-000123"), problem,
    answer, source, level.
    """
    chosen_levels = list(LEVELS) if levels is None else list(levels)
    weights = [1.0] * len(chosen_levels) if level_weights is None else list(level_weights)
    _check_arguments(num_prompts, chosen_levels, weights, split, heldout_fraction)
    specs = [LEVELS[level] for level in chosen_levels]
    sides = [_side_indices(spec, split, heldout_fraction) for spec in specs]
    counts = _allocate_counts(num_prompts, weights, [len(side) for side in sides])

    frames = []
    for spec, side, count in zip(specs, sides, counts, strict=True):
        # One generator per level keeps a level's draws independent of the others' counts.
        rng = np.random.default_rng([seed, spec.level])
        frames.append(_problem_rows(spec, rng.permutation(side)[:count]))
    table = pd.concat(frames, ignore_index=True)
    order = np.random.default_rng([seed, 0]).permutation(len(table))
    return table.iloc[order].reset_index(drop=True)


def split_arithmetic(
    num_train: int,
    num_heldout: int,
    seed: int,
    levels: Sequence[int] | None = None,
    train_level_weights: Sequence[float] | None = None,
    heldout_level_weights: Sequence[float] | None = None,
    *,
    heldout_fraction: float = 0.5,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Return disjoint `(train, heldout)` tables, each as `generate_arithmetic` draws them."""
    train = generate_arithmetic(
        num_train,
        seed,
        levels,
        train_level_weights,
        split="train",
        heldout_fraction=heldout_fraction,
    )
    heldout = generate_arithmetic(
        num_heldout,
        seed,
        levels,
        heldout_level_weights,
        split="heldout",
        heldout_fraction=heldout_fraction,
    )
    return train, heldout


def _problem_rows(spec: ArithmeticLevel, indices: np.ndarray) -> pd.DataFrame:
    (left_low, _), (right_low, right_high) = spec.left_range, spec.right_range
    right_count = right_high - right_low + 1
    rows = []
    for index in indices.tolist():
        left, right = left_low + index // right_count, right_low + index % right_count
        rows.append(
            {
                "id": f"arith-L{spec.level}-{index:06d}",
                "problem": format_problem(left, spec.operator, right),
                "answer": str(solve(left, spec.operator, right)),
                "source": SOURCE,
                "level": spec.level,
            }
        )
    columns = ["id", "problem", "answer", "source", "level"]
    return pd.DataFrame(rows, columns=columns).astype({"level": "int64"})


def _check_arguments(
    num_prompts: int,
    levels: list[int],
    weights: list[float],
    split: str,
    heldout_fraction: float,
) -> None:
    if num_prompts < 0:
        raise ValueError(f"num_prompts must be >= 0, got {num_prompts}")
    unknown = [level for level in levels if level not in LEVELS]
    if unknown or not levels or len(set(levels)) != len(levels):
        raise ValueError(f"levels must be distinct values from {list(LEVELS)}, got {levels}")
    if len(weights) != len(levels) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(
            f"level_weights must be {len(levels)} non-negative numbers, not all zero; got {weights}"
        )
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
