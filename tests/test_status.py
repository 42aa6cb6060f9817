"""Tests for pipeline_lib.status: schema, parquet round trip, estimators, incremental updates."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pandera.pandas as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_lib.status import (
    STATUS_SCHEMA,
    empty_status,
    estimate_success_rates,
    expected_tokens,
    prior_mean,
    record_visit,
)
from pipeline_lib.training.state import load_status, save_status


def status_after(visits, **kwargs):
    """Fold ``[(epoch, {prompt: (rollouts, successes)}), ...]`` through record_visit."""
    table = empty_status()
    for epoch, counts in visits:
        ids = list(counts)
        table = record_visit(
            table,
            epoch,
            ids,
            [counts[p][0] for p in ids],
            [counts[p][1] for p in ids],
            **kwargs,
        )
    return table


@pytest.fixture
def table():
    return status_after(
        [
            (0, {"a": (8, 3), "b": (4, 0), "c": (2, 2)}),
            (1, {"a": (8, 8), "d": (32, 4)}),
            (3, {"b": (6, 1), "c": (0, 0)}),
        ]
    )


def test_parquet_round_trip_preserves_the_table(table, tmp_path):
    path = save_status(table, tmp_path / "nested" / "status.parquet")
    pd.testing.assert_frame_equal(load_status(path), table)


def test_empty_table_round_trips(tmp_path):
    path = save_status(empty_status(), tmp_path / "status.parquet")
    loaded = load_status(path)
    assert len(loaded) == 0
    pd.testing.assert_frame_equal(loaded, empty_status())


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda t: t.assign(total_rollouts=-t["total_rollouts"]), "greater_than_or_equal_to"),
        (lambda t: t.assign(last_successes=t["last_rollouts"] + 1), "last_successes_le_rollouts"),
        (
            lambda t: t.assign(total_successes=t["total_rollouts"] + 1),
            "total_successes_le_rollouts",
        ),
        (lambda t: pd.concat([t, t.iloc[:1]], ignore_index=True), "duplicate"),
        (
            lambda t: t.assign(window_successes=[[n[0] + 1, *n[1:]] for n in t["window_rollouts"]]),
            "window_consistent",
        ),
        (lambda t: t.assign(extra=1), "extra"),
    ],
)
def test_schema_rejects_bad_tables_naming_the_check(table, corrupt, message):
    # pandera reports column-set problems (strict=True) as SchemaErrors, the rest as SchemaError.
    with pytest.raises((pa.errors.SchemaError, pa.errors.SchemaErrors), match=message):
        STATUS_SCHEMA.validate(corrupt(table))


def test_table_holds_counts_of_every_visit(table):
    row = table.set_index("prompt_id").loc["b"]
    assert (row["visits"], row["last_epoch"], row["last_rollouts"], row["last_successes"]) == (
        2,
        3,
        6,
        1,
    )
    assert (row["total_rollouts"], row["total_successes"]) == (10, 1)
    # "c" got 0 rollouts at epoch 3: not a visit.
    assert table.set_index("prompt_id").loc["c", "last_epoch"] == 0
    assert list(table["prompt_id"]) == ["a", "b", "c", "d"]


def test_paper_rule_pools_two_visits_of_8_into_a_window_of_16(table):
    # a: 3/8 then 8/8 -> last visit has < 16 samples -> (3 + 8) / 16.
    assert estimate_success_rates(table, ["a"])[0] == pytest.approx(11 / 16)


def test_paper_rule_uses_only_the_last_visit_when_it_has_16_or_more_samples():
    t = status_after([(0, {"p": (8, 8)}), (1, {"p": (32, 4)})])
    assert estimate_success_rates(t, ["p"])[0] == pytest.approx(4 / 32)


def test_paper_rule_takes_a_partly_included_visit_proportionally():
    # Newest 6 (1 success) + 10 of the previous 20 (20 successes -> 10).
    t = status_after([(0, {"p": (20, 20)}), (1, {"p": (6, 1)})])
    assert estimate_success_rates(t, ["p"])[0] == pytest.approx((1 + 10) / 16)
    # Fewer than 16 samples in all: the mean of what there is.
    t = status_after([(0, {"p": (4, 1)}), (2, {"p": (2, 2)})])
    assert estimate_success_rates(t, ["p"])[0] == pytest.approx(3 / 6)


def test_unseen_prompts_are_nan_under_both_methods(table):
    for method in ("paper", "beta"):
        rates = estimate_success_rates(table, ["zzz", "a"], method=method)
        assert math.isnan(rates[0]) and not math.isnan(rates[1])
    assert prior_mean(2.0, 6.0) == 0.25


def test_beta_estimate_decays_towards_recent_outcomes():
    history = [(e, {"p": (16, 16)}) for e in range(4)] + [(4, {"p": (16, 0)})]
    t = status_after(history, beta_decay=0.5)
    beta = estimate_success_rates(t, ["p"], method="beta")[0]
    cumulative = 64 / 80
    # evidence: successes 16 * (0.5 + 0.25 + 0.125 + 0.0625) = 15, failures 16
    assert beta == pytest.approx((1 + 15) / (2 + 15 + 16))
    assert beta < cumulative
    no_decay = status_after(history, beta_decay=1.0)
    assert estimate_success_rates(no_decay, ["p"], method="beta")[0] == pytest.approx(65 / 82)
    # Elapsed epochs decay evidence even between visits.
    gap = status_after([(0, {"p": (16, 16)}), (3, {"p": (16, 0)})], beta_decay=0.5)
    assert estimate_success_rates(gap, ["p"], method="beta")[0] == pytest.approx(3 / 20)


def test_record_visit_is_pure_and_rejects_bad_input(table):
    before = table.copy(deep=True)
    record_visit(table, 5, ["a", "new"], [4, 4], [1, 2])
    pd.testing.assert_frame_equal(table, before)
    with pytest.raises(ValueError, match="not after"):
        record_visit(table, 1, ["a"], [4], [1])
    with pytest.raises(ValueError, match="successes"):
        record_visit(table, 9, ["a"], [4], [5])
    with pytest.raises(ValueError, match="distinct"):
        record_visit(table, 9, ["a", "a"], [4, 4], [1, 1])


def test_failed_save_leaves_the_previous_file_intact(table, tmp_path):
    path = save_status(table, tmp_path / "status.parquet")
    before = path.read_bytes()
    invalid = table.assign(last_successes=table["last_rollouts"] + 1)
    with pytest.raises(pa.errors.SchemaError):
        save_status(invalid, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["status.parquet"]


def test_crash_while_writing_leaves_the_previous_file_intact(table, tmp_path, monkeypatch):
    path = save_status(table, tmp_path / "status.parquet")
    before = path.read_bytes()

    def write_half_then_crash(self, target, **kwargs):
        with open(target, "wb") as f:
            f.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", write_half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        save_status(table, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["status.parquet"]


# --- incremental == batch -----------------------------------------------------------


def batch_status(visits, window_size, beta_decay):
    """Oracle: recompute every column of each prompt from its full visit list at once."""
    per_prompt = {}
    for epoch, counts in visits:
        for p, (n, s) in counts.items():
            if n > 0:
                per_prompt.setdefault(p, []).append((epoch, n, s))
    rows = []
    for p, hist in sorted(per_prompt.items()):
        last_epoch, last_n, last_s = hist[-1]
        newest_first = hist[::-1]
        before = np.cumsum([0] + [n for _, n, _ in newest_first])[:-1]
        in_window = [v for v, b in zip(newest_first, before, strict=True) if b < window_size]
        weights = [beta_decay ** (last_epoch - e) for e, _, _ in hist]
        rows.append(
            {
                "prompt_id": p,
                "visits": len(hist),
                "last_epoch": last_epoch,
                "last_rollouts": last_n,
                "last_successes": last_s,
                "total_rollouts": sum(n for _, n, _ in hist),
                "total_successes": sum(s for _, _, s in hist),
                "total_tokens": 0,  # status_after passes no token counts
                "window_rollouts": [n for _, n, _ in in_window],
                "window_successes": [s for _, _, s in in_window],
                "beta_successes": sum(w * s for w, (_, _, s) in zip(weights, hist, strict=True)),
                "beta_failures": sum(
                    w * (n - s) for w, (_, n, s) in zip(weights, hist, strict=True)
                ),
                "solved_streak": trailing(newest_first, lambda n, s: s == n),
                "unsolved_streak": trailing(newest_first, lambda n, s: s == 0),
            }
        )
    return per_prompt, rows


def trailing(newest_first, holds) -> int:
    """How many of the latest visits, counted back from the newest, satisfy `holds`."""
    count = 0
    for _, n, s in newest_first:
        if not holds(n, s):
            break
        count += 1
    return count


def beta_oracle(successes, failures, alpha, beta):
    """Posterior mean, except evidence that is all failures (all successes) is p = 0 (1)."""
    if successes == 0 and failures > 0:
        return 0.0
    if failures == 0 and successes > 0:
        return 1.0
    return (alpha + successes) / (alpha + beta + successes + failures)


def paper_estimate_from_samples(hist, window_size):
    """Oracle for the paper rule: expand each visit into n samples worth s/n each."""
    _, last_n, last_s = hist[-1]
    if last_n >= window_size:
        return last_s / last_n
    samples = [s / n for _, n, s in hist for _ in range(n)]
    recent = samples[-window_size:]
    return sum(recent) / len(recent)


visit_sequences = st.lists(
    st.dictionaries(
        st.sampled_from(["p0", "p1", "p2", "p3"]),
        st.integers(0, 40).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n))),
        max_size=4,
    ),
    min_size=1,
    max_size=6,
).flatmap(
    lambda epochs: st.lists(st.integers(1, 3), min_size=len(epochs), max_size=len(epochs)).map(
        lambda gaps: list(zip(np.cumsum(gaps).tolist(), epochs, strict=True))
    )
)


@settings(max_examples=40, deadline=None)
@given(
    visits=visit_sequences,
    window_size=st.sampled_from([4, 16]),
    beta_decay=st.sampled_from([0.5, 0.9, 1.0]),
)
def test_incremental_updates_equal_batch_recomputation(visits, window_size, beta_decay):
    incremental = status_after(visits, window_size=window_size, beta_decay=beta_decay)
    per_prompt, rows = batch_status(visits, window_size, beta_decay)
    records = incremental.to_dict("records")
    assert len(records) == len(rows)
    for got, want in zip(records, rows, strict=True):
        floats = ("beta_successes", "beta_failures")
        assert {k: v for k, v in got.items() if k not in floats} == {
            k: v for k, v in want.items() if k not in floats
        }
        assert [got[k] for k in floats] == pytest.approx([want[k] for k in floats], rel=1e-12)
    ids = sorted(per_prompt)
    paper = estimate_success_rates(incremental, ids, window_size=window_size)
    expected = [paper_estimate_from_samples(per_prompt[p], window_size) for p in ids]
    np.testing.assert_allclose(paper, expected, rtol=1e-12)
    beta = estimate_success_rates(incremental, ids, method="beta", prior_alpha=2.0, prior_beta=3.0)
    expected_beta = [beta_oracle(r["beta_successes"], r["beta_failures"], 2.0, 3.0) for r in rows]
    np.testing.assert_allclose(beta, expected_beta, rtol=1e-12)


def test_tokens_accumulate_into_expected_length():
    table = empty_status()
    table = record_visit(table, 0, ["a", "b"], [4, 2], [1, 0], tokens=[40, 6])
    table = record_visit(table, 1, ["a", "b"], [4, 0], [2, 0], tokens=[8, 0])
    assert table.set_index("prompt_id")["total_tokens"].to_dict() == {"a": 48, "b": 6}
    np.testing.assert_allclose(expected_tokens(table, ["a", "b", "new"], 16.0), [6.0, 3.0, 16.0])


def test_record_visit_rejects_negative_tokens():
    with pytest.raises(ValueError, match="tokens >= 0"):
        record_visit(empty_status(), 0, ["a"], [4], [1], tokens=[-1])
