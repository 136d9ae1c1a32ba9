"""Depth jobs from the web process (no torch): create with its checks and the anonymous quota, queue, delete, re-run.

A job is saved first and queued on commit with its id only; a worker runs it (inference.services.job_runs).
"""
from __future__ import annotations

import hashlib
import logging
import os
import uuid
from dataclasses import dataclass
from functools import partial, reduce
from operator import or_
from typing import Any, Iterable

from django.conf import settings
from django.core.files import File
from django.db import transaction
from django.db.models import Count, Q, Sum

from depthsite.choices import RunStatus
from depthsite.exceptions import ConflictError, InvalidRequestError, NotFoundError, TooLargeError
from depthsite.units import format_size
from inference.colormaps import COLORMAPS, DEFAULT_COLORMAP
from inference.exceptions import ImageError, QuotaExceededError
from inference.images import BROWSER_IMAGE_TYPES, image_check
from inference.media import media_exists, media_usage
from inference.models import DepthJob
from inference.services.job_results import depth_job_paths
from inference.services.job_state import job_transition
from inference.writers import (
    DEFAULT_FOV_DEGREES,
    fov_check,
    outputs_bytes_bound,
    parse_formats,
    png_bytes_bound,
)
from models_registry.catalogue import DEFAULT_MODEL
from models_registry.models import RegisteredModel
from models_registry.selectors import model_get
from models_registry.services.licences import model_license_check

logger = logging.getLogger(__name__)

DEFAULT_OUTPUTS = ("png",)
TASK = "inference.tasks.depth_job_task"
_HASH_CHUNK = 1024 * 1024
# Upright extensions by what Pillow recognised; the client's name is never trusted.
_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp",
               "TIFF": ".tif"}


def _model_for_job(name: str) -> RegisteredModel:
    try:
        model = model_get(name=name or DEFAULT_MODEL, enabled_only=True)
    except NotFoundError as exc:
        # An unknown model is a mistake in the request (400), not a missing resource.
        raise InvalidRequestError(exc.message, extra={**exc.extra, "field": "model"}) from None
    # Refused before the upload is stored (403, under the model field), in words that do not quote the setting.
    model_license_check(model=model, uploader=True)
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


@dataclass(frozen=True)
class DepthJobOptions:
    """What a request asks of its jobs, checked once: a batch's photos all share one."""

    model: RegisteredModel
    outputs: list[str]
    colormap: str
    fov_degrees: float


def depth_job_options(*, model: str = DEFAULT_MODEL, outputs: Iterable[str] | str | None = None,
                      colormap: str = DEFAULT_COLORMAP, fov: float | str | None = None) -> DepthJobOptions:
    """InvalidRequestError (400) for an unknown model, output, colormap or field of view; LicenseError (403) for a
    model whose licence this site refuses."""
    registered = _model_for_job(model)
    formats = parse_formats(list(outputs) if outputs and not isinstance(outputs, str) else (outputs or DEFAULT_OUTPUTS))
    return DepthJobOptions(model=registered, outputs=formats, colormap=_colormap(colormap),
                           fov_degrees=fov_check(DEFAULT_FOV_DEGREES if fov is None or fov == "" else fov))


def depth_job_prepare(*, image: File, options: DepthJobOptions, owner=None, session_key: str = "",
                      client_address: str = "") -> DepthJob:
    """The unsaved job of one upload, checked (bytes, format, pixels) and hashed; nothing stored or saved yet.

    It decodes the photo, so callers run it before any transaction: on SQLite a transaction holds the write lock,
    and every other writer would wait for the decode. ImageError (400), TooLargeError/ImageTooLargeError (413).
    """
    size = int(image.size or 0)
    upload_size_check(size=size)
    anonymous = owner is None or not owner.is_authenticated
    image.seek(0)
    # Header first (format, size, pixel limit), then a decode that converts and copies nothing (see image_check).
    info = image_check(getattr(image, "file", image), max_pixels=settings.DEPTHSITE_MAX_IMAGE_PIXELS)
    return DepthJob(
        owner=None if anonymous else owner,
        session_key=(session_key or "") if anonymous else "",
        client_address=(client_address or "") if anonymous else "",
        image_name=_client_name(image.name), image_sha256=_sha256(image), image_size=size, image_format=info.format,
        image_width=info.width, image_height=info.height, image_alpha=info.alpha,
        model=options.model, model_name=options.model.name, outputs=options.outputs, colormap=options.colormap,
        fov_degrees=options.fov_degrees,
    )


def depth_job_upload_store(*, job: DepthJob, image: File) -> None:
    """Copy a prepared job's photo into the media storage under a name of ours (the row is not saved)."""
    image.seek(0)
    job.image.save(f"upload{_EXTENSIONS.get(job.image_format, '.img')}", image, save=False)


