"""After `dvc repro`: log the dvc.lock DVC wrote at the end into the pipeline's MLflow runs.

    python -m ops.record_final_lock [--params params.yaml]

DVC writes a stage's dvc.lock entry after the stage's process has ended, so a stage
cannot log the lock that pins its own outputs. This gives the parent run (artifact
`dvc/dvc.lock`, the one docs/deployments.md's restore recipe downloads) and each of its stage
runs (`pipeline/dvc.lock`) the final file. No parent run for this configuration and
commit (nothing ran): it says so and does nothing.
"""

from __future__ import annotations

import argparse

from pipeline_lib.adapters.mlflow_runs import record_final_lock
from pipeline_lib.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    parent = record_final_lock(load_config(args.params, None))
    if parent is None:
        print("no MLflow parent run for this configuration and commit: nothing recorded")
    else:
        print(f"dvc.lock recorded in MLflow parent run {parent} and its stage runs")


if __name__ == "__main__":
    main()
