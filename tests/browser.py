"""Headless Chromium (Debian's chromium + chromium-driver) driven by selenium, for the tests that look at a page
as a user's browser shows it. Skips the test where they are not installed."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest


@contextlib.contextmanager
def chromium(profile: Path):
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        pytest.skip("chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-component-update", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
              "--allow-file-access-from-files"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
