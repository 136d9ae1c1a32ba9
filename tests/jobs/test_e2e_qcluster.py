"""Real end-to-end runs: `manage.py qcluster` + `runserver` subprocesses, jobs submitted through the HTTP API.

On the embedded default (ORM broker on a SQLite file) and, where present, on Redis + PostgreSQL: ten
MiDaS_small jobs all succeed with their files written; a worker killed with SIGKILL mid-job still gets
its job finished; a job whose worker keeps dying ends failed with that reason instead of looping.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from depthsite.testing.e2e import orm_site, redis_postgres_site, stop_site, unique_photo
from models_registry.detweights import det_numpy_state_dict
from models_registry.formats import write_weights
from tests.conftest import require_service

pytestmark = pytest.mark.slow
# One worker (the default: a model per process is big), two attempts, and a timeout whose retry
# window (timeout + 60 s) outlasts the test, so a finished kill test shows our recovery at work.
SITE_ENV = {"DEPTHSITE_WORKERS": "1", "DEPTHSITE_JOB_MAX_ATTEMPTS": "2", "DEPTHSITE_JOB_TIMEOUT": "120"}
SIZES = [(64, 48), (96, 72), (128, 96), (160, 120), (200, 150), (240, 180), (256, 192), (288, 216),
         (320, 240), (100, 320)]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "midas_v21_small_256.pt"
    write_weights(det_numpy_state_dict("MiDaS_small"), path, "pt", {})
    return path


def _orm_site(root: Path, weights: Path):
    return orm_site(root, weights, **SITE_ENV)


def _redis_postgres_site(root: Path, weights: Path):
    require_service("PostgreSQL", "127.0.0.1", 5432)
    require_service("Redis", "127.0.0.1", 6379)
    return redis_postgres_site(root, weights, **SITE_ENV)


@pytest.fixture(scope="module", params=["orm-sqlite", pytest.param("redis-postgres", marks=pytest.mark.services)])
def running(request, tmp_path_factory, weights):
    make = _orm_site if request.param == "orm-sqlite" else _redis_postgres_site
    running, cleanup = make(tmp_path_factory.mktemp(request.param), weights)
    running.broker = request.param
    try:
        yield running
    finally:
        stop_site(running)
        cleanup()


def test_a_worker_killed_mid_job_still_gets_its_job_finished(running):
    job = running.submit(unique_photo(1600, 1200, seed=1), "kill-once.jpg", outputs="all")
    pid = running.wait_running(job["id"], attempts=1)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    done = running.wait([job["id"]], timeout=180)[job["id"]]
    took = time.monotonic() - killed_at
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    assert running.row(job["id"])["worker"].rsplit(":", 2)[1] != str(pid)
    assert set(done["files"]) == {"png", "png16", "npy", "pfm", "side", "ply", "ply_preview"}
    for path in (running.media / "results" / job["id"]).iterdir():
        assert path.stat().st_size > 0 and not path.name.startswith(".tmp-")
    cluster_log = running.log("qcluster")
    assert "reincarnated worker" in cluster_log and "recovered depth jobs" in cluster_log
    print(f"\n[{running.broker}] worker {pid} killed mid-job; job finished on attempt 2 after {took:.1f} s")


def test_a_job_whose_worker_keeps_dying_fails_with_the_reason(running):
    job = running.submit(unique_photo(1600, 1200, seed=2), "kill-always.jpg", outputs="all")
    for attempt in (1, 2):
        os.kill(running.wait_running(job["id"], attempts=attempt), signal.SIGKILL)
    done = running.wait([job["id"]], timeout=120)[job["id"]]
    assert done["status"] == "failed" and done["error_code"] == "interrupted"
    assert "stopped 2 time(s)" in done["error"] and "smaller image" in done["error"]
    assert done["attempts"] == 2 and done["files"] == {}
    # failed for good: nothing runs it a third time
    time.sleep(2)
    assert running.get(job["id"])["status"] == "failed" and running.row(job["id"])["attempts"] == 2


def test_ten_jobs_through_the_api_all_succeed_with_files(running):
    started = time.monotonic()
    submitted = [running.submit(unique_photo(width, height, seed=100 + n), f"photo-{n}.jpg", outputs="png,npy")
                 for n, (width, height) in enumerate(SIZES)]
    assert all(job["status"] in ("queued", "running", "succeeded") for job in submitted)
    done = running.wait([job["id"] for job in submitted], timeout=300)
    took = time.monotonic() - started
    for job, (width, height) in zip(submitted, SIZES):
        body = done[job["id"]]
        assert body["status"] == "succeeded", body["error"]
        assert body["attempts"] == 1 and body["inference_ms"] > 0 and body["reused_from"] is None
        depth = np.load(running.media / "results" / job["id"] / "depth.npy")
        assert depth.shape == (height, width) and np.isfinite(depth).all()
        assert (running.media / "results" / job["id"] / "depth.png").stat().st_size > 0
    sample = done[submitted[-1]["id"]]
    download = running.session().get(sample["files"]["png"], timeout=30)
    assert download.status_code == 200 and download.headers["Content-Type"] == "image/png"
    assert download.content.startswith(b"\x89PNG")
    npy = running.session().get(sample["files"]["npy"], timeout=30)
    assert npy.headers["Content-Type"] == "application/octet-stream" and npy.content.startswith(b"\x93NUMPY")
    ms = sorted(done[job["id"]]["inference_ms"] for job in submitted)
    print(f"\n[{running.broker}] 10 jobs in {took:.1f} s; inference {ms[0]:.0f}..{ms[-1]:.0f} ms")


def test_the_same_photo_again_reuses_the_result(running):
    photo = unique_photo(128, 96, seed=500)
    first = running.wait([running.submit(photo, outputs="png")["id"]])
    second_id = running.submit(photo, "again.jpg", outputs="png")["id"]
    second = running.wait([second_id])[second_id]
    assert second["status"] == "succeeded" and second["reused_from"] == next(iter(first))
    assert second["inference_ms"] is None