def depth_job_insert(*, job: DepthJob) -> None:
    """Save a prepared job, its photo stored, and queue it once the caller's transaction commits (its id only)."""
    job.save()
    transaction.on_commit(partial(depth_job_enqueue, job.pk))


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
    QuotaExceededError (429) when an anonymous session or address would store more than its quota, the results
    this job will write counted (see anonymous_usage).
    """
    options = depth_job_options(model=model, outputs=outputs, colormap=colormap, fov=fov)
    size = int(image.size or 0)
    upload_size_check(size=size)
    anonymous = owner is None or not owner.is_authenticated
    if anonymous:
        # Before the decode: a client already at its quota costs no decoding.
        anonymous_quota_check(session_key=session_key, client_address=client_address, size=size)
    job = depth_job_prepare(image=image, options=options, owner=owner, session_key=session_key,
                            client_address=client_address)
    results = depth_job_results_bound(job=job)
    if anonymous:
        anonymous_quota_check(session_key=job.session_key, client_address=job.client_address, size=size,
                              results=results)
    depth_job_upload_store(job=job, image=image)
    try:
        with transaction.atomic():
            depth_job_insert(job=job)
            if anonymous:
                # Again with this row written: on SQLite the write lock now serialises concurrent uploads,
                # so two of them cannot both take the last place of a quota.
                anonymous_quota_check(session_key=job.session_key, client_address=job.client_address,
                                      size=size, results=results, saved=True)
    except BaseException:
        job.image.delete(save=False)  # no row points at it
        raise
    logger.info("depth job %s queued: %s, %dx%d %s, %s", job.pk, job.model_name, job.image_width,
                job.image_height, job.image_format, ",".join(job.outputs))
    return job


# --- the anonymous quota --------------------------------------------------------------------------


def results_bytes_bound(*, outputs: Iterable[str], width: int, height: int, image_format: str) -> int:
    """The most bytes a job's results can take in the media store: its outputs at the photo's full size
    (inference.writers.outputs_bytes_bound), and the upright PNG the worker keeps of a photo browsers cannot show
    (input_preview_write)."""
    total = outputs_bytes_bound(formats=outputs, width=width, height=height)
    if image_format not in BROWSER_IMAGE_TYPES:
        total += png_bytes_bound(width=width, height=height, sample_bytes=3)
    return total


def depth_job_results_bound(*, job: DepthJob) -> int:
    """results_bytes_bound of a job's own outputs and photo."""
    return results_bytes_bound(outputs=job.outputs or [], width=job.image_width or 0, height=job.image_height or 0,
                               image_format=job.image_format)


def anonymous_usage(*, session_key: str, client_address: str) -> list[tuple[str, int, int]]:
    """[(whose, jobs, bytes)] of an anonymous uploader: its browser session and its address, each counted on its
    own. Bytes are the uploads, the results finished jobs store, and for each job not finished yet the most its
    outputs can take: results_bytes is only known once a job ends, and a small file of many pixels asking for
    every output writes gigabytes, so counting it at 0 until then let one batch pass the quota many times over."""
    scopes = {"this browser session": ("session_key", session_key), "your address": ("client_address", client_address)}
    scopes = {label: (field_name, value) for label, (field_name, value) in scopes.items() if value}
    if not scopes:
        return []
    anonymous = DepthJob.objects.filter(owner__isnull=True).filter(
        reduce(or_, (Q(**{field_name: value}) for field_name, value in scopes.values())))
    # One query for the counts of every scope, one for the unfinished jobs of any of them.
    finished = Q(status__in=RunStatus.TERMINAL)
    aggregates = {}
    for n, (field_name, value) in enumerate(scopes.values()):
        mine = Q(**{field_name: value})
        aggregates[f"jobs{n}"] = Count("pk", filter=mine)
        aggregates[f"uploads{n}"] = Sum("image_size", filter=mine)
        aggregates[f"results{n}"] = Sum("results_bytes", filter=mine & finished)
    totals = anonymous.aggregate(**aggregates)
    unfinished = list(anonymous.exclude(finished).values(
        "session_key", "client_address", "outputs", "image_width", "image_height", "image_format"))
    counted = []
    for n, (label, (field_name, value)) in enumerate(scopes.items()):
        pending = sum(results_bytes_bound(outputs=row["outputs"] or [], width=row["image_width"] or 0,
                                          height=row["image_height"] or 0, image_format=row["image_format"])
                      for row in unfinished if row[field_name] == value)
        stored = (totals[f"uploads{n}"] or 0) + (totals[f"results{n}"] or 0) + pending
        counted.append((label, totals[f"jobs{n}"] or 0, stored))
    return counted


