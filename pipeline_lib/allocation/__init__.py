"""Rollout-budget allocation: the Knapsack-RL optimiser and the paper's policy on top of it.

A prompt with success rate p given N rollouts is worth

    V(N, p) = (1 - p^N - (1-p)^N) * p * (1-p)^2      (N >= 1),   V(0, p) = 0

(probability that its GRPO group holds both outcomes, times the expected gain in
success probability; V(0) = V(1) = 0). From N = 1 on V is concave: the marginal gain

    dV(N, p) = V(N+1, p) - V(N, p) = p (1-p)^2 * (p^N (1-p) + (1-p)^N p)     (N >= 1)

never grows with N. So with min_rollouts >= 1, taking the largest marginal gains
first is exactly optimal and the paper's O(M * B * N_up) dynamic program is not
needed. We find the threshold gain by bisection instead of sorting all
M * (N_up - N_low) increments, which keeps memory O(M) (100,000 prompts with
N_up = 256 in well under a second).

min_rollouts = 0 breaks concavity at the start: the first rollout is worth 0
(the closed form above would say -p(1-p)^2 at N = 0, which made it look
valuable), the second dV(1) = 2 dV(2). `_optimum_from_zero` solves that case
exactly: V's concave envelope has slope dV(2) on [0, 3] and equals V everywhere
except at N = 1, so the greedy optimum of the envelope is optimal whenever no
prompt ends at exactly one rollout; singletons are first paired or swapped
against increments of equal gain, and if one remains, a dynamic program over the
few prompts that can differ from the greedy (a Lagrangian loss bound, see
`_pruned_dp`) finishes exactly (to float resolution).

Two rule sets for the whole policy (`allocate_rollouts(..., rules=...)`):

- `exact` (default): the optimum of the true objective above, plus this project's
  fallback. It maximises what the paper says it maximises, so it is the default.
- `official`: the rules of the paper's released code (`sampling_budget_by_knapsack`
  in its verl fork), reproduced to the integer, for comparison with the paper's runs:

  1. Floors. Effective prompt (0 < p < 1): N_low (`min_rollouts`). p = 0:
     `negative_rollouts`; p = 1: `positive_rollouts` (both default N_low).
     NaN (unseen, or fewer than `min_buffer_length` rewards, see
     `invalidate_short_histories`): N_avg (`unseen_rollouts`). R = budget - sum of
     floors; R < 0 raises (the official code fails an assertion).
  2. "Zero" prompts are p = 0 and NaN prompts: the official code records an
     invalid prompt's success rate as 0.
  3. No effective prompt and R > 0: R is split evenly over the zero prompts,
     base R // z each and one more to the first R % z in index order, no cap;
     with no zero prompt, every prompt gets N_avg (here: the budget split evenly,
     which is N_avg each whenever budget = M * N_avg, the only case the official
     code accepts).
  4. Fallback (when `fallback_confidence` is not None; the official
     `allow_fallback`). need = sum over effective prompts of
     floor(min(N_up, cost(p))), cost = log(1 - alpha) / log(max(p, 1 - p))
     (`cost_estimate="confidence"`, alpha = `fallback_confidence`) or
     1 / (p (1 - p)) - 1 (`"expectation"`); no lower clip and N_low is not added.
     If need < R, the surplus R - need is split evenly over the zero prompts (or,
     with none, over every non-effective prompt): base + one more to the first in
     index order, no N_up cap; the optimiser then gets need. (With every prompt
     effective the official code divides by zero; here the fallback is skipped.)
  5. Optimiser, with B_opt = need after a fallback, else R: effective prompt i
     gets k_i extra rollouts, 0 <= k_i <= N_up - N_low,
     sum k_i = min(B_opt, n_eff * (N_up - N_low)), maximising
     sum_i f_i(k_i) with f_i(0) = 0 and f_i(k) = V(N_low + k, p_i) for k >= 1.
     This is not the true objective: k = 0 is worth 0 rather than V(N_low), so
     the first extra rollout is worth V(N_low + 1) instead of dV(N_low) (at
     least twice the second's worth), and the DP spreads extra rollouts over
     more prompts than the true optimum does. f is still concave for
     N_low >= 1 (f(1) = V(N_low + 1) = sum_{j=1..N_low} dV(j) >= dV(N_low + 1)),
     so the greedy with that first gain is exact; for N_low = 0, f = V and
     `_optimum_from_zero` applies. Ties between equal-valued optima may be broken
     differently from the official DP; the objective is the same.
  6. Budget the optimiser cannot place (B_opt above n_eff * (N_up - N_low)) is
     split evenly over the effective prompts: base + one more to the first in
     index order, no cap.

  The official code stores rates and costs in float32; here they stay float64,
  which can only matter for a rate within float32 rounding of 0 or 1 or a cost
  within float32 rounding below an integer.

How `exact` differs: the optimiser values every prompt by V(N) (so the first
extra rollout of a prompt is worth dV(N_low), not V(N_low + 1)); the fallback's
need is ceil(cost) clipped to [N_low, N_up] per prompt and compared with the
whole budget the valued prompts are offered (floors included); its surplus is
water-filled (lowest first, capped at N_up) over p = 0 prompts, then p = 1, then
valued prompts, then unseen ones; unseen prompts are never counted as p = 0.
`python -m bench.allocation` measures how far apart the two land per step.
"""

from pipeline_lib.allocation.estimates import (
    MIN_BUFFER_LENGTH,
    estimated_rollouts,
    invalidate_short_histories,
    rollouts_for_confidence,
)
from pipeline_lib.allocation.official import official_extra_rollouts
from pipeline_lib.allocation.rules import allocate_rollouts, allocate_rollouts_by_tokens
from pipeline_lib.allocation.solver import knapsack_allocate, knapsack_allocate_tokens
from pipeline_lib.allocation.value import (
    AllocationResult,
    AllocationRules,
    AllocationStrategy,
    CostEstimate,
    RolloutValue,
    marginal_gain,
    rollout_value,
    uniform_allocate,
)

__all__ = [
    "MIN_BUFFER_LENGTH",
    "AllocationResult",
    "AllocationRules",
    "AllocationStrategy",
    "CostEstimate",
    "RolloutValue",
    "allocate_rollouts",
    "allocate_rollouts_by_tokens",
    "estimated_rollouts",
    "invalidate_short_histories",
    "knapsack_allocate",
    "knapsack_allocate_tokens",
    "marginal_gain",
    "official_extra_rollouts",
    "rollout_value",
    "rollouts_for_confidence",
    "uniform_allocate",
]
