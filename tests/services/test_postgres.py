"""The registry's test suite again, on PostgreSQL (skips with a reason where it is absent, except in CI)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import require_service
from depthsite.testing.cli import PROJECT_ROOT

POSTGRES_URL = os.environ.get("DEPTHSITE_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test")
# Files whose subject is parsing bytes (weight formats, hostile files, full disks, JSON error output): the
# database plays no part in them, and they are half the registry suite's time.
NOT_ABOUT_THE_DATABASE = ("test_formats.py", "test_hostile_weights.py", "test_disk_full.py", "test_json_errors.py")


@pytest.mark.slow
@pytest.mark.services
def test_registry_suite_passes_on_postgresql():
    require_service("PostgreSQL", "127.0.0.1", 5432)
    env = {**os.environ, "DATABASE_URL": POSTGRES_URL, "DEPTHSITE_REQUIRE_SERVICES": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/registry", "-q", "-m", "not slow", "-p", "no:cacheprovider",
         "--create-db", *(f"--ignore=tests/registry/{name}" for name in NOT_ABOUT_THE_DATABASE)],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary
