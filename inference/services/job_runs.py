"""One delivery of a job's task in a worker: claim the row, resolve the weights once, run the depth pass, record it.

A worker claims a job with a conditional update (so two deliveries never run one job at once), runs
estimator -> writers (inference.pipeline), and finishes or fails it with a message the user can act on.
Nothing here imports torch at module level.
"""
from __future__ import annotations

import logging
import time
from datetime import timedelta

from django.conf import settings

from depthsite.choices import RunStatus
from depthsite.exceptions import (
    ApplicationError,
    DigestMismatchError,
    DiskFullError,
    DownloadError,
    InvalidRequestError,
    LicenseError,
    NotFoundError,
    OfflineError,
    WeightFileError,
)
from inference.choices import JobErrorCode
from inference.exceptions import DeviceError, ImageError, InferenceError, OutOfMemoryError, RuntimeArtifactError
from inference.images import image_open, pixels_digest
from inference.media import media_open, media_remove
from inference.models import DepthJob
from inference.runtime.base import Estimator
from inference.services.job_recovery import depth_job_fail_exhausted, job_max_attempts
from inference.services.job_results import (
    input_preview_write,
    result_reusable,
    results_copy,
    results_folder,
    results_names,
    results_staged,
    results_stored_bytes,
)
from inference.services.job_state import Superseded, job_attempt_save, job_seen, job_transition
from inference.services.workers import attempt_heartbeat
from inference.worker import job_lease_seconds, job_timeout, worker_alive, worker_id
from models_registry.models import WeightFile
from models_registry.services.records import WeightsUnavailableNowError

logger = logging.getLogger(__name__)

RESULT_STEM = "depth"
ERROR_GENERIC = ("an internal error stopped this job (the details are in the worker's log); "
                 "re-running it may help, otherwise tell the site's administrator")


def _claim(job: DepthJob, me: str) -> bool:
    """queued (or running in a dead worker) -> running in this process; False when another delivery won."""
    observed = job_seen(job)
    job.start(worker=me)
    job.lease_until = job.started_at + timedelta(seconds=job_lease_seconds())
    return job_transition(job_id=job.pk, expect=observed, status=job.status, worker=job.worker,
                          attempts=job.attempts, started_at=job.started_at, finished_at=None, error="",
                          error_code="", lease_until=job.lease_until)


_FINISH_FIELDS = ("status", "result_files", "depth_min", "depth_max", "semantics", "weights_sha256",
                  "pixels_sha256", "weights_format", "device", "dtype", "load_ms", "inference_ms", "reused_from",
                  "finished_at", "results_bytes", "lease_until")
_FAIL_FIELDS = ("status", "error", "error_code", "finished_at", "lease_until")


class ModelGoneError(NotFoundError):
    """The job's model left the registry, or was disabled, after the upload: a message written for the uploader."""


# A job's error is read by whoever holds its id (anonymous uploaders included). Only the errors below are written
# for them and keep their words; every other ApplicationError comes from the registry, the cache or the
# configuration, and its text may name server paths, free bytes, settings or a mirror's URL: the job stores a
# fixed sentence for its kind, and the worker's log keeps the text (depth_job_run logs it with the job's id).
ERROR_DISK_FULL = "the server is out of disk space for this model; try again later or ask the operator"
ERROR_CONFIGURATION = "the server cannot fetch this model; ask the operator"
ERROR_LICENSE = "this site does not accept the licence of this model's weights; submit the photo again with another model"
ERROR_DOWNLOAD_CHECK = ("the model's downloaded weights did not pass their check; an administrator can see why on "
                        "the models page and retry the download")
ERROR_DOWNLOAD = ("the model's weights could not be downloaded; an administrator can see why on the models page and "
                  "retry the download")
ERROR_WEIGHTS = "the model's cached weights are unusable; an administrator must check them (manage.py models verify)"
ERROR_OUT_OF_MEMORY = "out of memory while processing this image; try a smaller image or a smaller model"
ERROR_BUSY = ("the server was short of memory or open files while loading the model (nothing is wrong with your "
              "photo); run the job again in a moment")
# DEPTHSITE_DEVICE (or a worker's --device) names a device this machine cannot run: the operator's configuration.
ERROR_DEVICE = "the server cannot run models on the device it is configured for; ask the operator"


