"""Statistics of a comparison of allocation strategies (arms), each run with several seeds.

Runs are paired by seed: the same data, start policy and per-step prompt order for
every arm of a seed. Each run ends with a held-out evaluation scored per prompt
(the mean reward over that prompt's samples); the same held-out prompts for every
run. So an arm's results are a matrix float[S seeds, J prompts].

- `accuracy_interval`: the 95 % t-interval over seeds of the final accuracy,
  mean +- t(0.975, S-1) * sd / sqrt(S), sd with S-1 degrees of freedom.

- `paired_difference`, against the baseline: d[s, j] = arm[s, j] - baseline[s, j]
  is modelled as a crossed two-way random-effects design,

      d[s, j] = mu + a_s + b_j + e_sj,   a ~ (0, var_seed), b ~ (0, var_prompt),

  seeds and prompts both samples from larger populations (another seed, other
  prompts of the same task). The difference is mu_hat = mean(d), whose variance
  var_seed / S + var_prompt / J + var_e / (S J) is estimated from the ANOVA mean
  squares MS_seed = J * sum_s (d_s. - d..)^2 / (S-1), MS_prompt = S * sum_j
  (d_.j - d..)^2 / (J-1), MS_e (the interaction residual, (S-1)(J-1) dof) as

      (max(MS_seed, MS_e) + max(MS_prompt, MS_e) - MS_e) / (S J),

  i.e. with each variance component truncated at zero. The interval and p-value
  use Student's t with Satterthwaite's degrees of freedom for that combination of
  mean squares. With one prompt this is the paired t-test over seeds, with one
  seed the paired t-test over prompts. It is deterministic (no resampling) and,
  unlike a bootstrap over 3 seeds, does not understate the seed variance. With a
  single seed the seed variance cannot be estimated and only prompt variance is
  counted.

- `compute_to_match`: the rollouts, completion tokens and seconds an arm spent
  before its held-out accuracy first reached a target (the baseline's final mean
  accuracy). Curves are averaged over seeds at each evaluation step (the
  accuracy and the cumulative compute alike); the crossing is interpolated
  linearly between the two evaluations around it. Ratios divide by the same
  quantity for the baseline (so the baseline's ratios are 1); None where the arm
  never reaches the target.

- `compare_summary`: the whole `metrics/compare.json` dict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from pipeline_lib.comparison.dose_response import (
    UNIFORM_DOSES,
    mean_interval,
    positive_control,
    uniform_equivalent,
)

CONFIDENCE = 0.95
COMPUTE_COLUMNS = ("rollouts", "tokens", "seconds")


def accuracy_interval(
    accuracies: Sequence[float], confidence: float = CONFIDENCE
) -> tuple[float, float] | None:
    """The t-interval over seeds of a mean; None with fewer than two seeds."""
    values = np.asarray(accuracies, dtype=np.float64)
    if values.size < 2:
        return None
    mean = float(values.mean())
    half = stats.t.ppf(0.5 + confidence / 2, values.size - 1) * values.std(ddof=1)
    half /= math.sqrt(values.size)
    return mean - float(half), mean + float(half)


@dataclass(frozen=True)
class PairedDifference:
    """arm - baseline: the estimate, its interval and the two-sided p-value of 'no difference'."""

    difference: float
    ci: tuple[float, float] | None
    p_value: float | None
    standard_error: float
    dof: float


def _variance_terms(d: np.ndarray) -> list[tuple[float, float, float]]:
    """(coefficient, mean square, dof) of each term of the estimate's variance (docstring).

    Args:
        d: float[S, J] paired differences.
    """
    seeds, prompts = d.shape
    grand = d.mean()
    seed_means, prompt_means = d.mean(axis=1), d.mean(axis=0)
    scale = 1.0 / (seeds * prompts)
    if seeds == 1:  # the paired t-test over prompts
        ms_prompt = float(((prompt_means - grand) ** 2).sum()) / (prompts - 1)
        return [(scale, ms_prompt, prompts - 1)]
    ms_seed = prompts * float(((seed_means - grand) ** 2).sum()) / (seeds - 1)
    if prompts == 1:  # the paired t-test over seeds
        return [(scale, ms_seed, seeds - 1)]
    ms_prompt = seeds * float(((prompt_means - grand) ** 2).sum()) / (prompts - 1)
    residual = d - seed_means[:, None] - prompt_means[None, :] + grand
    dof_e = (seeds - 1) * (prompts - 1)
    ms_e = float((residual**2).sum()) / dof_e
    terms = [
        (scale, ms, dof)
        for ms, dof in ((ms_seed, seeds - 1), (ms_prompt, prompts - 1))
        if ms > ms_e
    ]
    if len(terms) == 2:
        return terms + [(-scale, ms_e, dof_e)]
    return terms or [(scale, ms_e, dof_e)]


def paired_difference(
    arm: np.ndarray, baseline: np.ndarray, confidence: float = CONFIDENCE
) -> PairedDifference:
    """arm - baseline over seeds and prompts, accounting for both (module docstring).

    Args:
        arm, baseline: float[S, J] final held-out reward per seed (rows, paired) and
            prompt (columns, the same prompts).
    Returns:
        PairedDifference; ci and p_value are None when S = J = 1 (no variance to estimate).
    """
    arm, baseline = np.asarray(arm, np.float64), np.asarray(baseline, np.float64)
    if arm.shape != baseline.shape or arm.ndim != 2 or arm.size == 0:
        raise ValueError(
            f"need two float[S, J] matrices of one shape, got {arm.shape}, {baseline.shape}"
        )
    d = arm - baseline
    difference = float(d.mean())
    if d.size == 1:
        return PairedDifference(difference, None, None, float("nan"), 0.0)
    terms = _variance_terms(d)
    variance = sum(c * ms for c, ms, _ in terms)
    if variance <= 0.0:  # identical differences everywhere: no doubt left
        return PairedDifference(
            difference, (difference, difference), float(difference == 0.0), 0.0, math.inf
        )
    dof = variance**2 / sum((c * ms) ** 2 / dof for c, ms, dof in terms)
    error = math.sqrt(variance)
    half = float(stats.t.ppf(0.5 + confidence / 2, dof)) * error
    p_value = float(2.0 * stats.t.sf(abs(difference) / error, dof))
    return PairedDifference(difference, (difference - half, difference + half), p_value, error, dof)


def mean_curve(curves: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """The seeds' evaluation curves averaged at each step that every seed evaluated.

    Args:
        curves: per seed, columns step, accuracy, rollouts, tokens, seconds
            (cumulative compute), one row per evaluation.
    """
    columns = ["accuracy", *COMPUTE_COLUMNS]
    table = pd.concat([c[["step", *columns]].assign(seed=i) for i, c in enumerate(curves)])
    counts = table.groupby("step")["seed"].nunique()
    shared = counts.index[counts == len(curves)]
    means = table[table["step"].isin(shared)].groupby("step")[columns].mean()
    return means.reset_index().sort_values("step", ignore_index=True)


def compute_at_accuracy(curve: pd.DataFrame, target: float) -> dict[str, float] | None:
    """Cumulative compute where `curve` first reaches `target`, interpolated; None if never."""
    accuracy = curve["accuracy"].to_numpy()
    reached = np.flatnonzero(accuracy >= target)
    if reached.size == 0:
        return None
    i = int(reached[0])
    if i == 0:
        return {name: float(curve[name].iloc[0]) for name in COMPUTE_COLUMNS}
    share = (target - accuracy[i - 1]) / (accuracy[i] - accuracy[i - 1])
    return {
        name: float(
            curve[name].iloc[i - 1] + share * (curve[name].iloc[i] - curve[name].iloc[i - 1])
        )
        for name in COMPUTE_COLUMNS
    }


def compute_to_match(
    arm_curves: Sequence[pd.DataFrame], baseline_curves: Sequence[pd.DataFrame], target: float
) -> dict[str, float | None] | None:
    """Compute the arm spent to first reach `target`, and its ratio to the baseline's.

    Returns:
        {rollouts, tokens, seconds, rollouts_ratio, tokens_ratio, seconds_ratio};
        a ratio is None where the baseline reached the target with no compute
        (at step 0). None where the arm's mean curve never reaches the target.
    """
    spent = compute_at_accuracy(mean_curve(arm_curves), target)
    if spent is None:
        return None
    reference = compute_at_accuracy(mean_curve(baseline_curves), target) or {}
    ratios = {
        f"{name}_ratio": spent[name] / reference[name] if reference.get(name) else None
        for name in COMPUTE_COLUMNS
    }
    return spent | ratios


@dataclass(frozen=True)
class ArmRuns:
    """One arm's finished runs, one per seed, in the order of `seeds`."""

    seeds: tuple[int, ...]
    prompt_scores: np.ndarray
    """float[S, J] final held-out reward per seed and prompt (mean over its samples)."""
    effective_gradient_ratios: np.ndarray
    """float[S] each run's mean effective-gradient ratio over its steps."""
    curves: tuple[pd.DataFrame, ...]
    """Per seed: step, accuracy, rollouts, tokens, seconds (`training.compute.evaluation_curve`)."""
    primary: tuple[float, ...] = ()
    """Per seed, the pre-registered primary metric (`dose_response.primary_value`)."""

    @property
    def accuracies(self) -> np.ndarray:
        """float[S] final held-out accuracy per seed."""
        return np.asarray(self.prompt_scores, np.float64).mean(axis=1)

    def totals(self, name: str) -> list[float]:
        """Per seed, the run's total of a compute column (its last evaluation's)."""
        return [float(curve[name].iloc[-1]) for curve in self.curves]


