"""Print the MLflow UI address of this project's experiment, opened on its training runs,
and, when the store holds a comparison (`make compare`), the charts of its newest one.

MLflow 3's UI opens experiments in its GenAI mode (an empty Traces page) unless the
address carries `workflowType=machine_learning`. Reads the experiment's id straight
from the local sqlite store (no MLflow import: `make mlflow-ui` prints it at once).

A comparison's charts need more in the address: sorted by date (MLflow's default) the
UI nests child runs under their parent, collapsed, and charts the parent's metrics
only; a comparison's parent has none, so the chart view stays empty. Filtered to the
parent's children and sorted by run name, the children are listed flat: one line per
arm x seed in every chart.
"""

from __future__ import annotations

import sqlite3
import sys
import urllib.parse
from pathlib import Path

from pipeline_lib.config import load_config


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


def newest_comparison(store: Path, experiment: str) -> str | None:
    """The run id of the newest comparison's parent run (tagged stage `compare`, no parent
    of its own: `pipeline_lib.adapters.mlflow_runs.comparison_run`), read from the sqlite
    store."""
    query = """
        SELECT runs.run_uuid FROM runs
        JOIN experiments ON experiments.experiment_id = runs.experiment_id
        JOIN tags AS stage ON stage.run_uuid = runs.run_uuid
        WHERE experiments.name = ? AND runs.lifecycle_stage = 'active'
          AND stage.key = 'stage' AND stage.value = 'compare'
          AND NOT EXISTS (SELECT 1 FROM tags WHERE tags.run_uuid = runs.run_uuid
                          AND tags.key = 'mlflow.parentRunId')
        ORDER BY runs.start_time DESC LIMIT 1
    """
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
            row = db.execute(query, (experiment,)).fetchone()
    except sqlite3.DatabaseError as error:
        raise SystemExit(f"{store} is not an MLflow sqlite store: {error}") from error
    return row[0] if row else None


def chart_url(base: str, store: Path, experiment: str, parent_run_id: str | None = None) -> str:
    """The experiment's runs page in chart mode; with `parent_run_id`, that run's children
    only, listed flat by name (module docstring)."""
    url = experiment_url(base, store, experiment) + "&compareRunsMode=CHART"
    if parent_run_id is None:
        return url
    # The UI takes the search filter from the address only together with a sort order.
    search = {
        "searchFilter": f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
        "orderByKey": "tags.`mlflow.runName`",
        "orderByAsc": "true",
    }
    return f"{url}&{urllib.parse.urlencode(search, quote_via=urllib.parse.quote)}"


if __name__ == "__main__":
    base = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:5000"
    config = load_config("params.yaml", None)
    store, experiment = Path("mlflow.db"), config.tracking.experiment
    print(experiment_url(base.rstrip("/"), store, experiment))
    parent = newest_comparison(store, experiment) if store.exists() else None
    if parent is not None:
        print(
            f"newest comparison's charts: {chart_url(base.rstrip('/'), store, experiment, parent)}"
        )