def _offline_sentence(exc: OfflineError) -> str:
    model = exc.extra.get("model") or "the model"
    return (f"{model} is not cached on this node and the site is offline, so it cannot be downloaded; "
            "submit the photo again with another model, or ask the operator to import it")


def error_for(exc: BaseException) -> tuple[str, str]:
    """(message, code) stored on a failed job: what happened and what the user can do about it."""
    if isinstance(exc, OfflineError):
        return _offline_sentence(exc), JobErrorCode.OFFLINE
    # Download and weight-file messages name mirror folders, cache paths and may quote a file's first bytes, so
    # they stay in the log and on the registry's own records, which operators read.
    if isinstance(exc, DownloadError):
        return ERROR_DOWNLOAD, JobErrorCode.DOWNLOAD
    if isinstance(exc, WeightFileError):
        return ERROR_WEIGHTS, JobErrorCode.WEIGHTS
    if isinstance(exc, ImageError):
        return f"the uploaded image cannot be read: {exc.message}", JobErrorCode.IMAGE
    if isinstance(exc, ModelGoneError):
        return exc.message, JobErrorCode.MODEL
    if isinstance(exc, OutOfMemoryError):
        return exc.message, JobErrorCode.OUT_OF_MEMORY
    if isinstance(exc, DeviceError) or (isinstance(exc, InferenceError) and exc.extra.get("field") == "device"):
        return ERROR_DEVICE, JobErrorCode.INTERNAL  # names the setting's value and this machine's hardware
    if isinstance(exc, InferenceError) and not isinstance(exc, RuntimeArtifactError):  # not a build's paths, stderr
        return exc.message, JobErrorCode.INTERNAL  # preparing the uploader's image for the network
    if isinstance(exc, MemoryError):
        return ERROR_OUT_OF_MEMORY, JobErrorCode.OUT_OF_MEMORY
    if isinstance(exc, DiskFullError):
        return ERROR_DISK_FULL, JobErrorCode.INTERNAL
    if isinstance(exc, WeightsUnavailableNowError):  # a shortage of the moment: the weights are fine
        return ERROR_BUSY, JobErrorCode.INTERNAL
    if isinstance(exc, LicenseError):
        return ERROR_LICENSE, JobErrorCode.MODEL
    if isinstance(exc, (InvalidRequestError, NotFoundError)):  # DEPTHSITE_MODEL_MIRROR, a catalogue URL, no copy
        return ERROR_CONFIGURATION, JobErrorCode.MODEL
    if isinstance(exc, DigestMismatchError) and exc.extra.get("url"):
        return ERROR_DOWNLOAD_CHECK, JobErrorCode.DOWNLOAD
    if isinstance(exc, ApplicationError):
        return (f"the server could not run this job (error {JobErrorCode.INTERNAL.value}: {type(exc).__name__}); "
                "the details are in the worker's log: re-running it may help, otherwise tell the site's "
                "administrator", JobErrorCode.INTERNAL)
    return ERROR_GENERIC, JobErrorCode.INTERNAL


def depth_job_run(*, job: DepthJob) -> DepthJob:
    """Run one delivery of a job's task; safe to call any number of times for the same job."""
    if job.is_terminal:
        return job  # a re-delivery of a task whose job already ended
    me = worker_id()
    if job.status == RunStatus.RUNNING and worker_alive(worker=job.worker, started_at=job.started_at,
                                                        lease_until=job.lease_until):
        logger.info("depth job %s is running in %s; this delivery leaves it alone", job.pk, job.worker)
        return job
    if job.attempts >= job_max_attempts():
        depth_job_fail_exhausted(job=job)
        return job
    if not _claim(job, me):
        job.refresh_from_db()
        logger.info("depth job %s was taken by another delivery (%s)", job.pk, job.status)
        return job

    from django_q.exceptions import TimeoutException

    try:
        with attempt_heartbeat(job=job):
            _execute(job)
    except Superseded:
        logger.warning("depth job %s: attempt %d in %s no longer owns the job (deleted, or its lease ran out and "
                       "another attempt took it); its output was dropped", job.pk, job.attempts, me)
    except TimeoutException:
        job.fail(f"the job took longer than the {job_timeout()} s job timeout; try a smaller image or model",
                 JobErrorCode.TIMEOUT)
        job_attempt_save(job, _FAIL_FIELDS)
        raise  # django-q2 replaces a worker whose task timed out
    except Exception as exc:
        message, code = error_for(exc)
        if code == JobErrorCode.INTERNAL and not isinstance(exc, ApplicationError):
            logger.exception("depth job %s failed unexpectedly", job.pk)
        else:
            # The whole text, for the operator: the job itself may keep only a fixed sentence (error_for).
            logger.warning("depth job %s failed (%s, %s): %s", job.pk, type(exc).__name__, code,
                           exc.message if isinstance(exc, ApplicationError) else message)
        job.fail(message, code)
        job_attempt_save(job, _FAIL_FIELDS)
    return job


