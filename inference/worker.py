"""Worker identity and liveness: the name a process writes on the rows it owns, and whether that process still runs.

One name for every row a worker owns (a job's attempt, a warm network): `node:pid:start`, where the process's
start time tells a reused pid from the worker that died.
"""
from __future__ import annotations

import os
from datetime import timedelta

import psutil
from django.conf import settings
from django.utils import timezone

from models_registry import cachefs

# Another node's worker cannot be probed; django-q2 stops a task at its timeout, so a job still
# "running" this long after that has no live worker.
RECOVERY_GRACE_SECONDS = 60


def job_timeout() -> int:
    """How long django-q2 lets a worker run one task (Q_CLUSTER timeout)."""
    return int(settings.Q_CLUSTER.get("timeout") or 600)


def job_lease_seconds() -> int:
    """How long a running job's lease lasts (DEPTHSITE_JOB_LEASE); its worker renews it every third of that."""
    return max(3, int(getattr(settings, "DEPTHSITE_JOB_LEASE", 30) or 30))


def _process_start(pid: int) -> str:
    """When the process started, so a reused pid is not mistaken for the old worker ("" when it is gone)."""
    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except psutil.Error:
        return ""


def worker_id() -> str:
    """This process's name on the rows it owns (computed each time: a forked child is another worker)."""
    pid = os.getpid()
    return f"{cachefs.node_name()}:{pid}:{_process_start(pid)}"


def worker_alive(*, worker: str, started_at=None, lease_until=None) -> bool:
    """Whether the process a job row names may still be running it.

    A row with a lease (`lease_until`) is dead once the lease ran out, whatever node it is on; before that,
    another node's worker counts as alive and this node's is probed. A row without one (written before
    leases) falls back to the job timeout plus a grace since it started.
    """
    if lease_until is not None and lease_until <= timezone.now():
        return False
    try:
        node, pid_text, start = worker.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if node != cachefs.node_name():
        if lease_until is not None:
            return True
        if started_at is None:
            return False
        return timezone.now() - started_at < timedelta(seconds=job_timeout() + RECOVERY_GRACE_SECONDS)
    if pid == os.getpid():
        # A worker runs one task at a time: if this process is asking, its own earlier attempt is over.
        return False
    try:
        process = psutil.Process(pid)
        if start and f"{process.create_time():.2f}" != start:
            return False  # the pid now belongs to another process
        return process.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # it exists, and belongs to someone else: not provably dead
