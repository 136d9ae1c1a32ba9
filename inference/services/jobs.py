"""Depth jobs from upload to result files: create (web process, no torch), run (worker), delete, re-run, recover.

A job is saved first and queued on commit with its id only. A worker claims it with a conditional
update (so two deliveries never run one job at once), runs estimator -> writers, and finishes or
fails it with a message the user can act on. A job whose worker died is found again, by the next
worker that starts on its node or by the periodic recovery, and queued again until it has used up
its attempts; then it fails with that reason. Nothing here imports torch at module level.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import threading
import time
import uuid
from datetime import timedelta
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator

from django.conf import settings
from django.core.files import File
from django.db import transaction
from django.db.models import Count, F, Q, Sum
from django.utils import timezone

from depthsite.units import format_size
from depthsite.choices import RunStatus
from inference.choices import JobErrorCode
from inference.colormaps import COLORMAPS, DEFAULT_COLORMAP
from inference.exceptions import ImageError, InferenceError, OutOfMemoryError, QuotaExceededError
from inference.images import BROWSER_IMAGE_TYPES, image_check, image_open, pixels_digest
from inference.media import (
    RESULTS_DIR,
    STAGING_PREFIX,
    media_exists,
    media_fetch,
    media_folder_publish,
    media_open,
    media_put,
    media_remove,
    media_staging_root,
    media_usage,
)
from inference.models import DepthJob
from inference.worker import RECOVERY_GRACE_SECONDS, job_lease_seconds, job_timeout, worker_alive, worker_id
from inference.runtime.base import Estimator
from inference.writers import DEFAULT_FOV_DEGREES, fov_check, parse_formats
from models_registry import cachefs
from models_registry.catalogue import DEFAULT_MODEL
from depthsite.exceptions import (
    ApplicationError,
    ConflictError,
    DownloadError,
    NotFoundError,
    OfflineError,
    TooLargeError,
    InvalidRequestError,
    WeightFileError,
)
from models_registry.models import RegisteredModel, WeightFile
from models_registry.selectors import model_get
from models_registry.services.licences import model_license_check

logger = logging.getLogger(__name__)

DEFAULT_OUTPUTS = ("png",)
RESULT_STEM = "depth"
TASK = "inference.tasks.depth_job_task"
_HASH_CHUNK = 1024 * 1024
# Upright extensions by what Pillow recognised; the client's name is never trusted.
_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp",
               "TIFF": ".tif"}
PREVIEW_SUFFIX = ".preview.png"
_STAGING_NAME = re.compile(r"^\.tmp-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})-[0-9a-f]+$")

ERROR_GENERIC = ("an internal error stopped this job (the details are in the worker's log); "
                 "re-running it may help, otherwise tell the site's administrator")


# --- settings ------------------------------------------------------------------------------------


def _retry_after() -> int:
    return int(settings.Q_CLUSTER.get("retry") or job_timeout() + 60)


def job_max_attempts() -> int:
    """Starts of one job (the first run and the re-runs after a dead worker) before it fails for good."""
    return max(1, int(settings.Q_CLUSTER.get("max_attempts") or 1))


def warm_stale_seconds() -> int:
    """A warm-model row whose worker has not beaten for this long belongs to a dead worker."""
    return 10 * job_lease_seconds()


# --- create --------------------------------------------------------------------------------------


def _model_for_job(name: str) -> RegisteredModel:
    try:
        model = model_get(name=name or DEFAULT_MODEL, enabled_only=True)
    except NotFoundError as exc:
        # An unknown model is a mistake in the request (400), not a missing resource.
        raise InvalidRequestError(exc.message, extra={**exc.extra, "field": "model"}) from None
    model_license_check(model=model)  # refused before the upload is stored (403, under the model field)
    return model


def _colormap(name: str) -> str:
    value = (name or DEFAULT_COLORMAP).strip().lower()
    if value not in COLORMAPS:
        raise InvalidRequestError(f"unknown colormap {name!r}; choose one of: {', '.join(COLORMAPS)}",
                              extra={"field": "colormap"})
    return value


def upload_size_check(*, size: int) -> None:
    """TooLargeError (413) when an upload is over DEPTHSITE_MAX_UPLOAD_BYTES."""
    limit = settings.DEPTHSITE_MAX_UPLOAD_BYTES
    if limit and size > limit:
        raise TooLargeError(
            f"the file is {format_size(size)}, over the upload limit of {format_size(limit)}",
            extra={"field": "image", "kind": "too_many_bytes", "limit": limit, "size": size},
        )


def _sha256(upload: File) -> str:
    digest = hashlib.sha256()
    upload.seek(0)
    for chunk in upload.chunks(_HASH_CHUNK):
        digest.update(chunk)
    upload.seek(0)
    return digest.hexdigest()


def _client_name(name: str | None) -> str:
    cleaned = "".join(ch for ch in os.path.basename(name or "") if ch.isprintable())
    return cleaned[-255:] or "upload"


def depth_job_create(
    *,
    image: File,
    model: str = DEFAULT_MODEL,
    outputs: Iterable[str] | str | None = None,
    colormap: str = DEFAULT_COLORMAP,
    fov: float | str | None = None,
    owner=None,
    session_key: str = "",
    client_address: str = "",
) -> DepthJob:
    """Check an upload, store it in the media storage, save the job and queue it once the transaction commits.

    InvalidRequestError (400) for an unknown model, output or colormap; ImageError (400) for a file that is
    not a readable photo; TooLargeError/ImageTooLargeError (413) for too many bytes or pixels;
    QuotaExceededError (429) when an anonymous session or address stores its quota already.
    """
    registered = _model_for_job(model)
    formats = parse_formats(list(outputs) if outputs and not isinstance(outputs, str) else (outputs or DEFAULT_OUTPUTS))
    chosen_colormap = _colormap(colormap)
    fov_degrees = fov_check(DEFAULT_FOV_DEGREES if fov is None or fov == "" else fov)
    size = int(image.size or 0)
    upload_size_check(size=size)
    anonymous = owner is None or not owner.is_authenticated
    if anonymous:
        anonymous_quota_check(session_key=session_key, client_address=client_address, size=size)
    image.seek(0)
    # Header first (format, size, pixel limit), then a decode that converts and copies nothing (see image_check).
    info = image_check(getattr(image, "file", image), max_pixels=settings.DEPTHSITE_MAX_IMAGE_PIXELS)
    sha256 = _sha256(image)

    job = DepthJob(
        owner=None if anonymous else owner,
        session_key=(session_key or "") if anonymous else "",
        client_address=(client_address or "") if anonymous else "",
        image_name=_client_name(image.name), image_sha256=sha256, image_size=size, image_format=info.format,
        image_width=info.width, image_height=info.height,
        model=registered, model_name=registered.name, outputs=formats, colormap=chosen_colormap,
        fov_degrees=fov_degrees,
    )
    extension = _EXTENSIONS.get(job.image_format, ".img")
    job.image.save(f"upload{extension}", image, save=False)
    try:
        with transaction.atomic():
            job.save()
            if anonymous:
                # Again with this row written: on SQLite the write lock now serialises concurrent uploads,
                # so two of them cannot both take the last place of a quota.
                anonymous_quota_check(session_key=job.session_key, client_address=job.client_address,
                                      size=size, saved=True)
            transaction.on_commit(partial(_depth_job_enqueue, job.pk))
    except BaseException:
        job.image.delete(save=False)  # no row points at it
        raise
    logger.info("depth job %s queued: %s, %dx%d %s, %s", job.pk, job.model_name, job.image_width,
                job.image_height, job.image_format, ",".join(formats))
    return job


def anonymous_usage(*, session_key: str, client_address: str) -> list[tuple[str, int, int]]:
    """[(whose, jobs, bytes stored)] of an anonymous uploader: its browser session and its address, each
    counted on its own (uploads and results)."""
    scopes = [("this browser session", Q(session_key=session_key)) if session_key else None,
              ("your address", Q(client_address=client_address)) if client_address else None]
    counted = []
    for label, condition in filter(None, scopes):
        usage = DepthJob.objects.filter(condition, owner__isnull=True).aggregate(
            jobs=Count("pk"), bytes=Sum(F("image_size") + F("results_bytes")))
        counted.append((label, usage["jobs"] or 0, usage["bytes"] or 0))
    return counted


def anonymous_quota_check(*, session_key: str, client_address: str, size: int, saved: bool = False) -> None:
    """QuotaExceededError (429) when this upload would take an anonymous session or address past
    DEPTHSITE_ANON_MAX_JOBS jobs or DEPTHSITE_ANON_MAX_BYTES stored bytes (uploads and results).

    `saved`: the upload's own row is already counted (the re-check inside the creating transaction)."""
    max_jobs = settings.DEPTHSITE_ANON_MAX_JOBS
    max_bytes = settings.DEPTHSITE_ANON_MAX_BYTES
    retention_days = max(1, round(settings.DEPTHSITE_ANON_RETENTION / 86400))
    for label, jobs, stored in anonymous_usage(session_key=session_key, client_address=client_address):
        if saved:
            jobs, stored = jobs - 1, stored - size
        if max_jobs and jobs + 1 > max_jobs:
            raise QuotaExceededError(
                f"anonymous quota reached: {label} already has {jobs} jobs stored (limit {max_jobs}, "
                f"DEPTHSITE_ANON_MAX_JOBS); delete some jobs, wait for them to expire after {retention_days} "
                "day(s), or sign in", extra={"kind": "quota_jobs", "limit": max_jobs, "used": jobs})
        if max_bytes and stored + size > max_bytes:
            raise QuotaExceededError(
                f"anonymous quota reached: {label} stores {format_size(stored)} and this upload would pass the "
                f"limit of {format_size(max_bytes)} (DEPTHSITE_ANON_MAX_BYTES); delete some jobs, wait for them "
                f"to expire after {retention_days} day(s), or sign in",
                extra={"kind": "quota_bytes", "limit": max_bytes, "used": stored})


