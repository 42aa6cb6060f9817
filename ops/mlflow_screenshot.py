"""A screenshot of the MLflow UI's charts of a comparison (`make compare`), drawn by
headless Chromium from a local MLflow store.

    python -m ops.mlflow_screenshot                     # mlflow.db -> docs/images/...
    python -m ops.mlflow_screenshot --store /tmp/mlflow.db -o /tmp/charts.png
    python -m ops.mlflow_screenshot --metrics eval/accuracy train/loss
    python -m ops.mlflow_screenshot --metrics           # every metric's chart

Starts `mlflow ui` on a free loopback port (1 worker), opens the experiment's runs page
in chart mode (`compareRunsMode=CHART`) with the runs search filtered to the children of
the newest comparison's parent run, keeps the charts of the chosen metrics (the charts'
search box), waits until they are drawn, saves the screenshot and stops the server.

Why the filter and the sort by name in the address: sorted by date (MLflow's default)
the UI nests child runs under their parent, collapsed, and charts the parent's metrics
only; a comparison's parent has none, so the chart view stays empty. Sorted by run name
the children are listed flat: one line per arm x seed in every chart. MLflow draws a
chart only while it is in view, so the wait scrolls each chart section into view in turn.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from ops.browser import Browser, chromedriver_binary, chromium_binary
from ops.mlflow_link import chart_url, newest_comparison
from pipeline_lib.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[1]

# Wide enough for readable charts, tall enough for three chart sections (one chart each).
WINDOW_SIZE = (1600, 1700)
METRICS = ("eval/accuracy", "rollout/effective_gradient_ratio", "compute/rollouts_total")
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
CHARTS_SEARCH = 'input[placeholder="Search metric charts"]'
# The charts drawn now: {chart title: names of its runs}. A chart counts once plotly has
# drawn a trace with at least one point into its SVG.
DRAWN_CHARTS_JS = """
const drawn = {};
for (const card of document.querySelectorAll('[data-testid="experiment-view-compare-runs-card"]')) {
  const plot = card.querySelector('.js-plotly-plot');
  const title = card.querySelector('h4[title]');
  const traces = plot ? (plot.data || []).filter(t => (t.x || []).length > 0) : [];
  if (title && traces.length && plot.querySelector('svg.main-svg .scatterlayer .trace path')) {
    drawn[title.title] = [...new Set(traces.map(t => t.name))];
  }
}
return drawn;
"""
CHART_TITLES_JS = """
return [...document.querySelectorAll(
  '[data-testid="experiment-view-compare-runs-card"] h4[title]')].map(h => h.title);
"""
# Scrolls chart section number arguments[0] (modulo their number) into view.
SCROLL_TO_SECTION_JS = """
const headers = document.querySelectorAll(
  '[data-testid="experiment-view-compare-runs-section-header"]');
if (headers.length) headers[arguments[0] % headers.length].scrollIntoView({block: 'start'});
return headers.length;
"""
SCROLL_TO_TOP_JS = (
    "for (const e of document.querySelectorAll('*')) if (e.scrollTop) e.scrollTop = 0;"
)
# MLflow 3.17 opens its chat panel on a first visit (a fresh browser profile).
CLOSE_ASSISTANT_JS = """
const close = document.querySelector(
  'button[data-component-id="mlflow.assistant.chat_panel.close"]');
if (close) close.click();
return Boolean(close);
"""
# Sets a React-controlled input's value the way typing does (its own setter, then 'input').
TYPE_INTO_JS = """
const input = document.querySelector(arguments[0]);
Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(input, arguments[1]);
input.dispatchEvent(new Event('input', {bubbles: true}));
"""


def show_only_charts(browser: Browser, titles: Collection[str], timeout_s: float = 120) -> None:
    """Type a regular expression matching exactly `titles` into the charts' search box and
    wait until the charts shown are among them."""
    if browser.wait_for_count(CHARTS_SEARCH, 1, timeout_s) < 1:
        raise TimeoutError(f"no chart search box after {timeout_s:.0f} s")
    pattern = "^(" + "|".join(re.escape(title) for title in titles) + ")$"
    browser.script(TYPE_INTO_JS, CHARTS_SEARCH, pattern)
    deadline = time.monotonic() + timeout_s
    while shown := set(browser.script(CHART_TITLES_JS)) - set(titles):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the charts' search for {pattern} still shows {sorted(shown)}")
        time.sleep(0.5)


def wait_for_charts(
    browser: Browser, titles: Collection[str] = (), timeout_s: float = 180
) -> dict[str, list[str]]:
    """{chart title: run names} of the charts seen drawn, once each of `titles` has been
    (any one chart when `titles` is empty); scrolls the sections into view in turn."""
    deadline = time.monotonic() + timeout_s
    seen: dict[str, list[str]] = browser.script(DRAWN_CHARTS_JS)
    section = 0
    while not (seen and set(titles) <= seen.keys()):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"after {timeout_s:.0f} s the charts seen drawn are {sorted(seen)}, "
                f"missing {sorted(set(titles) - seen.keys())}; "
                f"the page shows {browser.text()[:600]!r}"
            )
        browser.script(SCROLL_TO_SECTION_JS, section)
        section += 1
        time.sleep(1)
        seen |= browser.script(DRAWN_CHARTS_JS)
    return seen


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def mlflow_ui(store: Path, timeout_s: float = 240) -> Iterator[str]:
    """`mlflow ui` (1 worker) serving `store` on a free loopback port; yields its address.
    Its process group is stopped, by PID, when the block ends."""
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    command = [str(mlflow), "ui", "--backend-store-uri", f"sqlite:///{store.resolve()}"]
    process = subprocess.Popen(
        command + ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=store.resolve().parent,
        env=os.environ | QUIET,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while not _answers(f"{base}/health"):
            if process.poll() is not None:
                raise RuntimeError(f"mlflow ui exited with code {process.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow ui did not answer within {timeout_s:.0f} s")
            time.sleep(0.5)
        yield base
    finally:
        stop(process)


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (it runs in a session of its own), then
    SIGKILL after 20 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def screenshot_comparison(
    store: Path,
    output: Path,
    experiment: str,
    metrics: Collection[str] = METRICS,
    timeout_s: float = 300,
) -> dict[str, list[str]]:
    """Save the chart view of the newest comparison's runs to `output` (all charts when
    `metrics` is empty); returns the charts seen drawn ({title: run names})."""
    if not store.is_file():
        raise SystemExit(f"no MLflow store at {store}")
    chromium, driver = chromium_binary(), chromedriver_binary()
    if chromium is None or driver is None:
        raise SystemExit(
            "Chromium or chromedriver is missing: apt-get install chromium chromium-driver"
        )
    parent = newest_comparison(store, experiment)
    if parent is None:
        raise SystemExit(f"{store} holds no comparison (`make compare`) in {experiment!r}")
    with mlflow_ui(store) as base, Browser(chromium, driver, window_size=WINDOW_SIZE) as browser:
        browser.open(chart_url(base, store, experiment, parent))
        wait_for_charts(browser, timeout_s=timeout_s)
        browser.script(CLOSE_ASSISTANT_JS)
        if metrics:
            show_only_charts(browser, metrics, timeout_s)
        drawn = wait_for_charts(browser, metrics, timeout_s)
        browser.script(SCROLL_TO_TOP_JS)
        wait_for_charts(browser, timeout_s=timeout_s)
        time.sleep(2)  # the charts scrolled back into view finish drawing
        browser.screenshot(output)
    return drawn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--store",
        type=Path,
        default=REPO_ROOT / "mlflow.db",
        help="the MLflow sqlite store (default: the repository's mlflow.db)",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=REPO_ROOT / "docs" / "images" / "mlflow_comparison.png",
        help="the PNG to write (default: docs/images/mlflow_comparison.png)",
    )
    parser.add_argument(
        "--metrics",
        nargs="*",
        default=list(METRICS),
        help=f"the charts to keep (default: {' '.join(METRICS)}; none given: all)",
    )
    parser.add_argument(
        "--timeout-s", type=float, default=300, help="how long to wait for each step of the page"
    )
    args = parser.parse_args()
    experiment = load_config(REPO_ROOT / "params.yaml", None).tracking.experiment
    drawn = screenshot_comparison(args.store, args.output, experiment, args.metrics, args.timeout_s)
    for title, runs in sorted(drawn.items()):
        print(f"{title}: {', '.join(sorted(runs))}")
    print(f"screenshot: {args.output}")


if __name__ == "__main__":
    main()
