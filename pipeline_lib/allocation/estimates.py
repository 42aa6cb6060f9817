"""Per-prompt cost estimates and the official validity rule for success-rate estimates."""

from __future__ import annotations

import numpy as np

from pipeline_lib.allocation.value import CostEstimate

# The official code's validity rule: an estimate needs at least this many rewards.
MIN_BUFFER_LENGTH = 8


def rollouts_for_confidence(success_rates: np.ndarray, confidence: float = 0.9) -> np.ndarray:
    """Rollouts needed to see the minority outcome with probability `confidence`.

    The paper's cost estimate log(1 - alpha) / log(max(p, 1 - p)), for 0 < p < 1.
    """
    p = np.asarray(success_rates, dtype=np.float64)
    return np.log(1.0 - confidence) / np.log(np.maximum(p, 1.0 - p))


def estimated_rollouts(
    success_rates: np.ndarray,
    confidence: float = 0.9,
    cost_estimate: CostEstimate = "confidence",
) -> np.ndarray:
    """The official code's cost estimate per prompt, 0 < p < 1, as a float (not rounded).

    "confidence" (the official "probability"): `rollouts_for_confidence`, +inf where
    max(p, 1 - p) rounds to 1; "expectation": 1 / (p (1 - p)) - 1.
    """
    p = np.asarray(success_rates, dtype=np.float64)
    if cost_estimate == "expectation":
        with np.errstate(divide="ignore", over="ignore"):
            return 1.0 / (p * (1.0 - p)) - 1.0
    if cost_estimate != "confidence":
        raise ValueError(
            f"unknown cost_estimate {cost_estimate!r}: use 'confidence' or 'expectation'"
        )
    with np.errstate(divide="ignore"):
        cost = rollouts_for_confidence(p, confidence)
    return np.where(np.maximum(p, 1.0 - p) == 1.0, np.inf, cost)


def invalidate_short_histories(
    success_rates: np.ndarray,
    num_rewards: np.ndarray,
    min_buffer_length: int = MIN_BUFFER_LENGTH,
) -> np.ndarray:
    """NaN where an estimate rests on fewer than `min_buffer_length` rewards (official validity).

    Args:
        success_rates: float[M], NaN for unseen prompts.
        num_rewards: int[M], rewards behind each estimate (0 for unseen).
    Returns:
        float[M], the rates with invalid ones set to NaN (allocated N_avg).
    """
    p = np.asarray(success_rates, dtype=np.float64)
    counts = np.asarray(num_rewards)
    if counts.shape != p.shape:
        raise ValueError(f"num_rewards shape {counts.shape} != success_rates shape {p.shape}")
    return np.where(counts >= min_buffer_length, p, np.nan)


def _fallback_need(
    p: np.ndarray, confidence: float, cost_estimate: CostEstimate, low: int, high: int
) -> int:
    """Rollouts the valued prompts need in all: each one's estimate, rounded up, in [low, high]."""
    if cost_estimate == "confidence":  # -inf, so N_low, where p rounds to 0 or 1
        cost = rollouts_for_confidence(p, confidence)
    else:
        cost = estimated_rollouts(p, confidence, cost_estimate)
    return int(np.clip(np.ceil(cost), low, high).sum())