_brokers: dict[int, Any] = {}


def _broker():
    """This process's django-q2 broker, made once: a broker per enqueue (async_task's default) opens a new Redis
    connection for every job (bench/scale.py counted one HELLO per job). Keyed by pid: a forked child makes its own."""
    from django_q.brokers import get_broker

    broker = _brokers.get(os.getpid())
    if broker is None:
        broker = _brokers[os.getpid()] = get_broker()
    return broker


def _depth_job_enqueue(job_id: uuid.UUID | str) -> None:
    from django_q.tasks import async_task

    try:
        task_id = async_task(TASK, str(job_id), task_name=f"depth-{job_id}", group="depth-jobs", broker=_broker())
    except Exception:
        # The row stays queued: the recovery queues it again, so a broker hiccup loses no job.
        logger.exception("could not queue depth job %s; the job recovery will queue it again", job_id)
        return
    DepthJob.objects.filter(pk=job_id).update(task_id=task_id or "")


# --- run -----------------------------------------------------------------------------------------


def _claim(job: DepthJob, me: str) -> bool:
    """queued (or running in a dead worker) -> running in this process; False when another delivery won."""
    observed = {"status": job.status, "attempts": job.attempts, "worker": job.worker}
    job.start(worker=me)
    job.lease_until = job.started_at + timedelta(seconds=job_lease_seconds())
    claimed = DepthJob.objects.filter(pk=job.pk, **observed).update(
        status=job.status, worker=job.worker, attempts=job.attempts, started_at=job.started_at,
        finished_at=None, error="", error_code="", lease_until=job.lease_until,
    )
    return bool(claimed)


