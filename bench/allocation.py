"""Benchmark the knapsack allocator, and compare the exact and official rules.

Usage: .venv/bin/python -m bench.allocation [--steps 200] [--seed 0]
Prints wall time (best of several runs) and peak traced memory for:
  - the paper's scale: 256 prompts, budget 2048, N in [2, 128], vs an O(M * B * K) numpy DP;
  - 100,000 prompts, budget 8 per prompt, N in [2, 256];
  - min_rollouts = 0 (the non-concave start), 512 and 100,000 prompts;
  - the whole policy, rules="exact" vs rules="official": 512 prompts, budget 8 * 512,
    N in [2, 128], rates k/8 with some unseen prompts;
and, per step of a simulated run at the embedded default's scale (64 prompts,
budget 512, rates k/8 from a mix of difficulty levels), how the two rule sets differ.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from pipeline_lib.allocation import allocate_rollouts, knapsack_allocate, rollout_value

# Held-out accuracy by level of the embedded default's SFT policy (DESIGN.md).
LEVEL_ACCURACY = np.array([0.74, 0.83, 0.40, 0.30, 0.13, 0.13])


def dp_allocate(p: np.ndarray, budget: int, low: int, high: int) -> float:
    """The paper's DP, vectorised over the budget axis: O(M * B * K) work. Returns the optimum."""
    best = np.full(budget + 1, -np.inf)
    best[0] = 0.0
    counts = np.arange(low, high + 1)
    for p_i in p:
        values = rollout_value(counts, np.full(counts.size, p_i))
        nxt = np.full(budget + 1, -np.inf)
        for n, v in zip(counts, values, strict=True):
            nxt[n:] = np.maximum(nxt[n:], best[: budget + 1 - n] + v)
        best = nxt
    return float(best[: budget + 1].max())


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def peak_memory_mb(fn) -> float:
    tracemalloc.start()
    fn()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak / 2**20


def observed_rates(rng: np.random.Generator, num_prompts: int, samples: int = 8) -> np.ndarray:
    """Rates k/samples as a status table would see them: a level's accuracy, jittered, sampled."""
    level = rng.integers(0, LEVEL_ACCURACY.size, num_prompts)
    true_rate = np.clip(LEVEL_ACCURACY[level] + rng.normal(0.0, 0.15, num_prompts), 0.0, 1.0)
    return rng.binomial(samples, true_rate) / samples


def time_solvers(rng: np.random.Generator) -> None:
    p = rng.uniform(0, 1, 256)
    p[:32] = 0.0
    p[32:48] = 1.0
    ours = knapsack_allocate(p, 2048, 2, 128)
    dp_value = dp_allocate(p, 2048, 2, 128)
    assert abs(rollout_value(ours, p).sum() - dp_value) < 1e-9, "knapsack is not optimal"
    t_ours = best_time(lambda: knapsack_allocate(p, 2048, 2, 128), 20)
    t_dp = best_time(lambda: dp_allocate(p, 2048, 2, 128), 3)
    print("paper scale: 256 prompts, budget 2048, N in [2, 128]")
    print(f"  knapsack_allocate  {t_ours * 1e3:9.2f} ms")
    print(f"  numpy DP           {t_dp * 1e3:9.2f} ms   (same optimum)")
    print(f"  speed-up           {t_dp / t_ours:9.0f} x")

    big = rng.uniform(0, 1, 100_000)
    big[:10_000] = 0.0
    t_big = best_time(lambda: knapsack_allocate(big, 8 * big.size, 2, 256), 3)
    mem_big = peak_memory_mb(lambda: knapsack_allocate(big, 8 * big.size, 2, 256))
    print("large: 100,000 prompts, budget 800,000, N in [2, 256]")
    print(f"  knapsack_allocate  {t_big * 1e3:9.2f} ms, peak traced memory {mem_big:.1f} MB")

    print("min_rollouts = 0 (first rollout worth nothing), odd budgets")
    small = observed_rates(rng, 512)
    t_small = best_time(lambda: knapsack_allocate(small, 8 * 512 + 1, 0, 128), 10)
    print(f"  512 prompts, N in [0, 128]       {t_small * 1e3:9.2f} ms")
    # Adversarial for the exact repair: 50,000 interchangeable prompts start their
    # pairs after another 50,000 are full, and one unit is left over.
    tied = np.r_[np.full(50_000, 0.5), np.full(50_000, 0.25)]
    t_tied = best_time(lambda: knapsack_allocate(tied, 150_001, 0, 256), 1)
    print(f"  100,000 prompts, tie + odd unit  {t_tied * 1e3:9.2f} ms")