def _paired_rows(arm: ArmRuns, baseline: ArmRuns) -> tuple[np.ndarray, np.ndarray]:
    """The two score matrices restricted to the seeds both ran, aligned by seed."""
    shared = [s for s in arm.seeds if s in baseline.seeds]
    if not shared:
        raise ValueError(f"no seed in common with the baseline: {arm.seeds} vs {baseline.seeds}")
    rows = [arm.seeds.index(s) for s in shared]
    base_rows = [baseline.seeds.index(s) for s in shared]
    return np.asarray(arm.prompt_scores)[rows], np.asarray(baseline.prompt_scores)[base_rows]


def _interval(ci: tuple[float, float] | None) -> list[float] | None:
    return None if ci is None else [float(ci[0]), float(ci[1])]


def arm_summary(arm: ArmRuns, baseline: ArmRuns) -> dict:
    """One arm's entry of compare.json (`compare_summary`)."""
    accuracy = arm.accuracies
    versus = paired_difference(*_paired_rows(arm, baseline))
    per_seed = {name: arm.totals(name) for name in COMPUTE_COLUMNS}
    return {
        "seeds": [int(s) for s in arm.seeds],
        "accuracy": [float(a) for a in accuracy],
        "accuracy_mean": float(accuracy.mean()),
        "accuracy_ci": _interval(accuracy_interval(accuracy)),
        "effective_gradient_ratio": [float(r) for r in arm.effective_gradient_ratios],
        "effective_gradient_ratio_mean": float(np.mean(arm.effective_gradient_ratios)),
        "rollouts": float(np.mean(per_seed["rollouts"])),
        "tokens": float(np.mean(per_seed["tokens"])),
        "seconds": float(np.mean(per_seed["seconds"])),
        "compute_per_seed": per_seed,
        "vs_baseline": {
            "difference": versus.difference,
            "ci": _interval(versus.ci),
            "p_value": versus.p_value,
            "standard_error": versus.standard_error
            if math.isfinite(versus.standard_error)
            else None,
            "dof": versus.dof if math.isfinite(versus.dof) else None,
        },
        "compute_to_match_baseline": compute_to_match(
            arm.curves, baseline.curves, float(baseline.accuracies.mean())
        ),
    } | _primary_entry(arm)


