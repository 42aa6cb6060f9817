"""The comparison as the README shows it: a Markdown table generated from compare.json,
and the positive control's verdict in one sentence."""

from __future__ import annotations

from collections.abc import Mapping

from pipeline_lib.comparison.stats import COMPUTE_COLUMNS

COMPARE_COLUMNS = (
    "arm",
    "seeds",
    "held-out accuracy (95 % CI)",
    "difference vs {baseline} (95 % CI, p)",
    "effective-gradient ratio",
    "compute to match {baseline}: rollouts / tokens / seconds",
)
# With a pre-registered primary metric (compare.json's `primary_metric`): three more. What
# an arm spent sits beside what it is worth: an arm that spends 2x and is worth 2x is no
# better per rollout than uniform.
PRIMARY_COLUMNS = (
    "{primary_metric} (95 % CI)",
    "rollouts spent (x {baseline})",
    "uniform-equivalent compute (95 % CI)",
)
# With compare.json's `hardest_level` (a secondary): one more.
HARDEST_COLUMN = ("level {hardest_level} accuracy (95 % CI)",)


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def compare_rows(summary: Mapping) -> list[list[str]]:
    """One row per arm of a compare.json dict, the numbers as the README shows them."""
    rows = []
    baseline_rollouts = summary["arms"][summary["baseline"]]["rollouts"]
    for name, arm in summary["arms"].items():
        accuracy = f"{arm['accuracy_mean']:.3f}"
        if arm["accuracy_ci"] is not None:
            accuracy += " ({:.3f} to {:.3f})".format(*arm["accuracy_ci"])
        versus = arm["vs_baseline"]
        if name == summary["baseline"]:
            difference = "(baseline)"
        else:
            difference = f"{versus['difference']:+.3f}"
            if versus["ci"] is not None:
                difference += " ({:+.3f} to {:+.3f}, p = {:.3f})".format(
                    *versus["ci"], versus["p_value"]
                )
        match = arm["compute_to_match_baseline"]
        compute = (
            "never reached"
            if match is None
            else " / ".join(_ratio(match[f"{k}_ratio"]) for k in COMPUTE_COLUMNS)
        )
        row = [
            name,
            str(len(arm["seeds"])),
            accuracy,
            difference,
            f"{arm['effective_gradient_ratio_mean']:.3f}",
            compute,
        ]
        if "primary_metric" in summary:
            row += [
                _mean_ci(arm.get("primary_mean"), arm.get("primary_ci")),
                _ratio(arm["rollouts"] / baseline_rollouts if baseline_rollouts else None),
                _equivalent(arm),
            ]
        if "hardest_level" in summary:
            per_seed = arm["hardest_level_accuracy"]
            row.append(_mean_ci(sum(per_seed) / len(per_seed), arm["hardest_level_accuracy_ci"]))
        rows.append(row)
    return rows


def _mean_ci(mean: float | None, ci: list[float] | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3f}" + ("" if ci is None else " ({:.3f} to {:.3f})".format(*ci))


def _equivalent(arm: Mapping) -> str:
    """An arm's uniform-equivalent compute: the multiplier with its interval, the range
    it lies outside of, or "(dose)" for the uniform arms themselves."""
    if "uniform_equivalent" not in arm:
        return "(dose)"
    equivalent = arm["uniform_equivalent"]
    if equivalent is None:
        return "-"
    if equivalent["multiplier"] is None:
        return equivalent["outside"] or "-"
    text = f"{equivalent['multiplier']:.2f}x"
    if equivalent["ci"] is not None:
        text += " ({:.2f}x to {:.2f}x)".format(*equivalent["ci"])
    return text


def positive_control_text(summary: Mapping) -> str:
    """One sentence: whether the testbed can judge any arm (the uniform dose-response)."""
    if "primary_metric" not in summary:
        return (
            "This comparison predates the positive control (no pre-registered primary "
            "metric, no uniform-0.5x arm): no arm can be judged on it."
        )
    control = summary.get("positive_control")
    if control is None:
        return (
            "Positive control not measured (uniform-0.5x, uniform and uniform-2x were not "
            "all run): no arm can be judged on this testbed."
        )
    parts = []
    for name, contrast in control["contrasts"].items():
        interval = "" if contrast["ci"] is None else " ({:+.3f} to {:+.3f})".format(*contrast["ci"])
        parts.append(f"{name} {contrast['difference']:+.3f}{interval}")
    verdict = (
        "the testbed is sensitive"
        if control["testbed_sensitive"]
        else "the testbed is NOT sensitive: no arm can be judged on it"
    )
    threshold = control["threshold"]
    return (
        f"Positive control on {summary['primary_metric']}: {'; '.join(parts)}; both must be "
        f">= {threshold:.2f} with intervals above 0, so {verdict}."
    )


def compare_markdown_table(summary: Mapping) -> str:
    """The comparison table in Markdown, generated from a compare.json dict."""
    columns = COMPARE_COLUMNS + (PRIMARY_COLUMNS if "primary_metric" in summary else ())
    columns += HARDEST_COLUMN if "hardest_level" in summary else ()
    names = {
        "baseline": summary["baseline"],
        "primary_metric": summary.get("primary_metric"),
        "hardest_level": summary.get("hardest_level"),
    }
    header = [c.format(**names) for c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in compare_rows(summary)]
    return "\n".join(lines)
