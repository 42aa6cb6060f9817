"""Browser checks: fixtures for Chromium and chromedriver (installed with apt when missing,
as on a fresh CI machine; Selenium drives them through ops.browser) and a screenshot of
the page under test when a check fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.browser import Browser, chromedriver_binary, chromium_binary
from tests.conftest import REPO_ROOT

# Screenshots of failed checks (CI keeps the folder as the run's artifacts).
ARTIFACTS = Path(os.environ.get("BROWSER_ARTIFACTS", REPO_ROOT / "test-artifacts" / "browser"))
APT_PACKAGES = ("chromium", "chromium-driver")
APT_LOCK_WAIT_S = 600


def install_chromium() -> None:
    """`apt-get install chromium` (Debian, as root): what a fresh CI machine needs."""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.fail(
            "Chromium is missing and cannot be installed here (needs root and apt-get): "
            f"install {' '.join(APT_PACKAGES)}, or deselect with -m 'not browser'"
        )
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    # Another apt run (unattended-upgrades in CI, a colleague's install here) holds the
    # dpkg lock for a while: wait for it instead of failing at once.
    wait_for_lock = ["-o", f"DPkg::Lock::Timeout={APT_LOCK_WAIT_S}"]
    started = time.monotonic()
    subprocess.run(["apt-get", *wait_for_lock, "update", "-qq"], check=True, env=env, timeout=900)
    subprocess.run(
        ["apt-get", *wait_for_lock, "install", "-y", "-qq", "--no-install-recommends"]
        + list(APT_PACKAGES),
        check=True,
        env=env,
        timeout=900 + APT_LOCK_WAIT_S,
    )
    print(f"installed {' '.join(APT_PACKAGES)} in {time.monotonic() - started:.0f} s")


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    """(chromium, chromedriver), installed with apt when either is missing."""
    if chromium_binary() is None or chromedriver_binary() is None:
        install_chromium()
    binary, driver = chromium_binary(), chromedriver_binary()
    assert binary and driver, "chromium or chromedriver is still missing after apt-get install"
    return binary, driver


@pytest.fixture
def browser(request: pytest.FixtureRequest, chromium: tuple[str, str]) -> Iterator[Browser]:
    """A headless Chromium session; when the test fails, a screenshot of the page as the
    test left it goes to test-artifacts/browser/<test>.png."""
    session = Browser(*chromium)
    try:
        yield session
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            path = ARTIFACTS / f"{request.node.name}.png"
            try:
                print(f"screenshot of the page: {session.screenshot(path)}")
            except Exception as error:  # a failed screenshot must not hide the failure
                print(f"no screenshot: {error}")
    finally:
        session.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
