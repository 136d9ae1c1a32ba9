"""Depth jobs under faults: workers killed mid-job, a cluster restarted with jobs queued, PostgreSQL restarted.

The site runs for real (depthsite/testing/e2e.py: `manage.py qcluster` + `runserver` on 127.0.0.1, generated
MiDaS_small weights imported, jobs submitted through the HTTP API). Figures come from the job rows (status,
attempts) and from the cluster's own log, where every finished execution says "depth job <id> succeeded"
and every execution whose result was thrown away says "changed while it ran": a job that succeeded more
than once, or ran to the end a second time, was run twice.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import requests
from PIL import Image

from bench.faultlib import common
from bench.faultlib.common import MANAGE, PYTHON, Result, Workspace, new_site, spawn, stop
from depthsite.testing import images
from depthsite.testing.e2e import RunningSite, start_site, stop_site

SITE_ENV = {"DEPTHSITE_WORKERS": "1", "DEPTHSITE_JOB_MAX_ATTEMPTS": "3", "DEPTHSITE_JOB_TIMEOUT": "120",
            "DEPTHSITE_UPLOAD_RATE": "100000/hour", "DEPTHSITE_WRITE_RATE": "100000/hour"}
REDIS_URL = os.environ.get("DEPTHSITE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def photo(seed: int, width: int = 1600, height: int = 1200) -> bytes:
    """A photo no other job sent (no result reuse), big enough that writing every output takes a while."""
    rng = np.random.default_rng(seed)
    base = np.asarray(Image.fromarray(images.photo_array(320, 240)).resize((width, height)), dtype=np.int16)
    noisy = np.clip(base + rng.integers(-12, 12, size=base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noisy).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def redis_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1):
            return True
    except OSError:
        return False


def _adopt(running: RunningSite) -> None:
    """Let the bench's exit handler kill the site's processes too (Ctrl-C, an exception)."""
    for process in running.processes.values():
        common._children.append(process)
    common.on_exit(lambda: stop_site(running))


def _start(workspace: Workspace, name: str, *, database_url: str | None = None, **env: str) -> RunningSite:
    extra = {**SITE_ENV, **env}
    if database_url:
        extra["DATABASE_URL"] = database_url
        root = workspace.root / name
        shutil.rmtree(root, ignore_errors=True)
        site = new_site(root, **extra)  # migrate on that database
    else:
        site = workspace.site(name, **extra)
    running = start_site(site, workspace.checkpoint(), database_url=database_url or site.env()["DATABASE_URL"])
    _adopt(running)
    return running


def _cluster_log(running: RunningSite) -> str:
    return "\n".join(path.read_text(errors="replace") for name, path in running.logs.items() if name != "web")


def _runs(running: RunningSite, job_ids: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Per job: executions that recorded success, and executions whose result was discarded (from the logs)."""
    log = _cluster_log(running)
    succeeded = {job: len(re.findall(rf"depth job {job} succeeded", log)) for job in job_ids}
    discarded = {job: len(re.findall(rf"depth job {job} changed while it ran", log)) for job in job_ids}
    return succeeded, discarded


def _wait(running: RunningSite, job_ids: list[str], timeout: float) -> dict[str, dict]:
    """Final API bodies of the jobs that ended within `timeout` (the others are missing: lost)."""
    deadline = time.monotonic() + timeout
    done: dict[str, dict] = {}
    while time.monotonic() < deadline and len(done) < len(job_ids):
        for job in job_ids:
            if job not in done:
                try:
                    body = running.get(job)
                except (AssertionError, requests.RequestException):
                    continue
                if body["status"] in ("succeeded", "failed"):
                    done[job] = body
        time.sleep(0.5)
    return done


