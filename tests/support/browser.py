"""Debian's Chromium for the browser tests: where it is, and one skip (or, in CI, one failure) when it is not.

Every browser test goes through here (the `browser` marker and the `browser` fixture in tests/conftest.py), so a
machine without Chromium skips them all with the same reason, and `.ci/run` (DEPTHSITE_REQUIRE_BROWSER=1) turns
that reason into a failure. Never a downloaded browser: Playwright drives the system package's binary.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import pytest

DEFAULT_CHROMIUM = "/usr/bin/chromium"
# No sandbox (containers run as root), no GPU, and nothing that would call out to Google.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
INSTALL_HINT = "install Debian's `chromium` package (apt-get install chromium); .ci/run does"


def chromium_path() -> str:
    """The browser binary: DEPTHSITE_CHROMIUM when set (tests of this helper point it elsewhere), else Debian's."""
    return os.environ.get("DEPTHSITE_CHROMIUM") or DEFAULT_CHROMIUM


def browser_required() -> bool:
    return os.environ.get("DEPTHSITE_REQUIRE_BROWSER", "") == "1"


def chromium_missing_reason() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    path = chromium_path()
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        return f"browser test: no Chromium at {path} ({INSTALL_HINT})"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "browser test: the playwright package is not installed (pip install -r requirements-dev.txt)"
    return None


def require_chromium() -> str:
    """The browser's path; otherwise skip the test, or fail it where DEPTHSITE_REQUIRE_BROWSER=1 (CI)."""
    reason = chromium_missing_reason()
    if reason is None:
        return chromium_path()
    if browser_required():
        pytest.fail(f"{reason}, and DEPTHSITE_REQUIRE_BROWSER=1 requires it", pytrace=False)
    pytest.skip(reason)


@contextlib.contextmanager
def chromium_browser() -> Iterator:
    """A headless Playwright Browser on the system Chromium, closed afterwards."""
    path = require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def policy_refusals(page) -> list[str]:
    """A list that fills with every message in which the page's browser reports refusing something under the
    Content-Security-Policy (depthsite.csp): attach before the page loads, assert it empty afterwards."""
    refused: list[str] = []
    page.on("console", lambda message: refused.append(message.text)
            if "Content Security Policy" in message.text else None)
    return refused
