"""A depthsite running for real: `manage.py qcluster` and `manage.py runserver` subprocesses on an isolated site.

The site is a depthsite.testing.cli Site (its own database, weight cache and media folder) with generated
MiDaS_small weights imported, a user with an API token, and the real settings (sync off). Jobs go in
through the HTTP API; the test reads job rows straight from the site's database to find the worker
process it may kill.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import requests
from PIL import Image

from depthsite.testing import images
from depthsite.testing.cli import PROJECT_ROOT, Site, make_site

TERMINAL = ("succeeded", "failed")
POSTGRES_ADMIN_URL = os.environ.get("DEPTHSITE_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("DEPTHSITE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unique_photo(width: int, height: int, seed: int) -> bytes:
    """A photo no other job has sent (so no result is reused): a synthetic scene with seeded noise, as JPEG."""
    rng = np.random.default_rng(seed)
    base = np.asarray(Image.fromarray(images.photo_array(320, 240)).resize((width, height)), dtype=np.int16)
    noisy = np.clip(base + rng.integers(-12, 12, size=base.shape), 0, 255).astype(np.uint8)
    return images.encode(Image.fromarray(noisy), "JPEG", quality=90)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningSite:
    site: Site
    base_url: str
    token: str
    database_url: str
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    @property
    def media(self) -> Path:
        return self.site.root / "media"

    def session(self) -> requests.Session:
        session = requests.Session()
        session.headers["Authorization"] = f"Token {self.token}"
        return session

    def submit(self, image: bytes, name: str = "photo.jpg", **fields) -> dict:
        response = self.session().post(f"{self.base_url}/api/predictions/", files={"image": (name, image)},
                                       data=fields, timeout=60)
        assert response.status_code == 202, response.text
        return response.json()

    def get(self, job_id: str) -> dict:
        response = self.session().get(f"{self.base_url}/api/predictions/{job_id}/", timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def wait(self, job_ids: list[str], timeout: float = 240) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        done: dict[str, dict] = {}
        while time.monotonic() < deadline:
            for job_id in job_ids:
                if job_id not in done:
                    body = self.get(job_id)
                    if body["status"] in TERMINAL:
                        done[job_id] = body
            if len(done) == len(job_ids):
                return done
            time.sleep(0.3)
        pending = {job_id: self.row(job_id) for job_id in job_ids if job_id not in done}
        raise AssertionError(f"jobs still not finished after {timeout} s: {pending}\n{self.log_tail()}")

    def _connect(self):
        if self.database_url.startswith("sqlite"):
            return sqlite3.connect(self.database_url.split("///", 1)[1], timeout=30, isolation_level=None)
        import psycopg

        return psycopg.connect(self.database_url, autocommit=True)

    def _select(self, sql: str, job_ids: list[str], conn=None) -> list[tuple]:
        """Rows of `sql` (its `IN %s` filled with the jobs' ids) from the site's database, on `conn` or a
        connection of its own; the job's id first."""
        if conn is None:
            with contextlib.closing(self._connect()) as own:
                return self._select(sql, job_ids, own)
        if self.database_url.startswith("sqlite"):
            marks = ", ".join("?" * len(job_ids))
            found = conn.execute(sql.replace("%s", f"({marks})"), [uuid.UUID(j).hex for j in job_ids]).fetchall()
            return [(str(uuid.UUID(row[0])), *row[1:]) for row in found]
        found = conn.execute(sql.replace("IN %s", "= ANY(%s)"), ([uuid.UUID(j) for j in job_ids],)).fetchall()
        return [(str(row[0]), *row[1:]) for row in found]

    def row(self, job_id: str) -> dict:
        """status, attempts and worker of a job, from the database (the API does not show the worker)."""
        (_, status, attempts, worker), = self._select(
            "SELECT id, status, attempts, worker FROM inference_depthjob WHERE id IN %s", [job_id])
        return {"status": status, "attempts": attempts, "worker": worker}

    def wait_rows(self, job_ids: list[str], timeout: float = 240, every: float = 0.1) -> dict[str, dict]:
        """Wait for the jobs to end, reading their rows from the database (one query a round, the web server
        untouched: a benchmark's own polling then takes no CPU from the site); {id: {status, finished_at (a
        POSIX time), inference_ms}}."""
        deadline = time.monotonic() + timeout
        sql = "SELECT id, status, finished_at, inference_ms FROM inference_depthjob WHERE id IN %s"
        # One connection: a new one each round would cost PostgreSQL a process each time.
        with contextlib.closing(self._connect()) as conn:
            while time.monotonic() < deadline:
                rows = self._select(sql, job_ids, conn)
                if len(rows) == len(job_ids) and all(row[1] in TERMINAL for row in rows):
                    return {job_id: {"status": status, "finished_at": _posix(finished), "inference_ms": inference_ms}
                            for job_id, status, finished, inference_ms in rows}
                time.sleep(every)
        raise AssertionError(f"jobs still not finished after {timeout} s\n{self.log_tail()}")

    def wait_running(self, job_id: str, attempts: int, timeout: float = 120) -> int:
        """Poll until the job's attempt `attempts` is running; the pid of its worker."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.row(job_id)
            if row["status"] == "running" and row["attempts"] == attempts and row["worker"]:
                return int(row["worker"].rsplit(":", 2)[1])
            assert row["status"] not in TERMINAL, f"attempt {attempts} never ran: {row}"
            time.sleep(0.02)
        raise AssertionError(f"attempt {attempts} of {job_id} did not start: {self.row(job_id)}")

    def log_tail(self, chars: int = 4000) -> str:
        return "\n".join(f"--- {name}\n{path.read_text(errors='replace')[-chars:]}" for name, path in self.logs.items())

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")


def _posix(value) -> float:
    """A timestamp column as a POSIX time: a datetime (PostgreSQL) or ISO text in UTC (SQLite)."""
    when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()


def _start(site: Site, name: str, args: list[str], env: dict) -> tuple[subprocess.Popen, Path]:
    """`manage.py <args>`, or `python -m <module> ...` when args start with "-m", logging to <site>/<name>.log."""
    log = site.root / f"{name}.log"
    handle = open(log, "wb")
    command = [sys.executable, *args] if args[0] == "-m" else [sys.executable, str(PROJECT_ROOT / "manage.py"), *args]
    # Its own session: teardown signals the whole group (the cluster's workers, monitor and pusher).
    process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                               start_new_session=True)
    handle.close()
    return process, log


def _stop(process: subprocess.Popen) -> None:
    # SIGTERM to the leader only: qcluster stops its own children (a signal to each of them, which inherited
    # its handler, makes them all try to stop the cluster and hang). Whatever is left then gets SIGKILL.
    try:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if process.poll() is None:
        process.wait(timeout=10)


WEB_SERVERS = ("runserver", "gunicorn")


def _web_args(web: str, port: int) -> list[str]:
    if web == "gunicorn":  # the deployed web tier (deploy/gunicorn.conf.py), on a port of its own
        return ["-m", "gunicorn", "--config", str(PROJECT_ROOT / "deploy" / "gunicorn.conf.py"),
                "--bind", f"127.0.0.1:{port}", "depthsite.wsgi:application"]
    if web == "runserver":  # `make run`'s
        return ["runserver", "--noreload", f"127.0.0.1:{port}"]
    raise ValueError(f"web server {web!r} is not one of {WEB_SERVERS}")


def start_site(site: Site, weights: Path, database_url: str, web: str = "runserver") -> RunningSite:
    """Import the weights, create a user with a token, start the cluster and the web server (`web`)."""
    imported = site.manage("models", "import", str(weights), timeout=300)
    assert imported.returncode == 0, imported.stderr
    token = site.manage("shell", "-c", (
        "from django.contrib.auth import get_user_model; from rest_framework.authtoken.models import Token; "
        "user = get_user_model().objects.create_user('e2e', password='pw-e2e-12345'); "
        "print(Token.objects.create(user=user).key)"), timeout=120)
    assert token.returncode == 0, token.stderr
    port = free_port()
    env = site.env(DEPTHSITE_LOG_LEVEL="INFO")
    running = RunningSite(site=site, base_url=f"http://127.0.0.1:{port}", token=token.stdout.strip().splitlines()[-1],
                          database_url=database_url)
    try:
        for name, args in (("qcluster", ["qcluster"]), ("web", _web_args(web, port))):
            process, log = _start(site, name, args, env)
            running.processes[name], running.logs[name] = process, log
        _wait_answering(running)
    except BaseException as exc:
        try:
            stop_site(running)  # whatever went wrong (a slow first answer raised here once), no process outlives it
        except Exception as stopping:
            exc.add_note(f"stopping the site's processes then failed too: {stopping!r}")
        raise  # the failure to start is the one to read
    return running


def _wait_answering(running: RunningSite, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, process in running.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}\n{running.log_tail()}")
        try:
            if requests.get(f"{running.base_url}/api/predictions/", timeout=2,
                            headers={"Authorization": f"Token {running.token}"}).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):
            pass  # not listening yet, or its first answer is slow (a cold start compiles the modules)
        time.sleep(0.3)
    raise RuntimeError(f"the site did not answer within {timeout:.0f} s\n{running.log_tail()}")


def stop_site(running: RunningSite) -> None:
    """Stop every process, each even when stopping another failed; then raise the first failure."""
    failures = []
    for process in running.processes.values():
        try:
            _stop(process)
        except Exception as exc:  # a process that would not die: still stop the others
            failures.append(exc)
    if failures:
        for other in failures[1:]:
            failures[0].add_note(f"stopping another process failed too: {other!r}")
        raise failures[0]


def orm_site(root: Path, weights: Path, web: str = "runserver", **env: str) -> tuple[RunningSite, Callable[[], None]]:
    """A running site on SQLite with the ORM broker (the `make run` defaults); (site, cleanup)."""
    site = make_site(root, **env)
    return start_site(site, weights, database_url=site.env()["DATABASE_URL"], web=web), lambda: None


def redis_postgres_site(root: Path, weights: Path, web: str = "runserver",
                        **env: str) -> tuple[RunningSite, Callable[[], None]]:
    """A running site on a fresh PostgreSQL database with the Redis broker under a queue name of its own;
    (site, cleanup), where cleanup drops the database and the queue's keys."""
    import psycopg
    import redis

    name = f"depthsite_e2e_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    database_url = f"{POSTGRES_ADMIN_URL.rsplit('/', 1)[0]}/{name}"

    def cleanup() -> None:
        client = redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"django_q:{name}:*"):
            client.delete(key)
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    try:
        site = make_site(root, DATABASE_URL=database_url, REDIS_URL=REDIS_URL, DEPTHSITE_QUEUE_NAME=name, **env)
        running = start_site(site, weights, database_url=database_url, web=web)
    except BaseException:
        cleanup()
        raise
    return running, cleanup