def _job_figures(result: Result, running: RunningSite, job_ids: list[str], done: dict[str, dict]) -> None:
    succeeded, discarded = _runs(running, job_ids)
    lost = [job for job in job_ids if done.get(job, {}).get("status") != "succeeded"]
    twice = [job for job in job_ids if succeeded[job] > 1 or (succeeded[job] and discarded[job])]
    leftovers = [p.name for job in job_ids if (running.media / "results" / job).exists()
                 for p in (running.media / "results" / job).iterdir() if p.name.startswith(".tmp-")]
    result.figures.update({
        "jobs": len(job_ids),
        "succeeded": sum(1 for job in job_ids if done.get(job, {}).get("status") == "succeeded"),
        "jobs lost": len(lost),
        "run twice": len(twice),
        "max attempts": max((done[job]["attempts"] for job in done), default=0),
    })
    result.details.append({"lost": {job: done.get(job, running.row(job)) for job in lost}, "twice": twice,
                           "leftover temporary files": leftovers})
    result.expect(not lost, f"{len(lost)} job(s) lost or failed")
    result.expect(not twice, f"{len(twice)} job(s) run twice")


def worker_kill(workspace: Workspace) -> Result:
    """SIGKILL the worker in the middle of a job, N times; every job still succeeds, once."""
    result = Result("worker-kill")
    kills = 2 if workspace.quick else 10
    running = _start(workspace, "worker-kill")
    job_ids, recovery = [], []
    try:
        for n in range(kills):
            job = running.submit(photo(1000 + n), f"kill-{n}.jpg", outputs="all")["id"]
            job_ids.append(job)
            pid = running.wait_running(job, attempts=1, timeout=180)
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            body = _wait(running, [job], timeout=240).get(job)
            if body is not None:
                recovery.append(time.monotonic() - killed)
        done = _wait(running, job_ids, timeout=60)
        result.runs = kills
        _job_figures(result, running, job_ids, done)
        result.figures["recovery p50 s"] = common.percentile(recovery, 50)
        result.figures["recovery max s"] = max(recovery) if recovery else None
    finally:
        stop_site(running)
    return result


def _restart_once(workspace: Workspace, name: str, count: int, **env: str) -> tuple[Result, RunningSite]:
    result = Result(name)
    running = _start(workspace, name, **env)
    try:
        jobs = [running.submit(photo(2000, 800, 600), "running.jpg", outputs="png,npy")["id"]]
        running.wait_running(jobs[0], attempts=1, timeout=180)
        # A graceful stop while a job runs; more jobs arrive while no cluster is up; then a new cluster.
        stop(running.processes["qcluster"], grace=60)
        jobs += [running.submit(photo(2000 + n, 800, 600), f"queued-{n}.jpg", outputs="png,npy")["id"]
                 for n in range(1, count)]
        queued = sum(1 for job in jobs if running.row(job)["status"] == "queued")
        log = running.site.root / "qcluster-2.log"
        process = spawn([PYTHON, MANAGE, "qcluster"], env=running.site.env(DEPTHSITE_LOG_LEVEL="INFO"), log=log)
        running.processes["qcluster"], running.logs["qcluster-2"] = process, log
        done = _wait(running, jobs, timeout=300)
        result.runs = 1
        _job_figures(result, running, jobs, done)
        result.figures["queued at restart"] = queued
    finally:
        stop_site(running)
    return result, running


def qcluster_restart(workspace: Workspace) -> Result:
    """Stop the cluster with jobs queued (one running), start a new one: all jobs end, each run once."""
    count = 3 if workspace.quick else 6
    orm, _ = _restart_once(workspace, "qcluster-restart-orm", count)
    orm.figures = {f"orm {key}": value for key, value in orm.figures.items()}
    result = orm
    if redis_reachable():
        queue = f"bench_{uuid.uuid4().hex[:10]}"
        try:
            redis_result, _ = _restart_once(workspace, "qcluster-restart-redis", count, REDIS_URL=REDIS_URL,
                                            DEPTHSITE_QUEUE_NAME=queue)
        finally:
            _redis_forget(queue)
        result.runs += redis_result.runs
        result.figures.update({f"redis {key}": value for key, value in redis_result.figures.items()})
        result.details += redis_result.details
        if redis_result.verdict != common.PASS:
            result.verdict = redis_result.verdict
            result.notes += [f"redis: {note}" for note in redis_result.notes]
    else:
        result.notes.append("Redis not reachable on 127.0.0.1:6379: ORM broker only")
    return result


