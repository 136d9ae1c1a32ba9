"""Running a finished job's photo again with another model: a new job from the same stored upload."""
from __future__ import annotations

from pathlib import PurePosixPath

from django.core.files import File

from depthsite.choices import RunStatus
from inference.exceptions import ImageError
from inference.media import media_exists, media_open
from inference.models import DepthJob
from inference.services.jobs import depth_job_create
from depthsite.exceptions import ConflictError


def depth_job_run_again(*, job: DepthJob, model: str, owner=None, session_key: str = "",
                        client_address: str = "") -> DepthJob:
    """A new job on `job`'s stored photo with `model` and the same outputs, colour map and field of view.

    It goes through `depth_job_create` like any upload, so every check applies again: the model must exist
    and be enabled, and an anonymous caller's quota counts the new copy. Who may ask is the door's question
    (the job's owner or staff). ConflictError while `job` is still queued or running; ImageError when its
    photo is gone.
    """
    if job.status not in RunStatus.TERMINAL:
        raise ConflictError(f"job {job.short_id} is still {job.status}; run it again once it has finished",
                            extra={"status": job.status})
    name = job.image.name if job.image else ""
    if not name or not media_exists(name):
        raise ImageError("the job's uploaded image is gone, so it cannot run again; upload the photo again",
                         extra={"field": "image"})
    with media_open(name) as stored:
        return depth_job_create(image=File(stored, name=job.image_name or PurePosixPath(name).name), model=model,
                                outputs=list(job.outputs or []), colormap=job.colormap, fov=job.fov_degrees,
                                owner=owner, session_key=session_key, client_address=client_address)