def anonymous_quota_check(*, session_key: str, client_address: str, size: int, results: int = 0, count: int = 1,
                          saved: bool = False) -> None:
    """QuotaExceededError (429) when `count` new jobs (one upload, or a batch) would take an anonymous session or
    address past DEPTHSITE_ANON_MAX_JOBS jobs or DEPTHSITE_ANON_MAX_BYTES stored bytes (see anonymous_usage).

    `size`: the bytes of their uploads; `results`: the most their results can take (results_bytes_bound; 0 before
    the photos are decoded, when it is not known yet). `saved`: their rows are already counted (the re-check
    inside the creating transaction)."""
    max_jobs = settings.DEPTHSITE_ANON_MAX_JOBS
    max_bytes = settings.DEPTHSITE_ANON_MAX_BYTES
    retention_days = max(1, round(settings.DEPTHSITE_ANON_RETENTION / 86400))
    adding = size + results
    for label, jobs, stored in anonymous_usage(session_key=session_key, client_address=client_address):
        if saved:
            jobs, stored = jobs - count, stored - adding
        if max_jobs and jobs + count > max_jobs:
            if count == 1:
                message = (f"anonymous quota reached: {label} already has {jobs} jobs stored (limit {max_jobs}, "
                           f"DEPTHSITE_ANON_MAX_JOBS); delete some jobs, wait for them to expire after "
                           f"{retention_days} day(s), or sign in")
            else:
                message = (f"anonymous quota reached: {label} has {jobs} jobs stored and this batch of {count} "
                           f"photos would pass the limit of {max_jobs} (DEPTHSITE_ANON_MAX_JOBS); send fewer "
                           "photos, delete some jobs, or sign in")
            raise QuotaExceededError(message, extra={"kind": "quota_jobs", "limit": max_jobs, "used": jobs,
                                                     "count": count})
        if max_bytes and stored + adding > max_bytes:
            what = "this upload" if count == 1 else f"this batch of {count} photos"
            adds = format_size(size) + (f", and up to {format_size(results)} of results" if results else "")
            raise QuotaExceededError(
                f"anonymous quota reached: {label} stores {format_size(stored)} (jobs not finished yet count at the "
                f"most their outputs can take) and {what} ({adds}) would pass the limit "
                f"of {format_size(max_bytes)} (DEPTHSITE_ANON_MAX_BYTES); ask for fewer outputs (npy, pfm and above "
                f"all ply grow with the pixels) or send a smaller photo, wait for your jobs to finish, delete some, "
                f"or sign in",
                extra={"kind": "quota_bytes", "limit": max_bytes, "used": stored, "size": size, "results": results})


_brokers: dict[int, Any] = {}


def task_broker():
    """This process's django-q2 broker, made once: a broker per enqueue (async_task's default) opens a new Redis
    connection for every job (bench/scale.py counted one HELLO per job). Keyed by pid: a forked child makes its own."""
    from django_q.brokers import get_broker

    broker = _brokers.get(os.getpid())
    if broker is None:
        broker = _brokers[os.getpid()] = get_broker()
    return broker


def depth_job_enqueue(job_id: uuid.UUID | str) -> None:
    """Give the job a task in the broker (its id only); a broker that fails leaves the row queued for the recovery."""
    from django_q.tasks import async_task

    try:
        # save=False: the job's row records its outcome, so django-q2's monitor stores no success record per
        # job (a count, a prune and an insert on the database the web and the worker write to); it still
        # records a task that failed, under the name depth-<job id>; the job's id finds it, so the task's own
        # id is not stored (it would cost a statement and a commit per upload).
        async_task(TASK, str(job_id), task_name=f"depth-{job_id}", group="depth-jobs", broker=task_broker(),
                   save=False)
    except Exception:
        # The row stays queued: the recovery queues it again, so a broker hiccup loses no job.
        logger.exception("could not queue depth job %s; the job recovery will queue it again", job_id)


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
        updated = job_transition(
            job_id=job.pk, expect={"status": observed_status}, status=job.status, worker="",
            queued_at=job.queued_at, finished_at=None, started_at=None, attempts=0, error="", error_code="",
            result_files={}, depth_min=None, depth_max=None, load_ms=None, inference_ms=None, reused_from=None,
            results_bytes=0)
        if not updated:
            job.refresh_from_db()
            raise ConflictError(f"job {job.short_id} changed meanwhile (now {job.status})",
                                extra={"status": job.status})
        transaction.on_commit(partial(depth_job_enqueue, job.pk))
    job.refresh_from_db()
    return job
