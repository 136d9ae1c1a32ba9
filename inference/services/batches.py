"""Creating a batch (one DepthJob per photo under one DepthBatch, refused whole) and removing empty old batches.

Each photo has the checks of a single upload (format, pixels, bytes, anonymous quota); if any is refused, the
whole batch is: no batch row, no job row, no stored upload remains. The photos are decoded, hashed and stored
before the transaction: on SQLite it holds the database's write lock (BEGIN IMMEDIATE), and every other writer
(uploads, sessions, the workers' lease renewals) would wait on up to DEPTHSITE_BATCH_MAX_FILES decodes.
"""
from __future__ import annotations

import logging
from typing import Iterable

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from depthsite.exceptions import ApplicationError
from inference.models import DepthBatch, DepthJob
from inference.services.batch_images import BatchImages
from inference.services.jobs import (
    anonymous_quota_check,
    depth_job_insert,
    depth_job_options,
    depth_job_prepare,
    depth_job_results_bound,
    depth_job_upload_store,
)
from models_registry.catalogue import DEFAULT_MODEL

logger = logging.getLogger(__name__)


def depth_batch_create(
    *,
    images: BatchImages,
    model: str = DEFAULT_MODEL,
    outputs: Iterable[str] | str | None = None,
    colormap: str = "",
    fov: float | str | None = None,
    owner=None,
    session_key: str = "",
    client_address: str = "",
) -> DepthBatch:
    """One DepthJob per photo, all under one new DepthBatch, queued once the transaction commits. Any refusal (a
    photo that is not one, a quota) refuses the batch whole, naming the photo; uploads already stored are deleted.

    A batch counts against the anonymous quota as the same number of single uploads: checked up front on the
    bytes sent, again once the photos are decoded (what their outputs will take), and last inside the
    transaction, against concurrent uploads."""
    anonymous = owner is None or not owner.is_authenticated
    quota = {"session_key": session_key, "client_address": client_address, "size": images.size,
             "count": len(images)}
    if anonymous:
        anonymous_quota_check(**quota)
    options = depth_job_options(model=model, outputs=outputs, colormap=colormap, fov=fov)
    jobs: list[DepthJob] = []
    for index, (upload, source) in enumerate(zip(images.files, images.sources), start=1):
        try:
            jobs.append(depth_job_prepare(image=upload, options=options, owner=owner, session_key=session_key,
                                          client_address=client_address))
        except ApplicationError as exc:
            raise _naming_photo(exc, name=upload.name, index=index, source=source) from None
    quota["results"] = sum(depth_job_results_bound(job=job) for job in jobs)
    if anonymous:
        anonymous_quota_check(**quota)
    stored: list[DepthJob] = []
    try:
        for job, upload in zip(jobs, images.files):
            depth_job_upload_store(job=job, image=upload)
            stored.append(job)
        with transaction.atomic():
            batch = DepthBatch.objects.create(
                owner=None if anonymous else owner, session_key=session_key if anonymous else "",
                client_address=client_address if anonymous else "", archive_name=images.archive_name,
                skipped=images.skipped, model=options.model, model_name=options.model.name,
                outputs=options.outputs, colormap=options.colormap, fov_degrees=options.fov_degrees,
            )
            for job in jobs:
                job.batch = batch
                depth_job_insert(job=job)
            if anonymous:
                anonymous_quota_check(**quota, saved=True)
    except BaseException:
        for job in stored:
            job.image.delete(save=False)  # no row points at these files: never saved, or rolled back
        raise
    logger.info("depth batch %s queued: %d photo(s), %s, %d skipped", batch.pk, len(jobs), batch.model_name,
                len(images.skipped))
    return batch


def _naming_photo(exc: ApplicationError, *, name: str | None, index: int, source: str) -> ApplicationError:
    """The same error about the whole request, saying which photo it is about."""
    shown = name or f"photo {index}"
    field_name = exc.extra.get("field")
    message = exc.message
    if field_name == "image":  # a photo's own problem: in a batch it belongs to the files or the archive
        exc.extra["field"] = source
    elif field_name:
        return exc  # a bad option (model, outputs, ...): the same for every photo
    exc.message = f"{source}: {shown}: {message}"
    exc.extra["file"] = shown
    return exc


def depth_batches_expire(*, now=None) -> int:
    """Remove batches whose jobs have all gone (deleted, or expired as anonymous jobs do) once they are older than
    DEPTHSITE_ANON_RETENTION; returns how many. A batch never holds files of its own."""
    from datetime import timedelta

    cutoff = (now or timezone.now()) - timedelta(seconds=settings.DEPTHSITE_ANON_RETENTION)
    deleted, _ = DepthBatch.objects.filter(created_at__lt=cutoff, jobs__isnull=True).delete()
    return deleted