def _redis_forget(queue: str) -> None:
    try:
        import redis

        client = redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"django_q:{queue}:*"):
            client.delete(key)
    except Exception:  # noqa: BLE001 - best effort: a unique name never collides anyway
        pass


# --- PostgreSQL -----------------------------------------------------------------------------------------


def _pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return found[-1].parent if found else None


class PrivatePostgres:
    """A throwaway cluster (initdb) on a free loopback port in a temporary folder; never the machine's own."""

    def __init__(self, folder: Path):
        self.bin = _pg_bin()
        self.folder = folder
        self.data = folder / "data"
        self.port = common.free_port()
        self.user: list[str] = []
        if os.geteuid() == 0:
            # initdb refuses to run as root: run the cluster as an unprivileged system user.
            for name in ("postgres", "nobody"):
                if subprocess.run(["id", "-u", name], capture_output=True).returncode == 0:
                    self.user = ["runuser", "-u", name, "--"]
                    shutil.chown(folder, name)
                    break

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*self.user, *args], capture_output=True, text=True, timeout=timeout)

    def start(self) -> None:
        done = self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "bench",
                         "--no-sync", "-E", "UTF8")
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stderr.strip()[-300:]}")
        self._ctl("start")
        common.on_exit(self.destroy)

    def _ctl(self, action: str, *extra: str) -> None:
        options = f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        done = self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-w", "-t", "60",
                         "-l", str(self.folder / "postgres.log"), action, *extra)
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl {action} failed: {done.stderr.strip()[-300:]}")

    def restart(self) -> None:
        self._ctl("restart", "-m", "fast")

    def url(self, database: str) -> str:
        return f"postgres://bench@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        done = self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "bench", name)
        if done.returncode != 0:
            raise RuntimeError(f"createdb failed: {done.stderr.strip()[-300:]}")

    def destroy(self) -> None:
        if self.data.exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=60)
        shutil.rmtree(self.folder, ignore_errors=True)


def postgres_restart(workspace: Workspace) -> Result:
    """Jobs running on a private PostgreSQL; the server restarts (fast shutdown) mid-load; all jobs still end."""
    result = Result("postgres-restart")
    if _pg_bin() is None:
        return result.skip("no PostgreSQL binaries under /usr/lib/postgresql")
    count = 3 if workspace.quick else 6
    folder = Path(workspace.root) / "postgres"
    folder.mkdir(exist_ok=True)
    folder.chmod(0o755)
    workspace.root.chmod(0o755)
    postgres = PrivatePostgres(folder)
    try:
        postgres.start()
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return result.skip(f"cannot start a private PostgreSQL: {exc}")
    postgres.create_database("bench")
    env = {}
    queue = ""
    if redis_reachable():
        queue = f"bench_{uuid.uuid4().hex[:10]}"
        env = {"REDIS_URL": REDIS_URL, "DEPTHSITE_QUEUE_NAME": queue}
    try:
        running = _start(workspace, "postgres-restart", database_url=postgres.url("bench"), **env)
        try:
            jobs = [running.submit(photo(3000 + n, 1200, 900), f"pg-{n}.jpg", outputs="all")["id"]
                    for n in range(count)]
            running.wait_running(jobs[0], attempts=1, timeout=180)
            began = time.monotonic()
            postgres.restart()
            outage = time.monotonic() - began
            # Requests during and right after the restart: what clients saw.
            statuses = []
            for n in range(10):
                try:
                    statuses.append(running.session().get(f"{running.base_url}/api/predictions/{jobs[-1]}/",
                                                          timeout=30).status_code)
                except requests.RequestException:
                    statuses.append(0)
                time.sleep(0.2)
            done = _wait(running, jobs, timeout=300)
            result.runs = 1
            _job_figures(result, running, jobs, done)
            result.figures["broker"] = "redis" if queue else "orm"
            result.figures["restart s"] = round(outage, 1)
            result.figures["5xx after restart"] = sum(1 for s in statuses if s >= 500 or s == 0)
        finally:
            stop_site(running)
    finally:
        if queue:
            _redis_forget(queue)
        postgres.destroy()
    return result
