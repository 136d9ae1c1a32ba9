"""Jobs no worker is running: queued again or failed for good, their staging folders swept; anonymous jobs expired.

A job whose worker died is found again, by the next worker that starts on its node, by a live worker's
heartbeat once its lease ran out, or by the periodic recovery, and queued again until it has used up its
attempts; then it fails with that reason.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import time
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from depthsite.choices import RunStatus
from depthsite.units import format_size
from inference.choices import JobErrorCode
from inference.media import STAGING_PREFIX, media_staging_root
from inference.models import DepthJob
from inference.services.job_state import job_seen, job_transition
from inference.services.jobs import depth_job_delete, depth_job_enqueue, task_broker
from inference.worker import RECOVERY_GRACE_SECONDS, job_lease_seconds, job_timeout, worker_alive

logger = logging.getLogger(__name__)

_STAGING_NAME = re.compile(r"^\.tmp-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})-[0-9a-f]+$")


def retry_after() -> int:
    """How long a queued job may wait for a worker before its task counts as lost (Q_CLUSTER retry)."""
    return int(settings.Q_CLUSTER.get("retry") or job_timeout() + 60)


def job_max_attempts() -> int:
    """Starts of one job (the first run and the re-runs after a dead worker) before it fails for good."""
    return max(1, int(settings.Q_CLUSTER.get("max_attempts") or 1))


def warm_stale_seconds() -> int:
    """A warm-model row whose worker has not beaten for this long belongs to a dead worker."""
    return 10 * job_lease_seconds()


def _interrupted_message(attempts: int) -> str:
    return (f"the worker running this job stopped {attempts} time(s) before it finished (killed, out of memory, "
            f"or over the {job_timeout()} s job timeout); try a smaller image or a smaller model")


def depth_job_fail_exhausted(*, job: DepthJob) -> bool:
    """Fail a job whose attempts are used up (its workers kept dying); False when the row moved on meanwhile."""
    observed = job_seen(job)
    job.fail(_interrupted_message(job.attempts), JobErrorCode.INTERRUPTED)
    failed = job_transition(job_id=job.pk, expect=observed, status=job.status, error=job.error,
                            error_code=job.error_code, finished_at=job.finished_at, lease_until=None)
    if failed:
        logger.warning("depth job %s failed after %d interrupted attempt(s)", job.pk, job.attempts)
    else:
        job.refresh_from_db()
    return failed


def depth_jobs_recover() -> dict[str, list[str]]:
    """Queue again what no worker is running: jobs whose worker died, and queued jobs whose task may be lost.

    Runs when a worker process starts (so a killed worker's job is picked up at once) and on a
    schedule. A job that has used its attempts fails with that reason instead of looping forever.
    Re-queuing a job that still has a task somewhere is harmless: the second delivery finds it
    claimed or finished and does nothing.
    """
    requeued: list[str] = []
    failed: list[str] = []
    _recover_running(DepthJob.objects.filter(status=RunStatus.RUNNING), requeued, failed)

    # A queued job waits at most `retry` for a worker under a healthy broker; past that its task may be
    # lost (Redis pops a task before running it), so it gets a fresh one.
    stale_before = timezone.now() - timedelta(seconds=retry_after())
    for job in DepthJob.objects.filter(status=RunStatus.QUEUED, queued_at__lt=stale_before).only(
            "id", "status", "queued_at"):
        now = timezone.now()
        if job_transition(job_id=job.pk, expect={"status": RunStatus.QUEUED, "queued_at": job.queued_at},
                          queued_at=now):
            logger.warning("depth job %s has waited since %s; queued again", job.pk, job.queued_at)
            depth_job_enqueue(job.pk)
            requeued.append(str(job.pk))
    from models_registry.services.warm import warm_models_stale_remove

    warm_models_stale_remove(older_than=timedelta(seconds=warm_stale_seconds()))
    return {"requeued": requeued, "failed": failed}


def depth_jobs_leases_recover() -> dict[str, list[str]]:
    """Queue again the running jobs whose lease ran out (their worker died, on whatever node).

    One indexed query when nothing expired, so every live worker's heartbeat runs it: a dead node's job
    waits about one lease (DEPTHSITE_JOB_LEASE) for another node, not the 2-minute schedule. Two workers
    finding the same job race on a conditional update; one wins."""
    requeued: list[str] = []
    failed: list[str] = []
    _recover_running(DepthJob.objects.filter(status=RunStatus.RUNNING, lease_until__lt=timezone.now()),
                     requeued, failed)
    return {"requeued": requeued, "failed": failed}


def _broker_backlog() -> int | None:
    """Tasks waiting in the broker's list (one LLEN on Redis); None when it cannot be read."""
    try:
        return int(task_broker().queue_size() or 0)
    except Exception:
        logger.exception("could not read the task broker's queue size")
        return None


def depth_jobs_stranded_requeue() -> list[str]:
    """Give a fresh task to queued jobs whose task sits in no broker list: called by an idle worker's heartbeat.

    A cluster's pusher takes tasks from Redis before a worker is free (up to `queue_limit`); a node killed
    then loses them (Redis has no receipts), and their jobs stay queued. When this worker is idle, the
    broker's list is empty and a job has been queued for more than a lease, its task is in some cluster's
    hands, a dead one's or a busy one's: a second task is harmless (the later delivery finds the job
    claimed or finished and does nothing), a lost one would wait for the `retry` window. The conditional
    update on queued_at lets one worker per lease period do it."""
    stale_before = timezone.now() - timedelta(seconds=job_lease_seconds())
    waiting = list(DepthJob.objects.filter(status=RunStatus.QUEUED, queued_at__lt=stale_before)
                   .order_by("queued_at").values_list("pk", "queued_at")[:100])
    if not waiting or _broker_backlog() != 0:
        return []
    requeued = []
    for pk, queued_at in waiting:
        if job_transition(job_id=pk, expect={"status": RunStatus.QUEUED, "queued_at": queued_at},
                          queued_at=timezone.now()):
            logger.warning("depth job %s has been queued since %s with no task in the broker; queued again",
                           pk, queued_at)
            depth_job_enqueue(pk)
            requeued.append(str(pk))
    return requeued


def _recover_running(running, requeued: list[str], failed: list[str]) -> None:
    for job in running.only("id", "status", "attempts", "worker", "started_at", "lease_until"):
        if worker_alive(worker=job.worker, started_at=job.started_at, lease_until=job.lease_until):
            continue
        if job.attempts >= job_max_attempts():
            if depth_job_fail_exhausted(job=job):
                failed.append(str(job.pk))
            continue
        observed = job_seen(job)
        job.requeue()
        if job_transition(job_id=job.pk, expect=observed, status=job.status, worker="", lease_until=None,
                          queued_at=job.queued_at):
            logger.warning("depth job %s: its worker %s stopped during attempt %d; queued again",
                           job.pk, observed["worker"] or "?", job.attempts)
            depth_job_enqueue(job.pk)
            requeued.append(str(job.pk))


def results_staging_sweep(*, max_age_seconds: float | None = None) -> list[str]:
    """Remove `.tmp-<job>-*` staging folders left under the results root by a killed worker; returns their names.

    A folder goes when nothing was written in it for longer than a job may run (`timeout` plus the grace
    the recovery allows), and its job is not running in a live worker: a write in progress is never touched.
    """
    root = media_staging_root()
    bound = job_timeout() + RECOVERY_GRACE_SECONDS if max_age_seconds is None else max_age_seconds
    now = time.time()
    swept: list[str] = []
    try:
        entries = [entry for entry in os.scandir(root) if entry.name.startswith(STAGING_PREFIX)]
    except FileNotFoundError:
        return swept
    for entry in entries:
        found = _STAGING_NAME.match(entry.name)
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < bound:
                continue
        except FileNotFoundError:
            continue  # renamed into place or removed meanwhile
        if found:
            job = DepthJob.objects.filter(pk=found.group(1)).only("id", "status", "worker", "started_at",
                                                                  "lease_until").first()
            if job is not None and job.status == RunStatus.RUNNING and worker_alive(
                    worker=job.worker, started_at=job.started_at, lease_until=job.lease_until):
                continue
        path = Path(entry.path)
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
        logger.warning("removed the results staging folder %s left by a stopped worker", entry.name)
        swept.append(entry.name)
    return swept


def depth_jobs_expire(*, now=None) -> dict[str, int]:
    """Delete anonymous jobs created more than DEPTHSITE_ANON_RETENTION seconds ago, with their files.

    Each goes through `depth_job_delete`, so its upload, preview and results follow once the deletion commits.
    """
    cutoff = (now or timezone.now()) - timedelta(seconds=settings.DEPTHSITE_ANON_RETENTION)
    expired = DepthJob.objects.filter(owner__isnull=True, created_at__lt=cutoff).order_by("created_at", "id")
    jobs = freed = 0
    while batch := list(expired[:200]):  # fetched in batches, never iterated while deleting from it
        for job in batch:
            freed += depth_job_delete(job=job)["bytes"]
            jobs += 1
    if jobs:
        logger.info("expired %d anonymous depth job(s) older than %s (%s)", jobs, cutoff.isoformat(),
                    format_size(freed))
    return {"jobs": jobs, "bytes": freed}
