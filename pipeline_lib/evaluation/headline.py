"""The pipeline's answer as text: one table of held-out accuracy, effective-gradient
ratio and step time per policy, read from `metrics/summary.json`'s flat keys (and
`metrics/timing.json`'s, where the caller merges them in: the step time column is shown
only when some policy has one).

Pure formatting (values in, text out): the MLflow parent run's description and
`make results` print the same table.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

COLUMNS = ("policy", "held-out accuracy (95 % CI)", "effective-gradient ratio", "s / step")


def headline_columns(summary: Mapping[str, float]) -> tuple[str, ...]:
    """The table's header: without `s / step` when no policy has a step time."""
    if any(key.endswith("_step_seconds") for key in summary):
        return COLUMNS
    return COLUMNS[:-1]


def headline_rows(summary: Mapping[str, float], strategies: Sequence[str]) -> list[list[str]]:
    """One row per policy (start, then each strategy); blanks where a number is missing."""
    timed = len(headline_columns(summary)) == len(COLUMNS)
    return [
        [
            policy,
            _accuracy(summary, policy),
            _number(summary.get(f"{policy}_effective_gradient_ratio")),
            *([_number(summary.get(f"{policy}_step_seconds"), "{:.2f}")] if timed else []),
        ]
        for policy in ("start", *strategies)
    ]


def _accuracy(summary: Mapping[str, float], policy: str) -> str:
    """`0.669 (0.623-0.715)`: the accuracy with its 95 % interval where the summary has one."""
    accuracy = _number(summary.get(f"{policy}_accuracy"))
    low = summary.get(f"{policy}_accuracy_ci_low")
    high = summary.get(f"{policy}_accuracy_ci_high")
    if accuracy and low is not None and high is not None:
        accuracy += f" ({low:.3f}-{high:.3f})"
    return accuracy


def markdown_table(summary: Mapping[str, float], strategies: Sequence[str]) -> str:
    """The headline table in Markdown, with the effective-gradient gain under it."""
    columns = headline_columns(summary)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in headline_rows(summary, strategies)]
    gain = summary.get("effective_gradient_ratio_gain")
    if gain is not None:
        lines += [
            "",
            f"Knapsack gives {gain:.2f}x the uniform share of rollouts with a learning signal "
            "at the same rollout budget. Accuracy differences inside the 95 % intervals "
            "are noise at one seed.",
        ]
    return "\n".join(lines)


def text_table(rows: Sequence[Sequence[str]], header: Sequence[str] = COLUMNS) -> str:
    """Rows as an aligned plain-text table (for a terminal)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def _number(value: float | None, fmt: str = "{:.3f}") -> str:
    return "" if value is None else fmt.format(value)