# --- the worker's heartbeat ----------------------------------------------------------------------

# The attempt this process runs now ({pk: (worker, attempts)}), read by the heartbeat thread.
_running: dict[Any, tuple[str, int]] = {}
_running_lock = threading.Lock()
_heartbeat_pid: int | None = None


def depth_job_lease_renew(*, job_id, worker: str, attempts: int) -> bool:
    """Extend the lease of one attempt; False when the row is no longer that attempt (recovered, deleted, over)."""
    until = timezone.now() + timedelta(seconds=job_lease_seconds())
    return bool(DepthJob.objects.filter(pk=job_id, status=RunStatus.RUNNING, worker=worker,
                                        attempts=attempts).update(lease_until=until))


def worker_heartbeat() -> dict[str, int]:
    """One beat of this worker process: renew the lease of the job it runs and keep its warm-model rows current."""
    from models_registry.services.warm import warm_models_heartbeat

    with _running_lock:
        attempts = list(_running.items())
    renewed = sum(depth_job_lease_renew(job_id=pk, worker=worker, attempts=count)
                  for pk, (worker, count) in attempts)
    recovered = depth_jobs_leases_recover()
    if not attempts:
        recovered["requeued"] += depth_jobs_stranded_requeue()
    warm = warm_models_heartbeat(worker=worker_id())
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


