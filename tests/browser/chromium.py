"""Headless Chromium through chromedriver, spoken to over the W3C WebDriver protocol with
urllib (no Selenium: the five commands used here are a few lines of JSON over HTTP).

A check opens a page and waits, in real time, until the page shows what it should (a
text, a number of elements): single-page apps such as the MLflow and Prefect UIs draw
their tables only after their API calls return, which on a loaded 2-core machine takes
seconds. The screenshot on failure is of the page as the check left it.

Every browser gets a fresh profile and a proxy that answers nothing, so a page that tries
to load anything from outside the machine fails instead of reaching a CDN (loopback
servers stay reachable).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

NO_NETWORK_PROXY = "http://127.0.0.1:9"  # discard port: every non-loopback request fails


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def chromedriver_binary() -> str | None:
    return shutil.which("chromedriver")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Browser:
    """One headless Chromium session driven by its own chromedriver process."""

    def __init__(
        self,
        chromium: str,
        driver: str,
        start_timeout_s: float = 60,
        window_size: tuple[int, int] = (1400, 1000),
    ) -> None:
        self._profile = tempfile.TemporaryDirectory()
        port = _free_port()
        self._base = f"http://127.0.0.1:{port}"
        self._driver = subprocess.Popen(
            [driver, f"--port={port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                if self._call("GET", "/status")["ready"]:
                    break
            except OSError:
                pass
            if self._driver.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("chromedriver did not start")
            time.sleep(0.2)
        options = {
            "binary": chromium,
            "args": [
                "--headless",
                "--no-sandbox",  # tests run as root in CI
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                f"--user-data-dir={self._profile.name}",
                f"--proxy-server={NO_NETWORK_PROXY}",
                f"--window-size={window_size[0]},{window_size[1]}",
            ],
        }
        capabilities = {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}
        try:
            session = self._call("POST", "/session", {"capabilities": capabilities}, timeout=120)
        except Exception:
            self.close()
            raise
        self._session = f"/session/{session['sessionId']}"

    def _call(self, method: str, path: str, body: Any = None, timeout: float = 60) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self._base + path,
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())["value"]
        except urllib.error.HTTPError as error:
            detail = json.loads(error.read() or b"{}").get("value", {})
            message = detail.get("message", error)
            raise RuntimeError(f"WebDriver {method} {path}: {message}") from error

    def open(self, url: str) -> None:
        self._call("POST", f"{self._session}/url", {"url": url}, timeout=120)

    def script(self, source: str, *args: Any) -> Any:
        """The value of a JavaScript function body run in the page (`return ...`)."""
        return self._call(
            "POST", f"{self._session}/execute/sync", {"script": source, "args": list(args)}
        )

    def text(self) -> str:
        return self.script("return document.body ? document.body.innerText : '';")

    def count(self, css: str) -> int:
        return self.script("return document.querySelectorAll(arguments[0]).length;", css)

    def wait_for_text(self, *texts: str, timeout_s: float = 90) -> str:
        """The page's visible text once it contains every one of `texts` (else fails)."""
        deadline = time.monotonic() + timeout_s
        while True:
            shown = self.text()
            if all(t in shown for t in texts):
                return shown
            if time.monotonic() > deadline:
                missing = [t for t in texts if t not in shown]
                raise AssertionError(
                    f"after {timeout_s:.0f} s the page does not show {missing}; "
                    f"it shows: {shown[:600]!r}"
                )
            time.sleep(0.5)

    def wait_for_count(self, css: str, at_least: int, timeout_s: float = 60) -> int:
        deadline = time.monotonic() + timeout_s
        while (found := self.count(css)) < at_least and time.monotonic() < deadline:
            time.sleep(0.5)
        return found

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self._call("GET", f"{self._session}/screenshot")))
        return path

    def close(self) -> None:
        """End the session, then chromedriver's process group (its Chromium included)."""
        if getattr(self, "_session", None):
            try:
                self._call("DELETE", self._session, timeout=30)
            except (OSError, RuntimeError):
                pass
            self._session = None
        if self._driver.poll() is None:
            os.killpg(self._driver.pid, signal.SIGTERM)
            try:
                self._driver.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self._driver.pid, signal.SIGKILL)
                self._driver.wait()
        self._profile.cleanup()
