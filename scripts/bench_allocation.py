"""Benchmark the knapsack allocator against the paper's dynamic program.

Usage: .venv/bin/python scripts/bench_allocation.py
Prints wall time (best of several runs) and peak traced memory for:
  - the paper's scale: 256 prompts, budget 2048, N in [2, 128], vs an O(M * B * K) numpy DP;
  - 100,000 prompts, budget 8 per prompt, N in [2, 256].
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np

from pipeline_lib.allocation import knapsack_allocate, rollout_value


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


def main() -> None:
    rng = np.random.default_rng(0)
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


if __name__ == "__main__":
    main()