class _Superseded(Exception):
    """This attempt no longer owns its job (its lease ran out and another attempt took it, or it was deleted)."""


def _still_this_attempt(job: DepthJob) -> bool:
    return DepthJob.objects.filter(pk=job.pk, status=RunStatus.RUNNING, worker=job.worker,
                                   attempts=job.attempts).exists()


def _save_running(job: DepthJob, fields: Iterable[str]) -> bool:
    """Write the outcome only while the row is still this attempt's: it may be deleted or recovered meanwhile."""
    values = {name: getattr(job, name) for name in fields}
    updated = DepthJob.objects.filter(pk=job.pk, status=RunStatus.RUNNING, worker=job.worker,
                                      attempts=job.attempts).update(**values)
    return bool(updated)


_FINISH_FIELDS = ("status", "result_files", "depth_min", "depth_max", "semantics", "weights_sha256", "pixels_sha256",
                  "weights_format", "device", "load_ms", "inference_ms", "reused_from", "finished_at", "results_bytes", "lease_until")
_FAIL_FIELDS = ("status", "error", "error_code", "finished_at", "lease_until")


def _interrupted_message(attempts: int) -> str:
    return (f"the worker running this job stopped {attempts} time(s) before it finished (killed, out of memory, "
            f"or over the {job_timeout()} s job timeout); try a smaller image or a smaller model")


def error_for(exc: BaseException) -> tuple[str, str]:
    """(message, code) stored on a failed job: what happened and what the user can do about it."""
    if isinstance(exc, OfflineError):
        return exc.message, JobErrorCode.OFFLINE
    # A job's error is read by whoever holds its id (anonymous jobs included); download and weight-file
    # messages name mirror folders, cache paths and may quote a file's first bytes, so they stay in the log
    # and on the registry's own records, which operators read.
    if isinstance(exc, DownloadError):
        return ("the model's weights could not be downloaded; an administrator can see why on the models page "
                "and retry the download", JobErrorCode.DOWNLOAD)
    if isinstance(exc, WeightFileError):
        return ("the model's cached weights are unusable; an administrator must check them "
                "(manage.py models verify)", JobErrorCode.WEIGHTS)
    if isinstance(exc, NotFoundError):
        return exc.message, JobErrorCode.MODEL
    if isinstance(exc, ImageError):
        return f"the uploaded image cannot be read: {exc.message}", JobErrorCode.IMAGE
    if isinstance(exc, OutOfMemoryError):
        return exc.message, JobErrorCode.OUT_OF_MEMORY
    if isinstance(exc, InferenceError):
        return exc.message, JobErrorCode.INTERNAL
    if isinstance(exc, MemoryError):
        return ("out of memory while processing this image; try a smaller image or a smaller model",
                JobErrorCode.OUT_OF_MEMORY)
    if isinstance(exc, ApplicationError):
        return exc.message, JobErrorCode.INTERNAL
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
        _fail_exhausted(job)
        return job
    if not _claim(job, me):
        job.refresh_from_db()
        logger.info("depth job %s was taken by another delivery (%s)", job.pk, job.status)
        return job

    from django_q.exceptions import TimeoutException

    with _running_lock:
        _running[job.pk] = (job.worker, job.attempts)
    try:
        _execute(job)
    except _Superseded:
        logger.warning("depth job %s: attempt %d in %s no longer owns the job (deleted, or its lease ran out and "
                       "another attempt took it); its output was dropped", job.pk, job.attempts, me)
    except TimeoutException:
        job.fail(f"the job took longer than the {job_timeout()} s job timeout; try a smaller image or model",
                 JobErrorCode.TIMEOUT)
        _save_running(job, _FAIL_FIELDS)
        raise  # django-q2 replaces a worker whose task timed out
    except Exception as exc:
        message, code = error_for(exc)
        if code == JobErrorCode.INTERNAL and not isinstance(exc, ApplicationError):
            logger.exception("depth job %s failed unexpectedly", job.pk)
        else:
            logger.warning("depth job %s failed: %s", job.pk, exc.message if isinstance(exc, ApplicationError)
                           else message)
        job.fail(message, code)
        _save_running(job, _FAIL_FIELDS)
    finally:
        with _running_lock:
            _running.pop(job.pk, None)
    return job


