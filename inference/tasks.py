"""django-q2 tasks of depth jobs: each receives a job's id only, loads the row and calls one service."""
from __future__ import annotations

import logging

from inference.models import DepthJob

logger = logging.getLogger(__name__)


def depth_job_task(job_id: str) -> str:
    """Run a queued DepthJob; the row records progress and outcome, the return value is for the queue's log."""
    from inference.services.job_runs import depth_job_run
    from inference.services.workers import worker_heartbeat_start

    worker_heartbeat_start()  # renews the lease of the job this process runs, keeps its warm rows current
    job = DepthJob.objects.select_related("model").filter(pk=job_id).first()
    if job is None:
        logger.info("depth job %s no longer exists (deleted); nothing to do", job_id)
        return "missing"
    return depth_job_run(job=job).status


def depth_jobs_recover_task() -> str:
    """The scheduled sweep (see migration 0002): re-queue jobs that no worker is running, remove staging
    folders that killed workers left."""
    from inference.services.job_recovery import depth_jobs_recover, results_staging_sweep

    outcome = depth_jobs_recover()
    swept = results_staging_sweep()
    return f"requeued {len(outcome['requeued'])}, failed {len(outcome['failed'])}, swept {len(swept)} staging folder(s)"


def depth_jobs_expire_task() -> str:
    """The scheduled expiry (see migration 0005): anonymous jobs past DEPTHSITE_ANON_RETENTION go, files too; raw
    session keys stored by an older release during a rolling deploy become digests (inference.sessions); the folder
    cache's expired entries are deleted (depthsite.cache_sweep)."""
    from inference.services.batches import depth_batches_expire
    from inference.services.job_recovery import depth_jobs_expire

    from depthsite.cache_sweep import cache_sweep_expired
    from inference.sessions import session_keys_digest_stragglers

    outcome = depth_jobs_expire()
    batches = depth_batches_expire()
    digested = session_keys_digest_stragglers()
    swept = cache_sweep_expired()
    return (f"deleted {outcome['jobs']} anonymous job(s), {outcome['bytes']} bytes, {batches} empty batch(es)"
            + (f"; digested {digested} raw session key(s)" if digested else "")
            + (f"; swept {swept} expired cache entries" if swept else ""))
