"""The results as a person opens them, in headless Chromium with no network beyond loopback:
plain `dvc plots show`'s page draws its charts offline, the MLflow experiment opens on its
training runs, the MLflow chart view draws a comparison's arm x seed runs, the Prefect UI
(on a non-default port) lists the flow runs.

On failure the page's screenshot is saved under test-artifacts/browser/.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ops.mlflow_link import chart_url, experiment_url
from ops.mlflow_screenshot import (
    CLOSE_ASSISTANT_JS,
    SCROLL_TO_TOP_JS,
    show_only_charts,
    stop,
    wait_for_charts,
)
from ops.mlflow_screenshot import mlflow_ui as mlflow_ui_server
from ops.plots_offline import TEMPLATE
from tests.browser.conftest import ARTIFACTS
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.browser]

BIN = str(Path(sys.executable).parent)
QUIET = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, process: subprocess.Popen, timeout_s: float) -> float:
    """Seconds until `url` answers 200; fails if the server exits or the time runs out."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        assert process.poll() is None, f"server exited with code {process.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


def test_plain_dvc_plots_show_draws_both_charts_offline(browser, tmp_path):
    """`dvc plots show` with no options takes .dvc/config's template (written by `make
    install`): the page loads no script from elsewhere and, with no network, draws a
    chart per plot with a legend entry per strategy."""
    assert (REPO_ROOT / TEMPLATE).is_file(), f"no {TEMPLATE}: `make install` writes it"
    out = tmp_path / "dvc_plots"
    env = os.environ | QUIET | {"PATH": f"{BIN}:{os.environ['PATH']}"}
    subprocess.run(
        [f"{BIN}/dvc", "plots", "show", "-o", str(out)],
        cwd=REPO_ROOT,
        env=env,
        check=True,
        timeout=300,
    )
    html = (out / "index.html").read_text()
    assert not re.search(r"<script[^>]+src=", html), "the page loads a script from elsewhere"
    browser.open((out / "index.html").as_uri())
    charts = browser.wait_for_count("svg.marks", 2)
    assert charts == 2, f"expected 2 charts (accuracy, effective-gradient ratio), got {charts}"
    legend = browser.script(
        "return [...document.querySelectorAll('g.role-legend text')].map(t => t.textContent);"
    )
    assert {"knapsack", "uniform"} <= set(legend), f"no legend entry per strategy: {legend}"


@contextmanager
def tracking_uri_unset() -> Iterator[None]:
    """Without MLFLOW_TRACKING_URI, so that the stage code logs to the config's store."""
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture(scope="module")
def mlflow_ui(tmp_path_factory) -> Iterator[tuple[str, Path, str]]:
    """An MLflow store holding one pipeline run made by the stage code, served by
    `mlflow ui`; yields (UI base, store, experiment)."""
    from pipeline_lib.adapters.mlflow_runs import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
    from pipeline_lib.config import load_config
    from tasks.tracking import stage_run

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    config = load_config(
        REPO_ROOT / "params.yaml",
        {"tracking.uri": uri, "tracking.artifact_location": str(root / "mlruns")},
    )
    with tracking_uri_unset(), stage_run(config, "train") as tracker:
        for strategy, ratio in (("knapsack", 0.7), ("uniform", 0.4)):
            with tracker.child(f"train/{strategy}", {"strategy": strategy}) as run:
                for step in (1, 2, 3):
                    run.log_metrics({"rollout/effective_gradient_ratio": ratio}, step=step)
    from mlflow import MlflowClient

    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(config.tracking.experiment)
    assert experiment.tags.get(EXPERIMENT_KIND_TAG) == EXPERIMENT_KIND
    with mlflow_ui_server(root / "mlflow.db") as base:
        yield base, root / "mlflow.db", config.tracking.experiment


def test_mlflow_link_opens_the_experiment_on_its_training_runs(browser, mlflow_ui):
    """The address `make mlflow-ui` prints shows the runs table, not MLflow 3's GenAI
    overview (where the bare experiment address lands, whatever the experiment's kind)."""
    base, store, experiment = mlflow_ui
    browser.open(experiment_url(base, store, experiment))
    shown = browser.wait_for_text("Run Name", "pipeline-", "matching runs", timeout_s=120)
    assert "Token Usage" not in shown, "the GenAI overview is shown"
    assert "workflowType=machine_learning" in browser.script("return location.href;")


COMPARISON_ARMS, COMPARISON_SEEDS = ("knapsack", "uniform"), (0, 1)
COMPARISON_METRICS = ("eval/accuracy", "rollout/effective_gradient_ratio", "compute/rollouts_total")
COMPARISON_RUNS = [
    f"compare/{arm}/seed{seed}" for arm in COMPARISON_ARMS for seed in COMPARISON_SEEDS
]


def comparison_step(arm: str, seed: int, step: int) -> dict[str, float]:
    """Made-up curves, one per arm x seed: the knapsack arm ahead, seeds apart; and a
    metric the chart view is told to leave out (`train/loss`)."""
    ahead = 1.0 if arm == "knapsack" else 0.0
    return {
        "eval/accuracy": 0.4 + 0.1 * ahead + 0.05 * step + 0.01 * seed,
        "rollout/effective_gradient_ratio": 0.4 + 0.3 * ahead - 0.02 * step,
        "compute/rollouts_total": 64.0 * step * (1 + seed),
        "train/loss": 1.0 / step,
    }


@pytest.fixture(scope="module")
def mlflow_comparison(tmp_path_factory) -> Iterator[tuple[str, Path, str, str]]:
    """An MLflow store holding one comparison made by the compare stage's code: the parent
    run from `comparison_run`, a child per arm x seed opened as `train_arm_seed` opens it,
    served by `mlflow ui`; yields (UI base, store, experiment, parent run id)."""
    from pipeline_lib.adapters.mlflow_runs import (
        ARM_TAG,
        EXPERIMENT_KIND,
        EXPERIMENT_KIND_TAG,
        SEED_TAG,
        comparison_run,
    )
    from pipeline_lib.adapters.mlflow_tracker import start_run
    from pipeline_lib.config import load_config

    root = tmp_path_factory.mktemp("mlflow_comparison")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    overrides = {
        "tracking.uri": uri,
        "tracking.artifact_location": str(root / "mlruns"),
        "compare.arms": list(COMPARISON_ARMS),
        "compare.seeds": list(COMPARISON_SEEDS),
    }
    config = load_config(REPO_ROOT / "params.yaml", overrides)
    with tracking_uri_unset(), comparison_run(config) as parent:
        for arm in COMPARISON_ARMS:
            for seed in COMPARISON_SEEDS:
                tags = {ARM_TAG: arm, SEED_TAG: seed, "strategy": arm, "stage": "compare"}
                with start_run(
                    uri,
                    config.tracking.experiment,
                    run_name=f"compare/{arm}/seed{seed}",
                    tags=tags,
                    parent_run_id=parent.run_id,
                    artifact_location=config.tracking.artifact_location,
                ) as run:
                    for step in (1, 2, 3, 4):
                        run.log_metrics(comparison_step(arm, seed, step), step=step)
    from mlflow import MlflowClient

    experiment = MlflowClient(tracking_uri=uri).get_experiment_by_name(config.tracking.experiment)
    assert experiment.tags.get(EXPERIMENT_KIND_TAG) == EXPERIMENT_KIND
    with mlflow_ui_server(root / "mlflow.db") as base:
        yield base, root / "mlflow.db", config.tracking.experiment, str(parent.run_id)


def test_mlflow_chart_view_draws_every_arm_and_seed_of_a_comparison(browser, mlflow_comparison):
    """The chart view of a comparison (runs page, `compareRunsMode=CHART`, filtered to the
    parent's children) lists the arm x seed runs and draws one line per run in the chart
    of each metric. Its screenshot: test-artifacts/browser/mlflow_comparison_charts.png."""
    base, store, experiment, parent = mlflow_comparison
    browser.open(chart_url(base, store, experiment, parent))
    shown = browser.wait_for_text(*COMPARISON_RUNS, "4 matching runs", timeout_s=120)
    assert "compare-" not in shown, "the parent run is listed: the search filter was dropped"
    assert "compareRunsMode=CHART" in browser.script("return location.href;")
    browser.script(CLOSE_ASSISTANT_JS)
    all_charts = wait_for_charts(browser, [*COMPARISON_METRICS, "train/loss"], timeout_s=180)
    assert sorted(all_charts["train/loss"]) == COMPARISON_RUNS, all_charts
    show_only_charts(browser, COMPARISON_METRICS)
    charts = wait_for_charts(browser, COMPARISON_METRICS, timeout_s=180)
    assert set(charts) == set(COMPARISON_METRICS), f"charts other than the chosen: {charts}"
    for metric in COMPARISON_METRICS:
        assert sorted(charts[metric]) == COMPARISON_RUNS, f"{metric}: lines {charts[metric]}"
    browser.script(SCROLL_TO_TOP_JS)
    wait_for_charts(browser, timeout_s=60)
    print(f"screenshot: {browser.screenshot(ARTIFACTS / 'mlflow_comparison_charts.png')}")


def test_prefect_ui_on_another_port_lists_the_flow_runs(browser, tmp_path):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = (
        os.environ
        | QUIET
        | {
            "PREFECT_HOME": str(tmp_path / "prefect"),
            "PREFECT_API_URL": api,
            "PREFECT_UI_API_URL": api,  # what `make prefect-server` sets
        }
    )
    server = subprocess.Popen(
        [f"{BIN}/prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(f"{api}/health", server, 240)
        flow = textwrap.dedent(
            """
            from prefect import flow

            @flow(name="browser-check", flow_run_name="browser-check-run")
            def check():
                return 1

            check()
            """
        )
        subprocess.run([sys.executable, "-c", flow], env=env, check=True, timeout=300)
        browser.open(f"http://127.0.0.1:{port}/runs")
        shown = browser.wait_for_text("browser-check-run", timeout_s=120)
        assert "Can't connect to Server API" not in shown
    finally:
        stop(server)
