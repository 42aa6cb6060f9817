"""Is the embedded default's start robust? Warm-ups from several starts, GRPO from each.

    .venv/bin/python -m ops.with_prefect_server -- .venv/bin/python -m bench.check_start \
        [--variants A,B,C,D,E,F] [--out metrics/start_check.jsonl] [--set key=value ...]

Each variant runs the real stages (prepare, bootstrap, train, evaluate: the flows, with
params.yaml plus the variant's overrides) in its own clone of this checkout's HEAD under
a scratch folder, trains the `knapsack` strategy only, and appends one JSON line: SFT
steps, the SFT stop check's validation accuracy, the start policy's held-out accuracy,
the trained policy's, and the gain. The variants were fixed before any result was seen:

    A  seed 0, 2 threads (the default)
    B  seed 0, 1 thread
    C  seed 1, 2 threads
    D  seed 2, 2 threads
    E  seed 0, 2 threads, SFT for a fixed (A's stop - 20) steps, no target
    F  seed 0, 2 threads, SFT for a fixed (A's stop + 20) steps, no target

`--set` adds overrides to every variant (e.g. train.backend=hf, which docs/pipeline.md's
table used to fit the check on 2 cores). Prints a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "bootstrap", "train", "evaluate")
VARIANTS = {
    "A": {"seed": 0, "threads": 2},
    "B": {"seed": 0, "threads": 1},
    "C": {"seed": 1, "threads": 2},
    "D": {"seed": 2, "threads": 2},
    "E": {"seed": 0, "threads": 2, "sft_offset": -20},
    "F": {"seed": 0, "threads": 2, "sft_offset": 20},
}


def sft_steps(clone: Path) -> int:
    """SFT steps of the clone's bootstrap run, read back from its MLflow store."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{clone / 'mlflow.db'}")
    runs = [
        run
        for experiment in client.search_experiments()
        for run in client.search_runs([experiment.experiment_id])
        if "sft/steps" in run.data.metrics
    ]
    if not runs:
        raise RuntimeError(f"no bootstrap run with sft/steps in {clone / 'mlflow.db'}")
    return int(runs[0].data.metrics["sft/steps"])


def run_variant(name: str, spec: dict, extra: list[str], scratch: Path, stop_a: int | None):
    """Clone, run the four stages with the variant's overrides, return its JSON record."""
    clone = scratch / name
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    overrides = [
        f"seed={spec['seed']}",
        f"threads={spec['threads']}",
        'train.strategies=["knapsack"]',
    ]
    if "sft_offset" in spec:
        if stop_a is None:
            raise RuntimeError(f"variant {name} needs variant A's SFT stop step: run A first")
        overrides += [
            f"bootstrap.sft.steps={stop_a + spec['sft_offset']}",
            "bootstrap.sft.target_accuracy=null",
        ]
    overrides += extra
    for stage in STAGES:
        command = [sys.executable, "-m", f"flows.{stage}"]
        for item in overrides:
            command += ["-S", item]
        print(f"[{name}] {stage}: {' '.join(command[1:])}", flush=True)
        subprocess.run(command, cwd=clone, check=True, env=os.environ | {"PYTHONPATH": ""})
    summary = json.loads((clone / "metrics" / "summary.json").read_text())
    record = {
        "variant": name,
        **{k: v for k, v in spec.items()},
        "overrides": overrides,
        "sft_steps": sft_steps(clone),
        "start_accuracy": summary["start_accuracy"],
        "knapsack_accuracy": summary["knapsack_accuracy"],
    }
    record["gain"] = record["knapsack_accuracy"] - record["start_accuracy"]
    return record


def table(records: list[dict]) -> str:
    lines = [
        "| start | seed | threads | SFT steps | start accuracy | after GRPO (knapsack) | gain |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in records:
        how = {"E": "A's stop - 20", "F": "A's stop + 20"}.get(r["variant"], "stop at target")
        lines.append(
            f"| {r['variant']} ({how}) | {r['seed']} | {r['threads']} | {r['sft_steps']} | "
            f"{r['start_accuracy']:.3f} | {r['knapsack_accuracy']:.3f} | {r['gain']:+.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="ABCDEF")
    parser.add_argument("--out", default="metrics/start_check.jsonl")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    out = REPO / args.out
    done = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    stop_a = next((r["sft_steps"] for r in done if r["variant"] == "A"), None)
    with tempfile.TemporaryDirectory(prefix="knapsack-start-check-") as scratch:
        for name in [v for v in args.variants.replace(",", "") if v in VARIANTS]:
            if any(r["variant"] == name for r in done):
                print(f"[{name}] already in {args.out}")
                continue
            record = run_variant(name, VARIANTS[name], args.set, Path(scratch), stop_a)
            stop_a = record["sft_steps"] if name == "A" else stop_a
            done.append(record)
            with out.open("a") as handle:  # one line per finished variant: a crash loses none
                handle.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
    print(table(done))


if __name__ == "__main__":
    main()
