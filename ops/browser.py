"""Headless Chromium through Selenium and the system's chromedriver (Debian's `chromium`
and `chromium-driver`), for the browser checks (tests/browser) and the MLflow screenshot.

The driver is always given by path (`Service(executable_path=...)`), so Selenium Manager
never runs and nothing is downloaded.

A check opens a page and waits, in real time, until the page shows what it should (a
text, a number of elements): single-page apps such as the MLflow and Prefect UIs draw
their tables only after their API calls return, which on a loaded 2-core machine takes
seconds. The screenshot on failure is of the page as the check left it.

Every browser gets a fresh profile and a proxy that answers nothing, so a page that tries
to load anything from outside the machine fails instead of reaching a CDN (loopback
servers stay reachable).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.wait import WebDriverWait

NO_NETWORK_PROXY = "http://127.0.0.1:9"  # discard port: every non-loopback request fails
POLL_S = 0.5


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def chromedriver_binary() -> str | None:
    return shutil.which("chromedriver")


class Browser:
    """One headless Chromium session driven by its own chromedriver process."""

    def __init__(
        self,
        chromium: str,
        driver: str,
        window_size: tuple[int, int] = (1400, 1000),
        page_load_timeout_s: float = 120,
    ) -> None:
        self._profile = tempfile.TemporaryDirectory()
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for argument in (
            "--headless",
            "--no-sandbox",  # tests run as root in CI
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            f"--user-data-dir={self._profile.name}",
            f"--proxy-server={NO_NETWORK_PROXY}",
            f"--window-size={window_size[0]},{window_size[1]}",
        ):
            options.add_argument(argument)
        # chromedriver in a process group of its own, so that close() can end whatever of
        # Chromium outlives a failed quit.
        service = Service(executable_path=driver, popen_kw={"start_new_session": True})
        self._service = service
        try:
            self.driver = webdriver.Chrome(service=service, options=options)
        except Exception:
            self._end_process_group()
            self._profile.cleanup()
            raise
        self.driver.set_page_load_timeout(page_load_timeout_s)

    def __enter__(self) -> Browser:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def open(self, url: str) -> None:
        self.driver.get(url)

    def script(self, source: str, *args: Any) -> Any:
        """The value of a JavaScript function body run in the page (`return ...`)."""
        return self.driver.execute_script(source, *args)

    def text(self) -> str:
        return self.script("return document.body ? document.body.innerText : '';")

    def count(self, css: str) -> int:
        return len(self.driver.find_elements(By.CSS_SELECTOR, css))

    def wait_for_text(self, *texts: str, timeout_s: float = 90) -> str:
        """The page's visible text once it contains every one of `texts` (else fails)."""

        def shows_all(_: webdriver.Chrome) -> str | None:
            shown = self.text()
            return shown if all(t in shown for t in texts) else None

        try:
            return WebDriverWait(self.driver, timeout_s, POLL_S).until(shows_all)
        except TimeoutException:
            shown = self.text()
            missing = [t for t in texts if t not in shown]
            raise AssertionError(
                f"after {timeout_s:.0f} s the page does not show {missing}; "
                f"it shows: {shown[:600]!r}"
            ) from None

    def wait_for_count(self, css: str, at_least: int, timeout_s: float = 60) -> int:
        """The number of elements matching `css` once there are `at_least`, or when the
        time runs out."""
        try:
            WebDriverWait(self.driver, timeout_s, POLL_S).until(
                lambda _: self.count(css) >= at_least
            )
        except TimeoutException:
            pass
        return self.count(css)

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.driver.get_screenshot_as_png())
        return path

    def close(self) -> None:
        """End the session and chromedriver, then what is left of chromedriver's process
        group (its Chromium included)."""
        try:
            self.driver.quit()
        except (OSError, WebDriverException):
            pass
        self._end_process_group()
        self._profile.cleanup()

    def _end_process_group(self) -> None:
        """SIGKILL to what is left of the group once quit() has asked nicely: a Chromium
        that outlived its chromedriver (a failed quit or start)."""
        process = getattr(self._service, "process", None)
        if process is None:
            return
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.poll()  # reaps chromedriver itself if it was still running