def time_rules(rng: np.random.Generator) -> None:
    p = observed_rates(rng, 512)
    p[rng.uniform(size=p.size) < 0.1] = np.nan
    print("whole policy: 512 prompts, budget 4096, N in [2, 128], rates k/8, 10 % unseen")
    for rules in ("exact", "official"):
        for confidence in (0.9, None):

            def run(rules=rules, confidence=confidence):
                return allocate_rollouts(
                    p, 4096, rules=rules, max_rollouts=128, fallback_confidence=confidence
                )

            result = run()
            label = f"rules={rules!r}, fallback {'on' if confidence else 'off'}"
            print(
                f"  {label:<34} {best_time(run, 20) * 1e3:7.2f} ms   "
                f"(optimiser budget {result.knapsack_budget}, fallback moved "
                f"{result.fallback_rollouts})"
            )


def compare_rules(
    rng: np.random.Generator, steps: int, unseen_share: float, confidence: float | None
) -> None:
    """Per step: rollouts that differ between the rules, what each fallback moves, value."""
    differ, moved_exact, moved_official, to_valued_exact, to_valued_official = [], [], [], [], []
    value_ratio, signal_exact, signal_official = [], [], []
    for _ in range(steps):
        p = observed_rates(rng, 64)
        p[rng.uniform(size=p.size) < unseen_share] = np.nan
        exact, official = (
            allocate_rollouts(p, 512, rules=rules, max_rollouts=128, fallback_confidence=confidence)
            for rules in ("exact", "official")
        )
        differ.append(int(np.abs(exact.rollouts - official.rollouts).sum()) // 2)
        moved_exact.append(exact.fallback_rollouts)
        moved_official.append(official.fallback_rollouts)
        valued = (p > 0) & (p < 1)
        to_valued_exact.append(int(exact.rollouts[valued].sum()))
        to_valued_official.append(int(official.rollouts[valued].sum()))
        v_exact = rollout_value(exact.rollouts[valued], p[valued]).sum()
        v_official = rollout_value(official.rollouts[valued], p[valued]).sum()
        value_ratio.append(v_official / v_exact if v_exact > 0 else 1.0)
        # Expected rollouts in groups with both outcomes, if p were the true rate.
        both = 1.0 - p[valued] ** exact.rollouts[valued] - (1 - p[valued]) ** exact.rollouts[valued]
        signal_exact.append(float((both * exact.rollouts[valued]).sum()))
        q = p[valued]
        both = 1.0 - q ** official.rollouts[valued] - (1 - q) ** official.rollouts[valued]
        signal_official.append(float((both * official.rollouts[valued]).sum()))

    def summary(values) -> str:
        a = np.asarray(values, dtype=float)
        return (
            f"mean {a.mean():7.1f}  median {np.median(a):6.1f}  "
            f"min {a.min():6.1f}  max {a.max():6.1f}"
        )

    print(
        f"exact vs official, {steps} steps of 64 prompts, budget 512, N in [2, 128], "
        f"fallback {'alpha ' + str(confidence) if confidence else 'off'}, {unseen_share:.0%} unseen"
    )
    print(f"  rollouts that differ per step        {summary(differ)}")
    print(f"  fallback moved, exact                {summary(moved_exact)}")
    print(f"  fallback moved, official             {summary(moved_official)}")
    print(f"  rollouts on 0 < p < 1, exact         {summary(to_valued_exact)}")
    print(f"  rollouts on 0 < p < 1, official      {summary(to_valued_official)}")
    print(
        f"  true objective, official / exact     mean {np.mean(value_ratio):.4f}  "
        f"min {np.min(value_ratio):.4f}"
    )
    print(f"  E[rollouts with signal], exact       {summary(signal_exact)}")
    print(f"  E[rollouts with signal], official    {summary(signal_official)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="simulated steps for the comparison")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    time_solvers(rng)
    time_rules(rng)
    compare_rules(rng, args.steps, unseen_share=0.0, confidence=0.9)
    compare_rules(rng, args.steps, unseen_share=0.1, confidence=0.9)
    compare_rules(rng, args.steps, unseen_share=0.0, confidence=None)


if __name__ == "__main__":
    main()
