"""Print the MLflow UI address of this project's experiment, opened on its training runs.

MLflow 3's UI opens experiments in its GenAI mode (an empty Traces page) unless the
address carries `workflowType=machine_learning`. Reads the experiment's id straight
from the local sqlite store (no MLflow import: `make mlflow-ui` prints it at once).
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline_lib.config import load_config  # noqa: E402


def experiment_url(base: str, store: Path, experiment: str) -> str:
    view = "?workflowType=machine_learning"
    if store.exists():
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
            row = db.execute(
                "SELECT experiment_id FROM experiments WHERE name = ?", (experiment,)
            ).fetchone()
        if row:
            return f"{base}/#/experiments/{row[0]}/runs{view}"
    return f"{base}/#/experiments{view}"


if __name__ == "__main__":
    base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:5000"
    config = load_config("params.yaml", None)
    print(experiment_url(base.rstrip("/"), Path("mlflow.db"), config.tracking.experiment))
