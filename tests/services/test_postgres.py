"""The registry's test suite and the rolling deploy's schema again, on PostgreSQL (skips with a reason where it
is absent, except in CI)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import require_service
from depthsite.testing.cli import PROJECT_ROOT

POSTGRES_URL = os.environ.get("DEPTHSITE_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test")
# The registry's files where the database carries the behaviour (rows, unique constraints, row locks,
# transactions, concurrent writers). The rest parse bytes, check paths or run subprocess sites that bring
# their own SQLite file: on PostgreSQL they would only repeat the SQLite run.
ABOUT_THE_DATABASE = ("test_admin.py", "test_catalogue.py", "test_download.py", "test_licences.py",
                      "test_nodes.py", "test_optimize_race.py", "test_provenance.py", "test_services.py")
# And the schema a rolling deploy leaves behind: PostgreSQL alters columns in place where SQLite rebuilds tables.
ALSO = ("tests/deploy/test_rolling_deploy.py",)


@pytest.mark.slow
@pytest.mark.services
def test_registry_suite_passes_on_postgresql():
    require_service("PostgreSQL", "127.0.0.1", 5432)
    env = {**os.environ, "DATABASE_URL": POSTGRES_URL, "DEPTHSITE_REQUIRE_SERVICES": "1"}
    result = subprocess.run(
        # One process: `make test` hands this file out early (tests/conftest.py, LONGEST_FILES), beside the other
        # worker's files, so a second worker of its own only competed for the cores, and collected the tests,
        # imported torch and made a database again (about 25 s of CPU time on a 2-core machine).
        [sys.executable, "-m", "pytest", *(f"tests/registry/{name}" for name in ABOUT_THE_DATABASE), *ALSO, "-q",
         "-m", "not slow", "-p", "no:cacheprovider", "-p", "no:xdist", "--create-db"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary
