"""The fault trials' opt-in (`--opt-in faults`), shared fixtures and the summary line.

`make fault-trials` ends with `fault trials: N passed, M failed`, counting the trials of
this folder only (a trial whose set-up or teardown breaks counts as failed), after one
`PASS`/`FAIL` line per trial with what was checked.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline_lib.adapters.processes import Supervisor
from tests.faults.harness import finish, start_worker

FAULTS_DIR = Path(__file__).resolve().parent


def run_faults(config: pytest.Config) -> bool:
    """Whether this session opted in to the trials (`--opt-in faults`, tests/conftest.py)."""
    return "faults" in config.getoption("--opt-in", default=[])


def trial_outcomes(
    reports: list[pytest.TestReport], rootpath: Path
) -> dict[str, tuple[str, str, float]]:
    """Each trial's verdict, detail and seconds: FAIL if any phase failed, else PASS if its
    call passed (skipped trials are not counted)."""
    outcomes: dict[str, tuple[str, str, float]] = {}
    for report in reports:
        if not (rootpath / report.fspath).resolve().is_relative_to(FAULTS_DIR):
            continue
        if report.failed:
            message = report.longreprtext.strip().splitlines()
            outcomes[report.nodeid] = ("FAIL", message[-1] if message else "", report.duration)
        elif report.when == "call" and report.passed and report.nodeid not in outcomes:
            detail = dict(report.user_properties).get("detail", "")
            outcomes[report.nodeid] = ("PASS", str(detail), report.duration)
    return outcomes


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> Iterator[None]:
    """After pytest's own summary: one line per trial, then the count, as the last line."""
    result = yield
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not run_faults(session.config) or session.config.option.collectonly:
        return result
    reports = [r for group in reporter.stats.values() for r in group if hasattr(r, "when")]
    outcomes = trial_outcomes(reports, session.config.rootpath)
    for nodeid, (verdict, detail, seconds) in outcomes.items():
        name = nodeid.split("::", 1)[-1]
        reporter.write_line(f"{verdict} {name}: {detail} ({seconds:.0f} s)")
    passed = sum(verdict == "PASS" for verdict, _, _ in outcomes.values())
    reporter.write_line(f"fault trials: {passed} passed, {len(outcomes) - passed} failed")
    return result


@pytest.fixture(scope="session")
def supervisor() -> Iterator[Supervisor]:
    """Stops every process a trial starts, by PID, however the session ends."""
    with Supervisor(
        watchdog=True,
        signals=(signal.SIGTERM, signal.SIGHUP),
        mark_environment=False,
        kill_descendants=False,
    ) as supervisor:
        yield supervisor


@pytest.fixture(scope="session")
def fault_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trials' temporary folder (pytest keeps the last few; see --basetemp)."""
    return tmp_path_factory.mktemp("fault-trials")


@pytest.fixture(scope="session")
def reference_run(supervisor: Supervisor, fault_root: Path) -> Path:
    """The uninterrupted small training run the killed-and-resumed runs must equal."""
    reference = fault_root / "reference"
    finish(start_worker(supervisor, reference), reference)
    return reference
