"""Browser checks: fixtures for Chromium (installed with apt when missing, as in CI) and
screenshots of the page under test saved when a check fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser.chromium import chromium_binary, screenshot
from tests.conftest import REPO_ROOT

# Screenshots of failed checks (CI keeps the folder as the run's artifacts).
ARTIFACTS = Path(os.environ.get("BROWSER_ARTIFACTS", REPO_ROOT / "test-artifacts" / "browser"))
APT_PACKAGES = ("chromium", "chromium-driver")


def install_chromium() -> None:
    """`apt-get install chromium` (Debian, as root): what a fresh CI machine needs."""
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.fail(
            "Chromium is missing and cannot be installed here (needs root and apt-get): "
            f"install {' '.join(APT_PACKAGES)}, or deselect with -m 'not browser'"
        )
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    started = time.monotonic()
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES],
        check=True,
        env=env,
        timeout=900,
    )
    print(f"installed {' '.join(APT_PACKAGES)} in {time.monotonic() - started:.0f} s")


@pytest.fixture(scope="session")
def chromium() -> str:
    binary = chromium_binary()
    if binary is None:
        install_chromium()
        binary = chromium_binary()
    assert binary, "chromium is still missing after apt-get install"
    return binary


class PageShot:
    """Remembers the page a test looks at; the hook below screenshots it on failure."""

    def __init__(self) -> None:
        self.url: str | None = None


@pytest.fixture
def page(request: pytest.FixtureRequest, chromium: str) -> Iterator[PageShot]:
    shot = PageShot()
    yield shot
    report = getattr(request.node, "rep_call", None)
    if shot.url and report is not None and report.failed:
        path = ARTIFACTS / f"{request.node.name}.png"
        try:
            screenshot(chromium, shot.url, path)
            print(f"screenshot of {shot.url}: {path}")
        except Exception as error:  # a failed screenshot must not hide the test's failure
            print(f"no screenshot of {shot.url}: {error}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
