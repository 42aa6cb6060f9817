"""ops.browser: Selenium drives the system's chromedriver, never one it fetched itself."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.selenium_manager import SeleniumManager

from ops.browser import Browser

pytestmark = [pytest.mark.browser]


def test_browser_uses_the_system_chromedriver_and_never_selenium_manager(chromium, monkeypatch):
    """Given chromedriver's path, Selenium starts it and skips Selenium Manager (which
    would look up and download a driver and a browser)."""

    def refuse(*args: object) -> dict:
        raise AssertionError("Selenium Manager ran")

    monkeypatch.setattr(SeleniumManager, "binary_paths", refuse)
    binary, driver = chromium
    with Browser(binary, driver) as browser:
        assert browser.driver.service.path == driver
        browser.open("data:text/html,<p>drawn offline</p>")
        assert "drawn offline" in browser.wait_for_text("drawn offline", timeout_s=30)
        assert browser.count("p") == 1
