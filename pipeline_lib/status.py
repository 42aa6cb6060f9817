"""Prompt status: per-prompt rollout history and the success-rate estimates built on it.

One row per prompt that has been visited (given at least one rollout). The table is
updated once per visit with ``record_visit`` (pure: returns a new table), saved to
and loaded from parquet, and validated by ``STATUS_SCHEMA`` on every write and read.

The caller decides what a success is (e.g. reward >= 0.5) and passes counts:
rollouts and successes per visited prompt.

Estimates (``estimate_success_rates``) are NaN for prompts never visited, under
every method, so the allocator's one rule "unseen prompts get N_avg" holds whatever
estimator is used. ``prior_mean`` gives the Beta prior's mean where a number is
wanted instead.

Two estimators, each kept up to date incrementally:

- ``paper`` (Knapsack-RL): the previous visit's success rate; if that visit had
  fewer than ``window_size`` (16) rollouts, the success rate of the prompt's last
  ``window_size`` rewards across its recent visits. Only counts are known, not the
  order of rewards inside a visit, so an older visit that only partly fits in the
  window contributes proportionally (``take * successes / rollouts``): the expected
  count for ``take`` rewards drawn from it. The table keeps the counts of the recent
  visits that overlap the window (``window_rollouts``/``window_successes``, newest
  first), enough to compute this exactly at the next visit.
- ``beta``: a Beta posterior over the success rate whose evidence decays with the
  epochs elapsed between visits: ``s <- s * decay**(epoch - last_epoch) + successes``
  (failures alike), so it tracks the current policy; mean
  ``(prior_alpha + s) / (prior_alpha + prior_beta + s + f)``. The decay is applied
  when a visit is recorded, so it is a parameter of ``record_visit``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import pandera.pandas as pa

EstimateMethod = Literal["paper", "beta"]

WINDOW_SIZE = 16  # the paper's "last 16 rewards"
BETA_DECAY = 0.5  # evidence half-life of one epoch


def _is_count_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and v >= 0 for v in value)


def _window_consistent(table: pd.DataFrame) -> pd.Series:
    """Window lists: same length, at least one visit, successes <= rollouts, rollouts >= 1."""

    def ok(rollouts: list[int], successes: list[int]) -> bool:
        return (
            len(rollouts) == len(successes) >= 1
            and all(n >= 1 for n in rollouts)
            and all(s <= n for s, n in zip(successes, rollouts, strict=True))
        )

    return pd.Series(
        [
            ok(n, s)
            for n, s in zip(table["window_rollouts"], table["window_successes"], strict=True)
        ],
        index=table.index,
        dtype=bool,
    )


STATUS_SCHEMA = pa.DataFrameSchema(
    {
        "prompt_id": pa.Column(str, unique=True),
        "visits": pa.Column("int64", pa.Check.ge(1)),
        "last_epoch": pa.Column("int64", pa.Check.ge(0)),
        "last_rollouts": pa.Column("int64", pa.Check.ge(1)),
        "last_successes": pa.Column("int64", pa.Check.ge(0)),
        "total_rollouts": pa.Column("int64", pa.Check.ge(1)),
        "total_successes": pa.Column("int64", pa.Check.ge(0)),
        "total_tokens": pa.Column("int64", pa.Check.ge(0)),
        "window_rollouts": pa.Column(
            object, pa.Check(_is_count_list, element_wise=True, name="list_of_counts")
        ),
        "window_successes": pa.Column(
            object, pa.Check(_is_count_list, element_wise=True, name="list_of_counts")
        ),
        "beta_successes": pa.Column("float64", pa.Check.ge(0.0)),
        "beta_failures": pa.Column("float64", pa.Check.ge(0.0)),
        # Consecutive latest visits whose rollouts all succeeded / all failed (GRESO's
        # skip rule reads them); at most one of the two is non-zero.
        "solved_streak": pa.Column("int64", pa.Check.ge(0)),
        "unsolved_streak": pa.Column("int64", pa.Check.ge(0)),
    },
    checks=[
        pa.Check(
            lambda t: t["last_successes"] <= t["last_rollouts"], name="last_successes_le_rollouts"
        ),
        pa.Check(
            lambda t: t["total_successes"] <= t["total_rollouts"],
            name="total_successes_le_rollouts",
        ),
        pa.Check(lambda t: t["visits"] <= t["total_rollouts"], name="visits_le_total_rollouts"),
        pa.Check(_window_consistent, name="window_consistent"),
    ],
    strict=True,
    ordered=True,
    name="prompt_status",
)

_COLUMNS = list(STATUS_SCHEMA.columns)
# Integer columns a prompt's first visit starts from 0.
_COUNT_COLUMNS = ("visits", "total_rollouts", "total_successes", "total_tokens")
_COUNT_COLUMNS += ("solved_streak", "unsolved_streak")


def empty_status() -> pd.DataFrame:
    """A valid status table with no prompts."""
    dtypes = {name: col.dtype.type for name, col in STATUS_SCHEMA.columns.items()}
    table = pd.DataFrame({name: pd.Series(dtype=dtype) for name, dtype in dtypes.items()})
    return STATUS_SCHEMA.validate(table)


def record_visit(
    status: pd.DataFrame,
    epoch: int,
    prompt_ids: Sequence[str],
    rollouts: Sequence[int] | np.ndarray,
    successes: Sequence[int] | np.ndarray,
    *,
    tokens: Sequence[int] | np.ndarray | None = None,
    window_size: int = WINDOW_SIZE,
    beta_decay: float = BETA_DECAY,
) -> pd.DataFrame:
    """Return a new status table with one visit per prompt recorded at ``epoch``.

    Args:
        status: the current table (not modified).
        epoch: the epoch of this visit; must be later than each prompt's last visit.
        prompt_ids: [M] distinct prompt ids.
        rollouts: [M] rollouts per prompt; prompts with 0 rollouts were not visited
            and are left as they were.
        successes: [M] successful rollouts per prompt, 0 <= successes <= rollouts.
        tokens: [M] completion tokens generated per prompt (None: not counted, 0).
        window_size: how many recent rewards the table keeps visits for (the paper's 16).
        beta_decay: factor in (0, 1] applied to the Beta evidence per elapsed epoch.

    Returns:
        The updated table, sorted by prompt id.
    """
    ids = [str(p) for p in prompt_ids]
    n = np.asarray(rollouts, dtype=np.int64).reshape(-1)
    s = np.asarray(successes, dtype=np.int64).reshape(-1)
    t = np.zeros_like(n) if tokens is None else np.asarray(tokens, dtype=np.int64).reshape(-1)
    if not (len(ids) == len(n) == len(s)):
        raise ValueError(f"lengths differ: {len(ids)} ids, {len(n)} rollouts, {len(s)} successes")
    if len(set(ids)) != len(ids):
        raise ValueError("prompt_ids must be distinct within one visit")
    if (n < 0).any() or (s < 0).any() or (s > n).any() or t.shape != n.shape or (t < 0).any():
        raise ValueError("need 0 <= successes <= rollouts and tokens >= 0, one per prompt")
    if epoch < 0 or window_size < 1 or not 0.0 < beta_decay <= 1.0:
        raise ValueError("need epoch >= 0, window_size >= 1 and 0 < beta_decay <= 1")

    visited = n > 0
    ids = [p for p, v in zip(ids, visited, strict=True) if v]
    n, s, t = n[visited], s[visited], t[visited]
    table = status.set_index("prompt_id", drop=False)
    previous = table.reindex(ids)
    seen = previous["visits"].notna().to_numpy()
    stale = seen & (previous["last_epoch"].to_numpy(dtype=float) >= epoch)
    if stale.any():
        late = [p for p, bad in zip(ids, stale, strict=True) if bad]
        raise ValueError(f"epoch {epoch} is not after the last visit of prompts {late[:5]}")

    # Unseen prompts have no evidence to decay (their NaNs become 0 below).
    elapsed = np.where(seen, epoch - previous["last_epoch"].to_numpy(dtype=float), 0.0)
    keep = beta_decay**elapsed
    old = previous.fillna(
        {c: 0 for c in _COUNT_COLUMNS} | {"beta_successes": 0.0, "beta_failures": 0.0}
    )
    windows = [
        _push_window(
            old_n if isinstance(old_n, list) else [],
            old_s if isinstance(old_s, list) else [],
            int(new_n),
            int(new_s),
            window_size,
        )
        for old_n, old_s, new_n, new_s in zip(
            previous["window_rollouts"], previous["window_successes"], n, s, strict=True
        )
    ]
    updated = pd.DataFrame(
        {
            "prompt_id": pd.Series(ids, dtype="str"),
            "visits": old["visits"].to_numpy(dtype=np.int64) + 1,
            "last_epoch": np.full(len(ids), epoch, dtype=np.int64),
            "last_rollouts": n,
            "last_successes": s,
            "total_rollouts": old["total_rollouts"].to_numpy(dtype=np.int64) + n,
            "total_successes": old["total_successes"].to_numpy(dtype=np.int64) + s,
            "total_tokens": old["total_tokens"].to_numpy(dtype=np.int64) + t,
            "window_rollouts": pd.Series([w[0] for w in windows], dtype=object),
            "window_successes": pd.Series([w[1] for w in windows], dtype=object),
            "beta_successes": old["beta_successes"].to_numpy(dtype=float) * keep + s,
            "beta_failures": old["beta_failures"].to_numpy(dtype=float) * keep + (n - s),
            "solved_streak": np.where(s == n, old["solved_streak"].to_numpy(np.int64) + 1, 0),
            "unsolved_streak": np.where(s == 0, old["unsolved_streak"].to_numpy(np.int64) + 1, 0),
        }
    )
    untouched = status[~status["prompt_id"].isin(ids)]
    parts = [t for t in (untouched, updated) if len(t)]
    merged = pd.concat(parts, ignore_index=True) if parts else empty_status()
    merged = merged.sort_values("prompt_id", ignore_index=True)[_COLUMNS]
    return STATUS_SCHEMA.validate(merged)


def _push_window(
    rollouts: list[int], successes: list[int], new_rollouts: int, new_successes: int, size: int
) -> tuple[list[int], list[int]]:
    """Prepend a visit; drop the older visits that lie wholly outside the last ``size`` rewards."""
    rollouts = [new_rollouts, *rollouts]
    successes = [new_successes, *successes]
    covered, keep = 0, 0
    while keep < len(rollouts) and covered < size:
        covered += rollouts[keep]
        keep += 1
    return rollouts[:keep], successes[:keep]


def _window_rate(rollouts: list[int], successes: list[int], size: int) -> float:
    """Success rate of the newest ``size`` rewards; a partly included visit counts pro rata."""
    taken, hits = 0, 0.0
    for n, s in zip(rollouts, successes, strict=True):
        take = min(n, size - taken)
        hits += s * take / n
        taken += take
        if taken >= size:
            break
    return hits / taken


def prior_mean(prior_alpha: float = 1.0, prior_beta: float = 1.0) -> float:
    """Mean of the Beta prior: the ``beta`` estimate for a prompt with no evidence."""
    return prior_alpha / (prior_alpha + prior_beta)


def estimate_success_rates(
    status: pd.DataFrame,
    prompt_ids: Sequence[str],
    method: EstimateMethod = "paper",
    *,
    window_size: int = WINDOW_SIZE,
    prior_alpha: float = 1.0,
    prior_beta: float = 1.0,
) -> np.ndarray:
    """Estimated success rate per prompt, NaN for prompts never visited.

    Args:
        status: a status table.
        prompt_ids: [M] prompts to estimate, in the order wanted.
        method: ``paper`` (uses ``window_size``, at most the one the table was
            recorded with) or ``beta`` (uses ``prior_alpha``, ``prior_beta``).

    Returns:
        float64 array [M] in [0, 1], NaN where the prompt is not in ``status``.
        Under ``beta``, a prompt whose remembered evidence is all failures is 0 and
        all successes is 1 (see below); the others get the posterior mean.
    """
    rows = status.set_index("prompt_id").reindex([str(p) for p in prompt_ids])
    seen = rows["visits"].notna().to_numpy()
    rates = np.full(len(rows), np.nan)
    if method == "paper":
        last_n = rows["last_rollouts"].to_numpy(dtype=float)
        last_s = rows["last_successes"].to_numpy(dtype=float)
        use_last = seen & (last_n >= window_size)
        rates[use_last] = last_s[use_last] / last_n[use_last]
        window_n, window_s = rows["window_rollouts"].to_list(), rows["window_successes"].to_list()
        for i in np.flatnonzero(seen & ~use_last):
            rates[i] = _window_rate(window_n[i], window_s[i], window_size)
    elif method == "beta":
        successes = rows["beta_successes"].to_numpy(dtype=float)
        failures = rows["beta_failures"].to_numpy(dtype=float)
        a, b = prior_alpha + successes, prior_beta + failures
        rates[seen] = (a / (a + b))[seen]
        # The posterior mean is never exactly 0 or 1, yet the allocation's "unsolved"
        # and "solved" classes must not stay empty: evidence that is all one way
        # (every remembered reward a failure, or every one a success) counts as p = 0
        # or p = 1, the paper's meaning of those classes.
        rates[seen & (successes == 0) & (failures > 0)] = 0.0
        rates[seen & (failures == 0) & (successes > 0)] = 1.0
    else:
        raise ValueError(f"unknown estimate method: {method!r}")
    return rates


def reward_counts(status: pd.DataFrame, prompt_ids: Sequence[str]) -> np.ndarray:
    """Rewards recorded per prompt, int64[M] (0 for prompts never visited)."""
    rows = status.set_index("prompt_id").reindex([str(p) for p in prompt_ids])
    return rows["total_rollouts"].fillna(0).to_numpy(dtype=np.int64)


def visit_streaks(status: pd.DataFrame, prompt_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(solved, unsolved) int64[M]: each prompt's run of latest all-success and all-failure
    visits (0 for prompts never visited)."""
    rows = status.set_index("prompt_id").reindex([str(p) for p in prompt_ids])
    return tuple(
        rows[column].fillna(0).to_numpy(dtype=np.int64)
        for column in ("solved_streak", "unsolved_streak")
    )


def expected_tokens(status: pd.DataFrame, prompt_ids: Sequence[str], default: float) -> np.ndarray:
    """Mean completion tokens per rollout of each prompt, float[M]; `default` if unseen."""
    rows = status.set_index("prompt_id").reindex([str(p) for p in prompt_ids])
    total = rows["total_tokens"].to_numpy(dtype=float)
    rollouts = rows["total_rollouts"].to_numpy(dtype=float)
    known = (rollouts > 0) & (total > 0)
    return np.where(known, total / np.where(known, rollouts, 1.0), float(default))