def _execute(job: DepthJob) -> None:
    model = job.model
    if model is None:
        raise ModelGoneError(f"the model {job.model_name} no longer exists in the registry; "
                             "submit the photo again with another model", extra={"model": job.model_name})
    if not model.enabled:
        raise ModelGoneError(f"the model {model.name} was disabled after this job was submitted; "
                             "submit the photo again with another model", extra={"model": model.name})
    if not job.image or not job.image.name:
        raise ImageError("the job has no stored image", extra={"field": "image"})
    try:
        stored = media_open(job.image.name)
    except FileNotFoundError:
        raise ImageError("the file is missing", extra={"field": "image", "kind": "missing"}) from None
    with stored:
        loaded = image_open(stored, max_pixels=settings.DEPTHSITE_MAX_IMAGE_PIXELS)
    job.pixels_sha256 = pixels_digest(loaded.rgb)
    input_preview_write(job=job, rgb=loaded.rgb)

    from inference.estimator import estimator_get
    from inference.pipeline import depth_pass
    from models_registry.services.resolve import weights_use

    def stored_or_estimator(weight_file: WeightFile) -> DepthJob | Estimator:
        # The weights are resolved once per job: the file that would run also keys the result reuse.
        if settings.DEPTHSITE_REUSE_RESULTS:
            earlier = result_reusable(job=job, weights_sha256=weight_file.sha256)
            if earlier is not None:
                return earlier
        return estimator_get(model=model, weight_file=weight_file)

    started = time.perf_counter()
    _, ready = weights_use(model=model, use=stored_or_estimator)
    if isinstance(ready, DepthJob):
        files = results_copy(earlier=ready, job=job)
        job.finish(result_files=files, depth_min=ready.depth_min, depth_max=ready.depth_max,
                   semantics=ready.semantics, weights_sha256=ready.weights_sha256,
                   weights_format=ready.weights_format, device=ready.device, dtype=ready.dtype, load_ms=None,
                   inference_ms=None, reused_from=ready)
        _commit_results(job)
        return
    load_ms = (time.perf_counter() - started) * 1000
    with results_staged(job=job) as folder:
        result, written = depth_pass(estimator=ready, image=loaded, folder=folder, stem=RESULT_STEM,
                                     formats=job.outputs, colormap=job.colormap, fov_degrees=job.fov_degrees,
                                     previews=True)
    job.finish(result_files=results_names(job=job, written=written), depth_min=result.depth_min,
               depth_max=result.depth_max, semantics=result.semantics, weights_sha256=result.weights_sha256,
               weights_format=result.weights_format, device=result.device, dtype=result.dtype, load_ms=load_ms,
               inference_ms=result.inference_ms)
    _commit_results(job)


def _commit_results(job: DepthJob) -> None:
    job.results_bytes = results_stored_bytes(job=job)
    if job_attempt_save(job, _FINISH_FIELDS):
        logger.info("depth job %s succeeded%s", job.pk, f" (reused {job.reused_from_id})" if job.reused_from_id else "")
        return
    if not DepthJob.objects.filter(pk=job.pk).exists():
        # Deleted while it ran: its files must not outlive it.
        media_remove([results_folder(job_id=job.pk) + "/"])
    logger.info("depth job %s changed while it ran (deleted or recovered); its result was not recorded", job.pk)