def _fail_exhausted(job: DepthJob) -> bool:
    observed = {"status": job.status, "attempts": job.attempts, "worker": job.worker}
    job.fail(_interrupted_message(job.attempts), JobErrorCode.INTERRUPTED)
    failed = DepthJob.objects.filter(pk=job.pk, **observed).update(
        status=job.status, error=job.error, error_code=job.error_code, finished_at=job.finished_at, lease_until=None)
    if failed:
        logger.warning("depth job %s failed after %d interrupted attempt(s)", job.pk, job.attempts)
    else:
        job.refresh_from_db()
    return bool(failed)


def _execute(job: DepthJob) -> None:
    model = job.model
    if model is None:
        raise NotFoundError(f"the model {job.model_name} no longer exists in the registry; "
                            "submit the photo again with another model", extra={"model": job.model_name})
    if not model.enabled:
        raise NotFoundError(f"the model {model.name} was disabled after this job was submitted; "
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
    _input_preview_write(job, loaded.rgb)

    from inference.estimator import estimator_get
    from inference.pipeline import depth_pass
    from models_registry.services.resolve import weights_use

    def stored_or_estimator(weight_file: WeightFile) -> DepthJob | Estimator:
        # The weights are resolved once per job: the file that would run also keys the result reuse.
        if settings.DEPTHSITE_REUSE_RESULTS:
            earlier = _reusable(job, weight_file.sha256)
            if earlier is not None:
                return earlier
        return estimator_get(model=model, weight_file=weight_file)

    started = time.perf_counter()
    _, ready = weights_use(model=model, use=stored_or_estimator)
    if isinstance(ready, DepthJob):
        files = _results_copy(ready, job)
        job.finish(result_files=files, depth_min=ready.depth_min, depth_max=ready.depth_max,
                   semantics=ready.semantics, weights_sha256=ready.weights_sha256,
                   weights_format=ready.weights_format, device=ready.device, load_ms=None,
                   inference_ms=None, reused_from=ready)
        _commit_results(job)
        return
    load_ms = (time.perf_counter() - started) * 1000
    with _results_staged(job) as folder:
        result, written = depth_pass(estimator=ready, image=loaded, folder=folder, stem=RESULT_STEM,
                                     formats=job.outputs, colormap=job.colormap, fov_degrees=job.fov_degrees,
                                     previews=True)
    job.finish(result_files=_result_names(job, written), depth_min=result.depth_min, depth_max=result.depth_max,
               semantics=result.semantics, weights_sha256=result.weights_sha256,
               weights_format=result.weights_format, device=result.device, load_ms=load_ms,
               inference_ms=result.inference_ms)
    _commit_results(job)


def _commit_results(job: DepthJob) -> None:
    job.results_bytes = _stored_result_bytes(job)
    if _save_running(job, _FINISH_FIELDS):
        logger.info("depth job %s succeeded%s", job.pk, f" (reused {job.reused_from_id})" if job.reused_from_id else "")
        return
    if not DepthJob.objects.filter(pk=job.pk).exists():
        # Deleted while it ran: its files must not outlive it.
        media_remove([results_folder(job_id=job.pk) + "/"])
    logger.info("depth job %s changed while it ran (deleted or recovered); its result was not recorded", job.pk)


# --- result files --------------------------------------------------------------------------------


def input_preview_path(*, image_name: str) -> str:
    """Where the browser preview of an upload lives (a storage name): beside it, named after it, so
    deleting a job finds it whether or not its row recorded it yet."""
    return str(PurePosixPath(image_name).with_suffix(PREVIEW_SUFFIX))


def _input_preview_write(job: DepthJob, rgb) -> None:
    """An upright PNG of a photo browsers cannot show (TIFF), written once by the worker and then served as is."""
    if job.image_format in BROWSER_IMAGE_TYPES or not job.image or not job.image.name:
        return
    relative = input_preview_path(image_name=job.image.name)
    if not media_exists(relative):
        from PIL import Image

        # Written in a results staging folder, so a killed worker's half file is swept with the other staging
        # folders, then put into place (a rename on a local storage, one put on an object store).
        staging = media_staging_root() / f"{STAGING_PREFIX}{job.pk}-{uuid.uuid4().hex[:8]}"
        staging.mkdir(parents=True)
        try:
            temporary = staging / "preview.png"
            Image.fromarray(rgb).save(temporary, format="PNG")
            media_put(name=relative, source=temporary)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if job.input_preview != relative:
        job.input_preview = relative
        if not DepthJob.objects.filter(pk=job.pk).update(input_preview=relative):
            media_remove([relative])  # the job was deleted meanwhile


def _stored_result_bytes(job: DepthJob) -> int:
    """Bytes a job keeps in the media store besides its upload (results and preview), for the anonymous quota."""
    names = list((job.result_files or {}).values())
    if job.input_preview:
        names.append(job.input_preview)
    return media_usage(names)


def results_folder(*, job_id) -> str:
    """The storage name of a job's results folder: every result file of the job lies in it, and only there."""
    return f"{RESULTS_DIR}/{job_id}"


@contextlib.contextmanager
def _results_staged(job: DepthJob) -> Iterator[Path]:
    """A local staging folder to write into; once the block ends it is published as the job's results folder
    (a rename on a local storage, one atomic put per file on an object store): never half a result under its name."""
    root = media_staging_root()
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f"{STAGING_PREFIX}{job.pk}-{uuid.uuid4().hex[:8]}"
    try:
        yield staging
        if not _still_this_attempt(job):
            # A late attempt whose lease ran out must not replace the files of the attempt that took over.
            raise _Superseded(str(job.pk))
        media_folder_publish(source=staging, prefix=results_folder(job_id=job.pk))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _result_names(job: DepthJob, written: dict[str, Path]) -> dict[str, str]:
    """{format: storage name} of files written into the staging folder, once published."""
    return {fmt: f"{results_folder(job_id=job.pk)}/{path.name}" for fmt, path in written.items()}


def _reusable(job: DepthJob, weights_sha256: str) -> DepthJob | None:
    # By the pixels the network saw, not the file's bytes: the same photo as PNG and as TIFF is one result.
    candidates = (DepthJob.objects.filter(status=RunStatus.SUCCEEDED, pixels_sha256=job.pixels_sha256,
                                          weights_sha256=weights_sha256, colormap=job.colormap)
                  .exclude(pk=job.pk).order_by("-finished_at"))
    if "ply" in job.outputs:  # the point cloud depends on the camera too
        candidates = candidates.filter(fov_degrees=job.fov_degrees)
    for candidate in candidates[:20]:
        if list(candidate.outputs) != list(job.outputs):
            continue
        # result_files may hold more than the outputs (the .ply's browser preview): all of them are copied.
        if set(job.outputs) <= set(candidate.result_files) and all(
                media_exists(name) for name in candidate.result_files.values()):
            return candidate
    return None


def _results_copy(earlier: DepthJob, job: DepthJob) -> dict[str, str]:
    """Hard links where the storage is this file system (copies otherwise): each job owns its own names."""
    copied: dict[str, Path] = {}
    with _results_staged(job) as folder:
        folder.mkdir(parents=True)
        for fmt, name in earlier.result_files.items():
            copied[fmt] = folder / PurePosixPath(name).name
            media_fetch(name=name, dest=copied[fmt])
    return _result_names(job, copied)


def depth_job_paths(*, job: DepthJob) -> list[str]:
    """Every storage name that belongs to a job: its upload, its preview and its results folder (ending in "/")."""
    names = []
    if job.image and job.image.name:
        names.append(job.image.name)
        names.append(input_preview_path(image_name=job.image.name))
    names.append(results_folder(job_id=job.pk) + "/")
    return names


def depth_job_files_remove(*, paths: Iterable[str]) -> int:
    """Remove a deleted job's files from the media store; returns the bytes freed. Missing files are fine."""
    return media_remove(paths)


# --- delete, re-run ------------------------------------------------------------------------------


def depth_job_delete(*, job: DepthJob) -> dict[str, Any]:
    """Delete the job row; its upload and result files go once the deletion commits (see inference.signals).

    A running job may be deleted: its worker notices and drops the result it was writing.
    """
    planned = media_usage(depth_job_paths(job=job))
    job_id = job.pk
    job.delete()
    return {"id": str(job_id), "bytes": planned}


def depth_job_rerun(*, job: DepthJob) -> DepthJob:
    """Queue a finished job again (its attempts start over); ConflictError while it is queued or running."""
    observed_status = job.status
    if observed_status in RunStatus.ACTIVE:
        raise ConflictError(f"job {job.short_id} is already {observed_status}", extra={"status": observed_status})
    if not job.image or not media_exists(job.image.name):
        raise ImageError("the job's uploaded image is gone, so it cannot run again; upload the photo again",
                         extra={"field": "image"})
    with transaction.atomic():
        job.requeue()
        updated = DepthJob.objects.filter(pk=job.pk, status=observed_status).update(
            status=job.status, worker="", queued_at=job.queued_at, finished_at=None, started_at=None, attempts=0,
            error="", error_code="", result_files={}, depth_min=None, depth_max=None, load_ms=None,
            inference_ms=None, reused_from=None, results_bytes=0,
        )
        if not updated:
            job.refresh_from_db()
            raise ConflictError(f"job {job.short_id} changed meanwhile (now {job.status})",
                                extra={"status": job.status})
        transaction.on_commit(partial(_depth_job_enqueue, job.pk))
    job.refresh_from_db()
    return job


# --- recovery ------------------------------------------------------------------------------------


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
    stale_before = timezone.now() - timedelta(seconds=_retry_after())
    for job in DepthJob.objects.filter(status=RunStatus.QUEUED, queued_at__lt=stale_before).only(
            "id", "status", "queued_at"):
        now = timezone.now()
        if DepthJob.objects.filter(pk=job.pk, status=RunStatus.QUEUED, queued_at=job.queued_at).update(queued_at=now):
            logger.warning("depth job %s has waited since %s; queued again", job.pk, job.queued_at)
            _depth_job_enqueue(job.pk)
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
        return int(_broker().queue_size() or 0)
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
        if DepthJob.objects.filter(pk=pk, status=RunStatus.QUEUED, queued_at=queued_at).update(
                queued_at=timezone.now()):
            logger.warning("depth job %s has been queued since %s with no task in the broker; queued again",
                           pk, queued_at)
            _depth_job_enqueue(pk)
            requeued.append(str(pk))
    return requeued


def _recover_running(running, requeued: list[str], failed: list[str]) -> None:
    for job in running.only("id", "status", "attempts", "worker", "started_at", "lease_until"):
        if worker_alive(worker=job.worker, started_at=job.started_at, lease_until=job.lease_until):
            continue
        if job.attempts >= job_max_attempts():
            if _fail_exhausted(job):
                failed.append(str(job.pk))
            continue
        observed = {"status": job.status, "attempts": job.attempts, "worker": job.worker}
        job.requeue()
        if DepthJob.objects.filter(pk=job.pk, **observed).update(status=job.status, worker="", lease_until=None,
                                                                 queued_at=job.queued_at):
            logger.warning("depth job %s: its worker %s stopped during attempt %d; queued again",
                           job.pk, observed["worker"] or "?", job.attempts)
            _depth_job_enqueue(job.pk)
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


# --- anonymous expiry ----------------------------------------------------------------------------


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