def _primary_entry(arm: ArmRuns) -> dict:
    if not arm.primary:
        return {}
    summary = mean_interval(arm.primary)
    return {
        "primary": [float(v) for v in arm.primary],
        "primary_mean": summary["mean"],
        "primary_ci": summary["ci"],
    }


def _by_seed(runs: ArmRuns) -> dict[int, float]:
    return dict(zip(runs.seeds, runs.primary, strict=True))


def compare_summary(
    baseline: str,
    arms: Mapping[str, ArmRuns],
    primary_metric: str | None = None,
    prompt_levels: np.ndarray | None = None,
) -> dict:
    """The `metrics/compare.json` dict: per arm its accuracy over seeds with a t-interval,
    its paired difference to `baseline` and the compute it needed to match it; with a
    `primary_metric` (the arms' `primary` values), each arm's per-seed primary values,
    the positive control on the uniform arms and each arm's uniform-equivalent compute
    (`dose_response`).

    `rollouts`, `tokens` (completion tokens generated) and `seconds` (rollout + update
    + weight sync) are each run's totals averaged over the arm's seeds. With
    `prompt_levels` (int[J], the held-out prompts' difficulty levels), a secondary: each
    arm's final accuracy on the hardest level (`hardest_level_accuracy`).
    """
    if baseline not in arms:
        raise ValueError(f"baseline {baseline!r} is not among the arms {list(arms)}")
    summary = {
        "baseline": baseline,
        "confidence": CONFIDENCE,
        "methods": {
            "accuracy_ci": "t-interval over seeds of the final held-out accuracy",
            "vs_baseline": "paired by seed and prompt; crossed two-way random effects "
            "(seed, prompt) ANOVA variance with Satterthwaite t (pipeline_lib/comparison/stats.py)",
            "compute_to_match_baseline": "seed-mean evaluation curve, first crossing of the "
            "baseline's final mean accuracy, linear interpolation; ratio to the baseline's",
        },
        "arms": {name: arm_summary(runs, arms[baseline]) for name, runs in arms.items()},
    }
    if primary_metric:
        add_dose_response(summary, arms, primary_metric)
    if prompt_levels is not None:
        add_hardest_level(summary, arms, np.asarray(prompt_levels))
    return summary


