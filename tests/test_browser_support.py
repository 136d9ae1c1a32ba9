"""Browser tests on a machine without Chromium: each skips with the one reason, or fails where CI requires it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support import browser as browser_support
from depthsite.testing.cli import PROJECT_ROOT

BROWSER_TEST_FILES = ["tests/api/test_dashboard.py", "tests/jobs/test_browser.py"]


def test_a_missing_browser_is_a_skip_that_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("DEPTHSITE_CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.delenv("DEPTHSITE_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception) as skipped:
        browser_support.require_chromium()
    assert str(tmp_path / "no-chromium") in str(skipped.value) and "apt-get install chromium" in str(skipped.value)


def test_a_file_that_cannot_run_is_missing_too(monkeypatch, tmp_path):
    fake = tmp_path / "chromium"
    fake.write_text("not a browser")  # present but not executable
    monkeypatch.setenv("DEPTHSITE_CHROMIUM", str(fake))
    monkeypatch.delenv("DEPTHSITE_REQUIRE_BROWSER", raising=False)
    with pytest.raises(pytest.skip.Exception):
        browser_support.require_chromium()


def test_ci_turns_a_missing_browser_into_a_failure(monkeypatch, tmp_path):
    monkeypatch.setenv("DEPTHSITE_CHROMIUM", str(tmp_path / "no-chromium"))
    monkeypatch.setenv("DEPTHSITE_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception) as failed:
        browser_support.require_chromium()
    assert "DEPTHSITE_REQUIRE_BROWSER=1" in str(failed.value)


def _run_browser_tests(tmp_path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DEPTHSITE_")}
    environment.update(env, OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "browser", "-p", "no:cacheprovider", "-o",
         f"cache_dir={tmp_path}", *BROWSER_TEST_FILES],
        cwd=PROJECT_ROOT, env=environment, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_every_browser_test_skips_without_chromium_and_fails_in_ci(tmp_path):
    """The real test files, as `make test` runs them on a machine without the browser (the dashboard ones used
    to error in their fixture there)."""
    missing = str(tmp_path / "no-chromium")
    result = _run_browser_tests(tmp_path, DEPTHSITE_CHROMIUM=missing)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "error" not in out.lower().replace("errors=", ""), out
    skips = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    assert skips and all(f"no Chromium at {missing}" in line for line in skips), out
    assert " passed" not in out and " skipped" in out

    required = _run_browser_tests(tmp_path, DEPTHSITE_CHROMIUM=missing, DEPTHSITE_REQUIRE_BROWSER="1")
    assert required.returncode == 1, required.stdout + required.stderr
    assert "DEPTHSITE_REQUIRE_BROWSER=1 requires it" in required.stdout
    assert (" failed" in required.stdout or " error" in required.stdout) and " passed" not in required.stdout
