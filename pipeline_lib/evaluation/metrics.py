"""Benchmark metrics from sampled completions: avg@k, unbiased pass@k, accuracy with a CI."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["avg_at_k", "pass_at_k", "summarize_benchmark"]

_Z_95 = 1.959963984540054  # two-sided 95 % quantile of the standard normal


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples is correct) from n samples, c correct.

    Chen et al. 2021: 1 - C(n-c, k) / C(n, k), computed as the product
    prod_{i=n-c+1}^{n} (1 - k/i), which neither overflows nor loses precision for large n.
    """
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"need 0 <= num_correct <= num_samples, got {num_correct}, {num_samples}")
    if not 1 <= k <= num_samples:
        raise ValueError(f"need 1 <= k <= num_samples, got k={k}, num_samples={num_samples}")
    if num_samples - num_correct < k:  # every k-subset holds a correct sample
        return 1.0
    failure = math.prod(1.0 - k / i for i in range(num_samples - num_correct + 1, num_samples + 1))
    return 1.0 - failure


def avg_at_k(rewards: Sequence[float] | np.ndarray) -> float:
    """Mean reward of k samples (of one prompt, or of a [prompts, k] table)."""
    values = np.asarray(rewards, dtype=float)
    if values.size == 0:
        raise ValueError("avg@k of no samples")
    return float(values.mean())


def summarize_benchmark(
    num_samples: Sequence[int] | np.ndarray,
    num_correct: Sequence[int] | np.ndarray,
    ks: Sequence[int] = (1,),
) -> dict[str, float]:
    """Benchmark metrics from per-prompt sample and success counts (both shape [prompts]).

    Returns metric-name-ready keys:
    - "accuracy": mean over prompts of c/n (avg@n; prompts weigh equally whatever their n);
    - "accuracy_ci_low", "accuracy_ci_high": a 95 % normal-approximation interval over
      prompts, mean +- 1.96 * sd(c/n) / sqrt(prompts), clipped to [0, 1]. The prompt is the
      unit of resampling, so the spread between prompts is counted, not only the sampling
      noise within one. NaN with fewer than two prompts;
    - "pass@k" for each k in `ks`: the mean over prompts of the unbiased estimator;
    - "num_prompts".
    """
    samples = np.asarray(num_samples, dtype=int)
    correct = np.asarray(num_correct, dtype=int)
    if samples.ndim != 1 or samples.shape != correct.shape or samples.size == 0:
        raise ValueError(
            f"need two equal, non-empty 1-D tables, got shapes {samples.shape}, {correct.shape}"
        )
    if (samples < 1).any() or (correct < 0).any() or (correct > samples).any():
        raise ValueError("need num_samples >= 1 and 0 <= num_correct <= num_samples per prompt")
    for k in ks:
        if not 1 <= k <= samples.min():
            raise ValueError(f"pass@{k} needs k in [1, {samples.min()}] (the fewest samples)")

    accuracy_per_prompt = correct / samples
    accuracy = avg_at_k(accuracy_per_prompt)
    num_prompts = samples.size
    if num_prompts >= 2:
        half_width = _Z_95 * accuracy_per_prompt.std(ddof=1) / math.sqrt(num_prompts)
        ci_low, ci_high = max(0.0, accuracy - half_width), min(1.0, accuracy + half_width)
    else:
        ci_low = ci_high = math.nan

    metrics = {
        "accuracy": accuracy,
        "accuracy_ci_low": float(ci_low),
        "accuracy_ci_high": float(ci_high),
        "num_prompts": float(num_prompts),
    }
    for k in ks:
        metrics[f"pass@{k}"] = float(
            np.mean([pass_at_k(int(n), int(c), k) for n, c in zip(samples, correct, strict=True)])
        )
    return metrics
