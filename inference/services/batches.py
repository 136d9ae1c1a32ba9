"""Creating a batch (one DepthJob per photo under one DepthBatch, refused whole) and removing empty old batches.

Each photo goes through `depth_job_create` like a single upload (format, pixels, bytes, anonymous quota);
if any is refused, the whole batch is: no batch row, no job row, no stored upload remains.
"""
from __future__ import annotations

import logging
from typing import Iterable

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from depthsite.units import format_size
from inference.exceptions import QuotaExceededError
from inference.models import DepthBatch, DepthJob
from inference.services.batch_images import BatchImages
from inference.services.jobs import anonymous_usage, depth_job_create
from models_registry.catalogue import DEFAULT_MODEL
from depthsite.exceptions import ApplicationError

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
    """One DepthJob per photo (each through `depth_job_create`), all under one new DepthBatch, queued once the
    transaction commits. Any refusal (a photo that is not one, a quota) refuses the batch whole, naming the
    photo: the rows roll back and the uploads already stored are deleted."""
    anonymous = owner is None or not owner.is_authenticated
    if anonymous:
        _anonymous_quota_check(session_key=session_key, client_address=client_address, count=len(images),
                               size=images.size)
    created: list[DepthJob] = []
    try:
        with transaction.atomic():
            batch = DepthBatch.objects.create(
                owner=None if anonymous else owner, session_key=session_key if anonymous else "",
                client_address=client_address if anonymous else "", archive_name=images.archive_name,
                skipped=images.skipped, model_name="",
            )
            for index, (upload, source) in enumerate(zip(images.files, images.sources), start=1):
                try:
                    job = depth_job_create(image=upload, model=model, outputs=outputs,
                                           colormap=colormap, fov=fov, owner=owner, session_key=session_key,
                                           client_address=client_address)
                except ApplicationError as exc:
                    raise _naming_photo(exc, name=upload.name, index=index, source=source) from None
                created.append(job)
            DepthJob.objects.filter(pk__in=[job.pk for job in created]).update(batch=batch)
            first = created[0]
            batch.model_id, batch.model_name = first.model_id, first.model_name
            batch.outputs, batch.colormap, batch.fov_degrees = first.outputs, first.colormap, first.fov_degrees
            batch.save(update_fields=["model", "model_name", "outputs", "colormap", "fov_degrees"])
    except BaseException:
        for job in created:
            job.image.delete(save=False)  # their rows rolled back: nothing may point at these files any more
        raise
    logger.info("depth batch %s queued: %d photo(s), %s, %d skipped", batch.pk, len(created), batch.model_name,
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


def _anonymous_quota_check(*, session_key: str, client_address: str, count: int, size: int) -> None:
    """A batch counts against the anonymous quota as the same number of single uploads; refused whole, up front
    (`depth_job_create` checks each photo again inside the transaction, against concurrent uploads)."""
    max_jobs = settings.DEPTHSITE_ANON_MAX_JOBS
    max_bytes = settings.DEPTHSITE_ANON_MAX_BYTES
    for label, jobs, stored in anonymous_usage(session_key=session_key, client_address=client_address):
        if max_jobs and jobs + count > max_jobs:
            raise QuotaExceededError(
                f"anonymous quota: {label} has {jobs} jobs stored and this batch of {count} photos would pass the "
                f"limit of {max_jobs} (DEPTHSITE_ANON_MAX_JOBS); send fewer photos, delete some jobs, or sign in",
                extra={"kind": "quota_jobs", "limit": max_jobs, "used": jobs, "count": count})
        if max_bytes and stored + size > max_bytes:
            raise QuotaExceededError(
                f"anonymous quota: {label} stores {format_size(stored)} and this batch of {format_size(size)} would "
                f"pass the limit of {format_size(max_bytes)} (DEPTHSITE_ANON_MAX_BYTES); send fewer photos, delete "
                "some jobs, or sign in", extra={"kind": "quota_bytes", "limit": max_bytes, "used": stored})


def depth_batches_expire(*, now=None) -> int:
    """Remove batches whose jobs have all gone (deleted, or expired as anonymous jobs do) once they are older than
    DEPTHSITE_ANON_RETENTION; returns how many. A batch never holds files of its own."""
    from datetime import timedelta

    cutoff = (now or timezone.now()) - timedelta(seconds=settings.DEPTHSITE_ANON_RETENTION)
    deleted, _ = DepthBatch.objects.filter(created_at__lt=cutoff, jobs__isnull=True).delete()
    return deleted
