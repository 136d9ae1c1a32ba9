"""A worker process that stops removes its own warm-model rows: a real django-q2 worker stopped three ways, and a
real `qcluster` stopped after a job."""
from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from models_registry.formats import write_weights
from depthsite.testing import images
from depthsite.testing.e2e import start_site, stop_site
from depthsite.testing.cli import PROJECT_ROOT, make_site
from models_registry.detweights import det_numpy_state_dict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return make_site(tmp_path_factory.mktemp("warm-exit"))


def worker_script(site, mode: str) -> dict:
    result = subprocess.run([sys.executable, "-m", "tests.support.warm_worker", mode], cwd=PROJECT_ROOT,
                            env=site.env(), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert not outcome.get("stuck"), f"the worker outlived its stop; its stacks:\n{result.stderr[-6000:]}"
    return outcome


def test_every_thread_of_a_worker_leaves_sigterm_to_the_one_that_waits_for_it(site):
    # The kernel hands a process's SIGTERM to any thread that does not block it: every thread a worker runs (the
    # heartbeat, the task's own) blocks it, and only the one in sigwait can take it (the kernel lifts the block for
    # the thread while it waits, which is how sigwait receives).
    outcome = worker_script(site, "masks")
    assert outcome["success"], outcome
    masks = outcome["masks"]
    assert {"MainThread", "depthsite-sigterm", "depthsite-heartbeat", "task-thread"} <= set(masks), masks
    assert [name for name, blocked in masks.items() if not blocked] == ["depthsite-sigterm"], masks


def test_a_worker_stopped_by_its_cluster_removes_its_rows(site):
    outcome = worker_script(site, "stop")
    assert outcome["success"] and outcome["before"] == 1
    assert outcome["exitcode"] == 0 and outcome["after"] == 0


def test_a_worker_sent_sigterm_removes_its_rows_and_still_dies_of_it(site):
    outcome = worker_script(site, "sigterm")
    assert outcome["before"] == 1 and outcome["after"] == 0
    assert outcome["exitcode"] == -signal.SIGTERM  # the cluster sees the death it would have seen


def test_a_sigterm_the_kernel_hands_to_another_thread_still_ends_the_worker(site):
    # An idle worker's main thread sits in a read of its task queue; a Python signal handler runs only there. The
    # main thread here blocks SIGTERM, so the kernel must give it to another thread (the heartbeat, the feeder):
    # with a handler, the worker outlived its stop (its stacks printed by the harness); a thread in sigwait takes it.
    outcome = worker_script(site, "sigterm-to-another-thread")
    assert outcome["before"] == 1 and outcome["after"] == 0
    assert outcome["exitcode"] == -signal.SIGTERM


def test_a_killed_worker_leaves_its_rows_to_the_staleness_sweep(site):
    # SIGKILL runs no code: the rows stay until the heartbeat-based sweep removes them (tested in test_lease).
    outcome = worker_script(site, "sigkill")
    assert outcome["before"] == 1 and outcome["after"] == 1 and outcome["exitcode"] == -signal.SIGKILL


def _warm_rows(database: Path) -> list[str]:
    with sqlite3.connect(database, timeout=30) as conn:
        return [row[0] for row in conn.execute("SELECT worker FROM models_registry_warmmodel")]


def test_stopping_qcluster_removes_the_warm_rows_of_its_workers(tmp_path):
    """End to end: a real `qcluster` runs a job (its worker loads MiDaS_small and records it warm), then
    `qcluster` is sent SIGTERM, as `make run`'s Ctrl-C or a service manager does: the row goes with the worker."""
    weights = tmp_path / "midas_v21_small_256.pt"
    write_weights(det_numpy_state_dict("MiDaS_small"), weights, "pt", {})
    site = make_site(tmp_path / "site", DEPTHSITE_WORKERS="1")
    running = start_site(site, weights, database_url=site.env()["DATABASE_URL"])
    try:
        job = running.submit(images.jpeg(160, 120))
        assert running.wait([job["id"]], timeout=240)[job["id"]]["status"] == "succeeded"
        workers = _warm_rows(site.root / "db.sqlite3")
        # one name for one process: the job's attempt and the warm row both say node:pid:start
        assert workers == [running.row(job["id"])["worker"]]
        cluster = running.processes["qcluster"]
        cluster.send_signal(signal.SIGTERM)
        cluster.wait(timeout=60)
    finally:
        stop_site(running)
    assert _warm_rows(site.root / "db.sqlite3") == [], running.log_tail()


def test_the_artifact_build_a_worker_starts_can_be_stopped_by_sigterm():
    # A worker blocks SIGTERM (a thread of its own takes it) and a child inherits the mask across exec: the build
    # child unblocks it, so `systemctl stop` ends a build too. Run as the worker runs it, with SIGTERM blocked.
    script = ("import signal, sys, time; from inference.runtime import build_process as b; "
              "b.accept_sigterm(); print('ready', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", script], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}))
    try:
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=10) == -signal.SIGTERM
    finally:
        child.kill()
        child.stdout.close()


def test_the_build_child_unblocks_sigterm_before_anything_else(monkeypatch):
    from inference.runtime import build_process

    class Called(Exception):
        pass

    def accept():
        raise Called

    monkeypatch.setattr(build_process, "accept_sigterm", accept)
    with pytest.raises(Called):
        build_process.main(["1"])
