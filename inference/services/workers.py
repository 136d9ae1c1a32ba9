"""This process as a qcluster worker: the heartbeat that renews its job's lease and its warm rows, and its end
(it removes its own warm-model rows when stopped, SIGTERM included)."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from datetime import timedelta
from typing import Any, Iterator

from django.conf import settings
from django.utils import timezone

from inference.models import DepthJob
from inference.services.job_recovery import depth_jobs_leases_recover, depth_jobs_stranded_requeue
from inference.services.job_state import job_attempt, job_transition
from inference.worker import job_lease_seconds
from models_registry.services.warm import warm_models_exit_forget

logger = logging.getLogger(__name__)

# The attempt this process runs now ({pk: (worker, attempts)}), read by the heartbeat thread.
_running: dict[Any, tuple[str, int]] = {}
_running_lock = threading.Lock()
_heartbeat_pid: int | None = None


@contextlib.contextmanager
def attempt_heartbeat(*, job: DepthJob) -> Iterator[None]:
    """While the block runs this attempt, the heartbeat renews its lease."""
    with _running_lock:
        _running[job.pk] = (job.worker, job.attempts)
    try:
        yield
    finally:
        with _running_lock:
            _running.pop(job.pk, None)


def depth_job_lease_renew(*, job_id, worker: str, attempts: int) -> bool:
    """Extend the lease of one attempt; False when the row is no longer that attempt (recovered, deleted, over)."""
    until = timezone.now() + timedelta(seconds=job_lease_seconds())
    return job_transition(job_id=job_id, expect=job_attempt(worker=worker, attempts=attempts), lease_until=until)


def worker_heartbeat() -> dict[str, int]:
    """One beat of this worker process: renew the lease of the job it runs and keep its warm-model rows current."""
    with _running_lock:
        attempts = list(_running.items())
    renewed = sum(depth_job_lease_renew(job_id=pk, worker=worker, attempts=count)
                  for pk, (worker, count) in attempts)
    recovered = depth_jobs_leases_recover()
    if not attempts:
        recovered["requeued"] += depth_jobs_stranded_requeue()
    from inference.estimator import estimator_pool  # the pool of this process, whose networks the rows describe

    warm = estimator_pool().rows_heartbeat()
    return {"leases": renewed, "warm": warm, "requeued": len(recovered["requeued"])}


def _heartbeat_loop(stop: threading.Event | None = None) -> None:
    """Beat every third of the lease until `stop` is set (never, in a worker: the thread dies with its process)."""
    from django.db import connection

    stop = stop or threading.Event()
    while not stop.wait(job_lease_seconds() / 3):
        try:
            worker_heartbeat()
        except Exception:
            logger.exception("the worker heartbeat failed; it tries again in %d s", job_lease_seconds() // 3)
        finally:
            connection.close()  # this thread's own connection: never left half-open between beats


def worker_heartbeat_start() -> bool:
    """Start this process's heartbeat thread once (called by the worker's task); False when it already runs,
    or when tasks run inline in the caller (Q_CLUSTER sync: tests, a web process), which is no worker."""
    global _heartbeat_pid
    if settings.Q_CLUSTER.get("sync"):
        return False
    with _running_lock:
        if _heartbeat_pid == os.getpid():
            return False
        _heartbeat_pid = os.getpid()  # a forked child has no thread of its parent's: it starts its own
    threading.Thread(target=_heartbeat_loop, name="depthsite-heartbeat", daemon=True).start()
    return True


# How long a worker sent SIGTERM waits for its rows to go before it dies as it would have.
EXIT_FORGET_SECONDS = 5.0
_installed_pid: int | None = None


def worker_exit_hooks_install() -> bool:
    """In a qcluster worker (post_spawn): SIGTERM removes this process's warm rows, then ends it as before.

    A clean stop (`qcluster` sent SIGTERM or Ctrl-C, a recycled worker) runs the multiprocessing finalizer that
    the estimator pool arranged (`warm_models_forget_at_exit`). A worker sent SIGTERM itself (`systemctl stop`
    signals every process of the service, `kill PID`) would die at once by django-q2's default: here one thread
    of ours takes the signal (sigwait), deletes the rows, and lets the signal's default action end the process,
    so the exit status and the cluster's reaction stay those of a SIGTERM.

    Not a Python signal handler: one runs only in the main thread, between bytecodes, and the kernel may hand a
    process's signal to any thread that does not block it. An idle worker's main thread sits in a read of its task
    queue; a SIGTERM given to the heartbeat or the result queue's feeder thread then ran no handler until a task
    came, and the worker outlived its stop. So SIGTERM is blocked here, before the worker starts any thread (they
    inherit the mask), and only the waiting thread receives it. A child process inherits the mask too: the one a
    worker starts, the artifact build (inference.runtime.build_process), unblocks it first. False when tasks run
    inline (no worker) or when already installed.
    """
    global _installed_pid
    if settings.Q_CLUSTER.get("sync") or _installed_pid == os.getpid():
        return False
    _installed_pid = os.getpid()
    if threading.active_count() > 1:  # threads started before this one may still take SIGTERM (and skip the rows)
        logger.warning("%d thread(s) already run in this worker; SIGTERM may reach one of them and end the process "
                       "without removing its warm rows", threading.active_count() - 1)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_sigterm_waiter, name="depthsite-sigterm", daemon=True).start()
    return True


def _sigterm_waiter() -> None:
    signal.sigwait({signal.SIGTERM})
    from inference.estimator import estimator_pool

    # The task goes on running meanwhile: from here the pool writes no row (one written after the delete would
    # stay until the staleness sweep). The rows then go from a thread with its own connection, and both waits are
    # bounded: a database that hangs does not keep the worker.
    estimator_pool().rows_freeze(timeout=EXIT_FORGET_SECONDS)
    forgetting = threading.Thread(target=warm_models_exit_forget, name="depthsite-warm-exit", daemon=True)
    forgetting.start()
    forgetting.join(EXIT_FORGET_SECONDS)
    _die_of(signal.SIGTERM)


def _die_of(signum: int) -> None:
    """End the process as `signum`'s default action would: this thread unblocks it and sends it to itself."""
    if signal.getsignal(signum) == signal.SIG_DFL:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
        signal.pthread_kill(threading.get_ident(), signum)
    os._exit(128 + signum)  # a handler someone else set kept the process: leave as the shell reports a signal
