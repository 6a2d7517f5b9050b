"""Headless Debian Chromium driven by Playwright, for tests of pages a person uses.

Skips (with the reason) where Chromium or Playwright is missing; `make test`
installs Chromium where it can (root + apt)."""

from __future__ import annotations

import contextlib
import shutil

import pytest

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        p = shutil.which(name)
        if p:
            return p
    pytest.skip("Chromium is not installed (Debian: apt-get install chromium chromium-driver; `make test` does it as root)")


@contextlib.contextmanager
def browser_page(width: int = 1280, height: int = 900, extra_args: tuple[str, ...] = ()):
    """A fresh headless Chromium page (in its own context); closed afterwards."""
    exe = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is not installed (pip install playwright)")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS + list(extra_args))
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            yield page
        finally:
            browser.close()
