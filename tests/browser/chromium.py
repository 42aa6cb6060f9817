"""Headless Chromium through its command line: the page's DOM after its scripts ran, and
screenshots. No WebDriver: `--dump-dom` after `--virtual-time-budget` is enough to check
that charts and tables were drawn, and it needs no extra Python package.

Every page is opened with a fresh profile and a proxy that answers nothing, so a page
that tries to load anything from outside the machine fails instead of reaching a CDN
(loopback servers stay reachable).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

NO_NETWORK_PROXY = "http://127.0.0.1:9"  # discard port: every non-loopback request fails


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _run(binary: str, url: str, extra: list[str], budget_ms: int, timeout_s: float) -> str:
    with tempfile.TemporaryDirectory() as profile:
        command = [
            binary,
            "--headless",
            "--no-sandbox",  # tests run as root in CI
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--proxy-server={NO_NETWORK_PROXY}",
            "--window-size=1400,1000",
            f"--virtual-time-budget={budget_ms}",
            *extra,
            url,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    if result.returncode != 0:
        raise RuntimeError(f"chromium exited {result.returncode}: {result.stderr[-2000:]}")
    return result.stdout


def dump_dom(binary: str, url: str, budget_ms: int = 15000, timeout_s: float = 120) -> str:
    """The serialised DOM once the page's scripts have run for `budget_ms` of virtual time."""
    return _run(binary, url, ["--dump-dom"], budget_ms, timeout_s)


def screenshot(binary: str, url: str, path: Path, budget_ms: int = 15000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(binary, url, [f"--screenshot={path}", "--hide-scrollbars"], budget_ms, 120)
    return path
