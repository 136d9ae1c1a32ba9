"""Receivers: a deleted job's files go with it; a starting worker picks up jobs whose worker died and arranges
that its warm-model rows go when it is stopped."""
from __future__ import annotations

import logging
from functools import partial

from django.conf import settings
from django.db import transaction
from django.db.models.signals import post_delete
from django.dispatch import receiver
from django_q.signals import post_spawn

from inference.models import DepthJob

logger = logging.getLogger(__name__)


@receiver(post_delete, sender=DepthJob, dispatch_uid="inference.depth_job_files")
def _depth_job_files_follow_row(sender, instance: DepthJob, **kwargs) -> None:
    # Every deletion (API, web, admin, a user's cascade) ends here; files go only if the row really went.
    from inference.services.job_results import depth_job_files_remove, depth_job_paths

    transaction.on_commit(partial(depth_job_files_remove, paths=depth_job_paths(job=instance)))


@receiver(post_spawn, dispatch_uid="inference.depth_jobs_recover")
def _recover_when_a_worker_starts(sender, proc_name: str = "", **kwargs) -> None:
    # django-q2 replaces a dead worker within a guard cycle; the replacement is the first process that can
    # tell the dead one's job is orphaned (the ORM broker would only re-deliver it after `retry`, Redis never).
    if settings.Q_CLUSTER.get("sync"):
        return  # tasks run inline (tests): no worker can have died
    from inference.services.job_recovery import depth_jobs_recover
    from inference.services.workers import worker_exit_hooks_install, worker_heartbeat_start

    worker_exit_hooks_install()  # a worker sent SIGTERM removes its warm-model rows before it dies

    # Beating from the start, not from a first task: an idle worker's heartbeat also picks up the jobs of
    # dead nodes once their lease runs out (depth_jobs_leases_recover).
    worker_heartbeat_start()
    try:
        outcome = depth_jobs_recover()
    except Exception:
        logger.exception("depth job recovery at the start of %s failed; the scheduled recovery will retry", proc_name)
        return
    if outcome["requeued"] or outcome["failed"]:
        logger.warning("%s recovered depth jobs: %s", proc_name, outcome)


@receiver(post_spawn, dispatch_uid="inference.models_preload")
def _preload_when_a_worker_starts(sender, proc_name: str = "", **kwargs) -> None:
    # post_spawn runs in the new worker process before it takes a task: DEPTHSITE_PRELOAD's models are warm
    # for the first job after a deploy, and for the replacement of a worker that died.
    if not settings.DEPTHSITE_PRELOAD or settings.Q_CLUSTER.get("sync"):
        return
    from inference.services.preload import models_preload

    try:
        models_preload()
    except Exception:
        logger.exception("DEPTHSITE_PRELOAD failed in %s; models will load on first use", proc_name)