def add_hardest_level(summary: dict, arms: Mapping[str, ArmRuns], levels: np.ndarray) -> None:
    """Secondary metric: final held-out accuracy on the highest level, per seed, with its
    t-interval (the prompts a method that helps hard prompts should move most)."""
    hardest = int(levels.max())
    summary["hardest_level"] = hardest
    for name, runs in arms.items():
        scores = np.asarray(runs.prompt_scores, np.float64)
        if scores.shape[1] != levels.size:
            raise ValueError(f"{levels.size} levels for {scores.shape[1]} held-out prompts")
        per_seed = scores[:, levels == hardest].mean(axis=1)
        summary["arms"][name]["hardest_level_accuracy"] = [float(v) for v in per_seed]
        summary["arms"][name]["hardest_level_accuracy_ci"] = _interval(accuracy_interval(per_seed))


def add_dose_response(summary: dict, arms: Mapping[str, ArmRuns], primary_metric: str) -> None:
    """The positive control first (uniform arms only: compare.json's `positive_control`),
    then each other arm's `uniform_equivalent` compute, into `summary`."""
    primary = {name: _by_seed(runs) for name, runs in arms.items()}
    uniform = {name: values for name, values in primary.items() if name in UNIFORM_DOSES}
    summary["primary_metric"] = primary_metric
    summary["positive_control"] = positive_control(primary)
    for name, values in primary.items():
        if name not in UNIFORM_DOSES:
            summary["arms"][name]["uniform_equivalent"] = uniform_equivalent(values, uniform)
