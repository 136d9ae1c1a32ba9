"""A worker process that stops removes its own warm-model rows: a real django-q2 worker, stopped three ways."""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from tests.support.cli import PROJECT_ROOT, make_site

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return make_site(tmp_path_factory.mktemp("warm-exit"))


def stopped_worker(site, mode: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "tests.support.warm_worker", mode], cwd=PROJECT_ROOT,
                            env=site.env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_worker_stopped_by_its_cluster_removes_its_rows(site):
    outcome = stopped_worker(site, "stop")
    assert outcome["success"] and outcome["before"] == 1
    assert outcome["exitcode"] == 0 and outcome["after"] == 0


def test_a_worker_sent_sigterm_removes_its_rows_and_still_dies_of_it(site):
    outcome = stopped_worker(site, "sigterm")
    assert outcome["before"] == 1 and outcome["after"] == 0
    assert outcome["exitcode"] == -signal.SIGTERM  # the cluster sees the death it would have seen


def test_a_killed_worker_leaves_its_rows_to_the_staleness_sweep(site):
    # SIGKILL runs no code: the rows stay until the heartbeat-based sweep removes them (tested in test_lease).
    outcome = stopped_worker(site, "sigkill")
    assert outcome["before"] == 1 and outcome["after"] == 1 and outcome["exitcode"] == -signal.SIGKILL
