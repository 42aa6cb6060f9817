"""`make results`: the pipeline's answer in the terminal, from the committed metrics files.

    python -m ops.results              # against the committed reference (HEAD)
    python -m ops.results --rev main   # against another git revision

Prints three things:
1. the headline table (metrics/summary.json): accuracy with 95 % interval per policy,
   effective-gradient ratio, and seconds per step (metrics/timing.json);
2. `dvc exp show` cut to the columns that matter (the settings that change the answer
   and the headline metrics), one column per experiment, transposed to stay narrow;
3. `dvc metrics diff` of summary.json against the reference revision (DVC's other metrics
   file, eval.json, holds the details: per-level accuracy, pass@k; each number has one
   name, and train.json is a plain output whose numbers are in summary.json).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
from pathlib import Path

from pipeline_lib.evaluation.headline import headline_columns, headline_rows, text_table

SUMMARY = Path("metrics/summary.json")
TIMING = Path("metrics/timing.json")
# `dvc exp show --keep` matches column names from their start (re.match).
KEEP_COLUMNS = (
    r"Experiment$|rev$|Created$|seed$|train\.steps$|train\.strategies$|train\.prompts_per_step$"
    r"|train\.rollouts_per_prompt$|prepare\.synthetic\.train_prompts$|bootstrap\.model$"
    r"|start_accuracy$|\w+_accuracy(_ci_low|_ci_high)?$|\w+_effective_gradient_ratio$"
    r"|effective_gradient_ratio_gain$|\w+_step_seconds$"
)
DIFF_TARGETS = ("metrics/summary.json",)


def dvc(*args: str) -> str:
    env = os.environ | {"DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(["dvc", *args], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed:\n{result.stderr.strip()}")
    return result.stdout


def strategies_of(summary: dict[str, float]) -> list[str]:
    return sorted(
        k.removesuffix("_accuracy")
        for k in summary
        if k.endswith("_accuracy") and k != "start_accuracy"
    )


def experiments_table() -> str:
    """`dvc exp show` with the kept columns, transposed: one row per column, one column per
    experiment (the workspace, the commit, and any DVC experiments)."""
    rows = list(
        csv.reader(io.StringIO(dvc("exp", "show", "--csv", "--drop", ".*", "--keep", KEEP_COLUMNS)))
    )
    header, body = rows[0], [r for r in rows[1:] if any(r)]
    column = {name: i for i, name in enumerate(header)}
    names = [r[column["Experiment"]] or r[column["rev"]] for r in body]
    keep = [
        i
        for i, name in enumerate(header)
        if name not in ("Experiment", "rev", "typ", "parent", "State", "Executor")
    ]
    out = [[header[i], *(_short(r[i]) for r in body)] for i in keep]
    return text_table(out, ["", *names])


def _short(cell: str) -> str:
    try:
        return f"{float(cell):.4g}"
    except ValueError:
        return cell


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="HEAD", help="reference revision for the metrics diff")
    args = parser.parse_args(argv)
    if not SUMMARY.exists():
        raise SystemExit(f"{SUMMARY} is missing: run the pipeline first (`make run`)")
    summary = json.loads(SUMMARY.read_text())
    strategies = strategies_of(summary)
    timed = summary | (json.loads(TIMING.read_text()) if TIMING.exists() else {})
    print("Held-out results (metrics/summary.json, step times from metrics/timing.json)\n")
    print(text_table(headline_rows(timed, strategies), headline_columns(timed)))
    gain = summary.get("effective_gradient_ratio_gain")
    if gain is not None:
        print(f"\neffective-gradient ratio, knapsack / uniform: {gain:.2f}x")
    print("\nExperiments (dvc exp show, curated columns)\n")
    print(experiments_table())
    targets = " ".join(DIFF_TARGETS)
    print(f"\nChanged against {args.rev} (dvc metrics diff {args.rev} --targets {targets})\n")
    diff = dvc("metrics", "diff", args.rev, "--targets", *DIFF_TARGETS)
    print(diff.strip() or f"no metric differs from {args.rev}")


if __name__ == "__main__":
    main()
