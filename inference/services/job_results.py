"""A job's files in the media store: results staged then published, the upload's preview, reuse, what a job owns."""
from __future__ import annotations

import contextlib
import shutil
import uuid
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator

import numpy as np
from django.conf import settings
from django.db.models import Q

from depthsite.choices import RunStatus
from inference.images import BROWSER_IMAGE_TYPES
from inference.media import (
    RESULTS_DIR,
    STAGING_PREFIX,
    media_exists,
    media_fetch,
    media_folder_publish,
    media_put,
    media_remove,
    media_staging_root,
    media_usage,
)
from inference.models import DepthJob
from inference.services.job_state import Superseded, job_attempt_current, job_transition

PREVIEW_SUFFIX = ".preview.png"
# DepthJob.dtype of results any caller may be handed. Not '': jobs from before it was recorded, or written by a
# process of the release before during a rollover, may be CUDA float16 results.
FULL_PRECISION = ("float32",)


def results_folder(*, job_id) -> str:
    """The storage name of a job's results folder: every result file of the job lies in it, and only there."""
    return f"{RESULTS_DIR}/{job_id}"


def input_preview_path(*, image_name: str) -> str:
    """Where the browser preview of an upload lives (a storage name): beside it, named after it, so
    deleting a job finds it whether or not its row recorded it yet."""
    return str(PurePosixPath(image_name).with_suffix(PREVIEW_SUFFIX))


def _staging_folder(job: DepthJob) -> Path:
    # Under the results staging root, so a killed worker's half-written files are swept with the others.
    root = media_staging_root()
    root.mkdir(parents=True, exist_ok=True)
    return root / f"{STAGING_PREFIX}{job.pk}-{uuid.uuid4().hex[:8]}"


def input_preview_write(*, job: DepthJob, rgb: np.ndarray) -> None:
    """An upright PNG of a photo browsers cannot show (TIFF), written once by the worker and then served as is."""
    if job.image_format in BROWSER_IMAGE_TYPES or not job.image or not job.image.name:
        return
    relative = input_preview_path(image_name=job.image.name)
    if not media_exists(relative):
        from PIL import Image

        # Put into place from a staging folder (a rename on a local storage, one put on an object store).
        staging = _staging_folder(job)
        staging.mkdir(parents=True)
        try:
            temporary = staging / "preview.png"
            Image.fromarray(rgb).save(temporary, format="PNG")
            media_put(name=relative, source=temporary)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if job.input_preview != relative:
        job.input_preview = relative
        if not job_transition(job_id=job.pk, expect={}, input_preview=relative):
            media_remove([relative])  # the job was deleted meanwhile


def results_stored_bytes(*, job: DepthJob) -> int:
    """Bytes a job keeps in the media store besides its upload (results and preview), for the anonymous quota."""
    names = list((job.result_files or {}).values())
    if job.input_preview:
        names.append(job.input_preview)
    return media_usage(names)


@contextlib.contextmanager
def results_staged(*, job: DepthJob) -> Iterator[Path]:
    """A local staging folder to write into; once the block ends it is published as the job's results folder
    (a rename on a local storage, one atomic put per file on an object store): never half a result under its name.

    Superseded when the attempt no longer owns the job by then: a late attempt whose lease ran out must not
    replace the files of the attempt that took over."""
    staging = _staging_folder(job)
    try:
        yield staging
        if not job_attempt_current(job):
            raise Superseded(str(job.pk))
        media_folder_publish(source=staging, prefix=results_folder(job_id=job.pk))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def results_names(*, job: DepthJob, written: dict[str, Path]) -> dict[str, str]:
    """{format: storage name} of the files written into its staging folder, once published."""
    return {fmt: f"{results_folder(job_id=job.pk)}/{path.name}" for fmt, path in written.items()}


def _same_client(job: DepthJob) -> Q | None:
    """The jobs of the client that sent `job`, or None where no other job can be proven its own.

    A signed-in user's own jobs; an anonymous browser's by its session (a secret cookie: an address alone may be
    shared by a whole office behind one proxy, so an anonymous client without a session shares with nobody); jobs
    made by service calls (no user, session or address: `manage.py` on the operator's side) with each other."""
    if job.owner_id is not None:
        return Q(owner_id=job.owner_id)
    if job.session_key:
        return Q(owner__isnull=True, session_key=job.session_key)
    if not job.client_address:
        return Q(owner__isnull=True, session_key="", client_address="")
    return None


def result_reusable(*, job: DepthJob, weights_sha256: str) -> DepthJob | None:
    """An earlier succeeded job of the same client, pixels, weights and options whose files are all still stored.

    Only the same client's: a reused job has no timings of its own (nothing ran), so a result handed to a stranger
    told them that somebody had sent these very pixels before."""
    client = _same_client(job)
    if client is None:
        return None
    # By the pixels the network saw, not the file's bytes: the same photo as PNG and as TIFF is one result.
    candidates = (DepthJob.objects.filter(client, status=RunStatus.SUCCEEDED, pixels_sha256=job.pixels_sha256,
                                          weights_sha256=weights_sha256, colormap=job.colormap)
                  .exclude(pk=job.pk).order_by("-finished_at"))
    if not settings.DEPTHSITE_FP16:
        # A 16-bit result (about 2e-2 of the range off) is only handed to a caller who accepts 16-bit floats; a
        # float32 one to anybody. Jobs that do not say are computed again, once.
        candidates = candidates.filter(dtype__in=FULL_PRECISION)
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


def results_copy(*, earlier: DepthJob, job: DepthJob) -> dict[str, str]:
    """Hard links where the storage is this file system (copies otherwise): each job owns its own names."""
    copied: dict[str, Path] = {}
    with results_staged(job=job) as folder:
        folder.mkdir(parents=True)
        for fmt, name in earlier.result_files.items():
            copied[fmt] = folder / PurePosixPath(name).name
            media_fetch(name=name, dest=copied[fmt])
    return results_names(job=job, written=copied)


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
