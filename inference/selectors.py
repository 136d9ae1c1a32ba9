"""Reads of depth jobs: who sees which job, the status summary, result files, and the models offered for upload."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.db.models import QuerySet

from depthsite.units import format_size, iso_time
from depthsite.choices import RunStatus
from inference.images import BROWSER_IMAGE_TYPES
from inference.media import RESULTS_DIR, media_exists, media_name_check, media_size
from inference.models import DepthBatch, DepthJob
from inference.writers import CONTENT_TYPES, OUTPUT_FORMATS, SUFFIXES
from depthsite.exceptions import ApplicationError, NotFoundError
from models_registry.api.permissions import may_operate
from models_registry.models import RegisteredModel
from models_registry.selectors import download_active, model_list, weight_files_usable



def uploads_allowed(*, user) -> bool:
    """Signed-in users may always upload; anonymous visitors when DEPTHSITE_PUBLIC_UPLOADS is on."""
    return bool(user.is_authenticated or settings.DEPTHSITE_PUBLIC_UPLOADS)


def depth_job_may_list_everyone(*, user) -> bool:
    """Whether the caller may list and read every user's jobs: staff holding inference.view_depthjob
    (models_registry.api.permissions.OPERATOR_PERMISSIONS)."""
    return may_operate(user, "jobs_view_others")


def depth_job_list(*, user, session_key: str = "", everyone: bool = False) -> QuerySet[DepthJob]:
    """The caller's jobs, newest first: a user's own, an anonymous session's own; staff who may view every job
    (depth_job_may_list_everyone) may ask for all."""
    queryset = DepthJob.objects.select_related("owner", "model", "reused_from").order_by("-created_at", "id")
    if user.is_authenticated:
        return queryset if (everyone and depth_job_may_list_everyone(user=user)) else queryset.filter(owner=user)
    if session_key and settings.DEPTHSITE_PUBLIC_UPLOADS:
        return queryset.filter(owner__isnull=True, session_key=session_key)
    return queryset.none()


def depth_job_history(*, user, session_key: str = "", everyone: bool = False, status: str = "",
                      model: str = "") -> QuerySet[DepthJob]:
    """The history page's jobs: `depth_job_list`, narrowed to one status and one model when given (both checked
    by the caller against RunStatus and the catalogue names)."""
    queryset = depth_job_list(user=user, session_key=session_key, everyone=everyone)
    if status:
        queryset = queryset.filter(status=status)
    if model:
        queryset = queryset.filter(model_name=model)
    return queryset


def depth_job_model_names(*, jobs: QuerySet[DepthJob]) -> list[str]:
    """The model names to filter `jobs` by: the catalogue's, and those of these jobs whose model has gone since
    (only the caller's own jobs: another user's removed model is not named to them)."""
    names = set(RegisteredModel.objects.values_list("name", flat=True))
    names.update(jobs.order_by().values_list("model_name", flat=True).distinct())
    return sorted(name for name in names if name)


def depth_job_get(*, job_id, user) -> DepthJob:
    """A job the caller may see, else NotFoundError (a job of someone else's does not exist for them).

    Anonymous jobs are reachable by anyone holding their random id, like an unlisted link: that is how an
    anonymous API client without cookies reads back what it posted.
    """
    job = DepthJob.objects.select_related("owner", "model", "reused_from").filter(pk=job_id).first()
    if job is None or not _may_see(job, user):
        raise NotFoundError(f"no prediction with id {job_id}", extra={"id": str(job_id)})
    return job


def _may_see(job: DepthJob | DepthBatch, user) -> bool:
    if user.is_authenticated and job.owner_id == user.pk:
        return True
    if job.owner_id is not None:
        # Another user's: for staff with the view permission of jobs (of batches, whose archive holds jobs' results).
        return may_operate(user, "batches_view_others" if isinstance(job, DepthBatch) else "jobs_view_others")
    return uploads_allowed(user=user)


def depth_job_is_another_users(*, job: DepthJob, user) -> bool:
    """Whether the job belongs to a signed-in user other than the caller: a job the caller can only reach through
    an operator permission, whose refusal is a 403 (not the 404 of a job they cannot see)."""
    return bool(user.is_authenticated and job.owner_id is not None and job.owner_id != user.pk)


def _owns(job: DepthJob, user, session_key: str) -> bool:
    if user.is_authenticated:
        return job.owner_id == user.pk
    return job.owner_id is None and bool(session_key) and job.session_key == session_key


def depth_job_may_delete(*, job: DepthJob, user, session_key: str = "") -> bool:
    """Owners, and an anonymous job the session that uploaded it; any other job only staff holding
    inference.view_depthjob and inference.delete_depthjob."""
    if _owns(job, user, session_key):
        return True
    return may_operate(user, "jobs_delete_others")


def depth_job_may_run_again(*, job: DepthJob, user, session_key: str = "") -> bool:
    """Owners (or the uploading session); any other job only staff holding what the admin's re-run needs
    (inference.change_depthjob, with inference.view_depthjob)."""
    if _owns(job, user, session_key):
        return True
    return may_operate(user, "jobs_run_again_others")


@dataclass(frozen=True)
class ResultFile:
    name: str  # in the media storage (inference.media)
    content_type: str
    download_name: str


def depth_job_file(*, job: DepthJob, fmt: str) -> ResultFile:
    """One output of a finished job, with its content type and a file name for downloads."""
    relative = (job.result_files or {}).get(fmt) if job.status == RunStatus.SUCCEEDED else None
    # A recorded name never leads outside the job's own results folder, whatever the row holds.
    name = media_name_check(relative, under=f"{RESULTS_DIR}/{job.pk}")
    if name is None or not media_exists(name):
        raise NotFoundError(f"prediction {job.pk} has no {fmt!r} output"
                            + ("" if job.status == RunStatus.SUCCEEDED else f" (it is {job.status})"),
                            extra={"format": fmt, "available": sorted(job.result_files or {})})
    stem = Path(job.image_name or "image").stem[:80] or "image"
    return ResultFile(name=name, content_type=CONTENT_TYPES[fmt], download_name=f"{stem}-depth{SUFFIXES[fmt]}")


def depth_job_file_sizes(*, job: DepthJob) -> dict[str, int | None]:
    """Bytes of each recorded output of a job (None when it is missing or its name is not the job's own)."""
    sizes = {}
    for fmt, relative in (job.result_files or {}).items():
        name = media_name_check(relative, under=f"{RESULTS_DIR}/{job.pk}")
        sizes[fmt] = media_size(name) if name else None
    return sizes


def depth_job_input(*, job: DepthJob) -> tuple[str, str]:
    """The uploaded photo for display, served as stored: the upload when browsers show its format, else the
    upright PNG the worker made once (NotFoundError until it has). Returns (storage name, content type)."""
    name = media_name_check(job.image.name if job.image else None)
    if name is None or not media_exists(name):
        raise NotFoundError(f"the image of prediction {job.pk} is gone", extra={"id": str(job.pk)})
    if job.image_format in BROWSER_IMAGE_TYPES:
        return name, BROWSER_IMAGE_TYPES[job.image_format]
    preview = media_name_check(job.input_preview) if job.input_preview else None
    if preview is None or not media_exists(preview):
        raise NotFoundError(f"the preview of prediction {job.pk} is made when a worker runs it; try again then",
                            extra={"id": str(job.pk), "status": job.status})
    return preview, "image/png"


def depth_job_reused_from(*, job: DepthJob, user, session_key: str = "") -> str | None:
    """The id of the job whose result this one reused, only for a caller who owns that job (or staff who may view
    every job).

    Reuse now stays within one client (see job_results.result_reusable), but a job reused before that may
    point at a stranger's: its id would open that job's page (its file name, its times), so nobody else learns
    it, nor that an identical photo was sent before."""
    earlier = job.reused_from if job.reused_from_id else None
    if earlier is None:
        return None
    if user.is_authenticated:
        mine = ((earlier.owner_id is not None and earlier.owner_id == user.pk)
                or depth_job_may_list_everyone(user=user))
    else:
        mine = earlier.owner_id is None and bool(session_key) and earlier.session_key == session_key
    return str(earlier.pk) if mine else None


def depth_job_preview_format(*, job: DepthJob) -> str | None:
    """The output a page shows as the depth image: the colour PNG, else the 16-bit one."""
    for fmt in ("png", "png16"):
        if fmt in (job.result_files or {}):
            return fmt
    return None


def depth_job_public(*, job: DepthJob, user, session_key: str = "") -> dict[str, Any]:
    """A job's public facts for this caller, as stored (times as datetimes, timings unrounded): the one list of
    what a job shows, read by the API's PredictionSerializer and the pages' depth_job_summary."""
    return {
        "id": str(job.pk),
        "status": job.status,
        "attempts": job.attempts,
        "error": job.error,
        "error_code": job.error_code,
        "model": job.model_name,
        "outputs": list(job.outputs or []),
        "colormap": job.colormap,
        "fov": job.fov_degrees,
        "image": {"name": job.image_name, "size": job.image_size, "sha256": job.image_sha256,
                  "format": job.image_format, "width": job.image_width, "height": job.image_height},
        "created_at": job.created_at,
        "queued_at": job.queued_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "load_ms": job.load_ms,
        "inference_ms": job.inference_ms,
        "depth_min": job.depth_min,
        "depth_max": job.depth_max,
        "semantics": job.semantics,
        "weights_sha256": job.weights_sha256,
        "weights_format": job.weights_format,
        "device": job.device,
        "dtype": job.dtype,
        "reused_from": depth_job_reused_from(job=job, user=user, session_key=session_key),
        "preview": depth_job_preview_format(job=job),
    }


def depth_job_summary(job: DepthJob, *, user, session_key: str = "") -> dict[str, Any]:
    """Everything the job page and its live status show to this caller (URLs are added by each door): the public
    facts with times as ISO text and timings rounded, and whether the job is still active."""
    facts = depth_job_public(job=job, user=user, session_key=session_key)
    facts.update({name: iso_time(facts[name]) for name in ("created_at", "queued_at", "started_at", "finished_at")})
    facts.update({name: _round(facts[name]) for name in ("load_ms", "inference_ms")})
    return {"id": facts.pop("id"), "status": facts.pop("status"), "active": job.is_active,
            "terminal": job.is_terminal, **facts}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


@dataclass(frozen=True)
class ModelOption:
    name: str
    display_name: str
    cached: bool
    usable: bool  # False when a job with it cannot succeed on this site as it is
    note: str
    facts: dict = field(default_factory=dict)  # family, native input, size, CPU time, licence (selectors.model_facts)

    @property
    def family_label(self) -> str:
        return self.facts.get("family_label", "")


def model_notes_detailed(*, user) -> bool:
    """Whether the upload forms show `user` the operators' notes on each model (model_options' `detailed`): staff
    who may download models (the download permission of OPERATOR_PERMISSIONS), who are the ones to fix what they
    say. is_staff alone is not enough: such an account may change nothing in the registry."""
    return may_operate(user, "download")


def model_options(*, user=None) -> list[ModelOption]:
    """The enabled models, grouped by family, with what the upload page says about each to `user`: cached, will be
    downloaded, or why not (a licence this site refuses included).

    Only the notes for an operator (model_notes_detailed) name a mirror's host or quote a configuration error: the
    page is public when anonymous uploads are, and DEPTHSITE_MODEL_MIRROR is the operators' business. Without a
    user, the notes anyone may read (the names and choices are the same either way)."""
    from models_registry.selectors import models_by_family

    detailed = user is not None and model_notes_detailed(user=user)
    options = []
    for _, members in models_by_family(model_list(enabled_only=True)):
        for model, facts in members:
            option = _model_option(model, detailed=detailed)
            if not facts["license_accepted"]:
                # The setting and what it holds are the operators' business (as in model_license_check's
                # uploader wording); the licence itself is on the page anyway.
                license = model.license or "(none stated)"
                note = (f"refused here: its licence {license} is not in DEPTHSITE_ACCEPTED_LICENSES" if detailed
                        else f"refused here: this site does not accept its licence {license}")
                option = replace(option, usable=False, note=note)
            options.append(replace(option, facts=facts))
    return options


def _model_option(model: RegisteredModel, *, detailed: bool) -> ModelOption:
    from models_registry.services.transfer import download_url

    files = weight_files_usable(model=model)
    if files:
        best = files[0]
        return ModelOption(model.name, model.display_name, True, True,
                           f"cached ({best.format}, {format_size(best.size)})")
    active = download_active(model=model)
    if active is not None:
        total = active.bytes_total or model.expected_size
        progress = f" ({active.bytes_done * 100 // total}%)" if total else ""
        return ModelOption(model.name, model.display_name, False, True,
                           f"downloading now{progress}; jobs wait for it")
    return _uncached_option(model, download_url, detailed=detailed)


def _uncached_option(model: RegisteredModel, download_url, *, detailed: bool) -> ModelOption:
    size = f" ({format_size(model.expected_size)})" if model.expected_size else ""
    try:
        url = download_url(model=model)
    except ApplicationError as exc:
        why = exc.message if detailed else "it cannot be downloaded here (an administrator can see why)"
        return ModelOption(model.name, model.display_name, False, False, f"not cached, and {why}")
    if url.startswith("file:"):
        return ModelOption(model.name, model.display_name, False, True,
                           f"not cached: copied from the local mirror on first use{size}")
    if settings.DEPTHSITE_OFFLINE:
        # Operators get the command; everyone else only what it means for them.
        how = f" (manage.py models import PATH --model {model.name})" if detailed else ""
        return ModelOption(model.name, model.display_name, False, False,
                           f"not cached, and this site is offline: an administrator must import it first{how}")
    host = urlsplit(url).hostname or url
    if not detailed and url != model.source_url:
        host = "the site's model mirror"
    return ModelOption(model.name, model.display_name, False, True,
                       f"not cached: downloaded from {host} on first use{size}, which makes the first job slower")


def output_choices() -> list[tuple[str, str]]:
    labels = {"png": "colour PNG", "png16": "16-bit PNG (real range)", "npy": "NumPy .npy (float32)",
              "pfm": "PFM (float32, as MiDaS run.py)", "side": "photo and depth side by side",
              "ply": "3D point cloud .ply (relative depth)", "ply_preview": "3D preview .ply (downsampled)"}
    return [(fmt, labels.get(fmt, fmt)) for fmt in OUTPUT_FORMATS]


# --- batches -------------------------------------------------------------------------------------


def depth_batch_get(*, batch_id, user) -> DepthBatch:
    """A batch the caller may see, by the rule of jobs: a user's to that user and to staff who may view every batch
    and job; an anonymous one to whoever holds its random id (while anonymous uploads are on). Else NotFoundError."""
    batch = DepthBatch.objects.select_related("owner", "model").filter(pk=batch_id).first()
    if batch is None or not _may_see(batch, user):
        raise NotFoundError(f"no batch with id {batch_id}", extra={"id": str(batch_id)})
    return batch


def depth_batch_jobs(*, batch: DepthBatch) -> list[DepthJob]:
    """The batch's jobs in upload order; only those of the batch's own uploader (never another's job)."""
    jobs = DepthJob.objects.filter(batch=batch).select_related("owner", "model", "reused_from")
    if batch.owner_id is not None:
        jobs = jobs.filter(owner_id=batch.owner_id)
    else:
        jobs = jobs.filter(owner__isnull=True, session_key=batch.session_key)
    return list(jobs.order_by("created_at", "image_name", "id"))


def depth_batch_summary(*, batch: DepthBatch, jobs: list[DepthJob]) -> dict[str, Any]:
    """The batch's progress: counts per status, the share of jobs done, and each job's short state."""
    counts = {status: 0 for status in RunStatus.values}
    for job in jobs:
        counts[job.status] = counts.get(job.status, 0) + 1
    done = sum(1 for job in jobs if job.is_terminal)
    return {
        "id": str(batch.pk),
        "model": batch.model_name,
        "outputs": list(batch.outputs or []),
        "colormap": batch.colormap,
        "fov": batch.fov_degrees,
        "archive_name": batch.archive_name,
        "skipped": list(batch.skipped or []),
        "created_at": iso_time(batch.created_at),
        "total": len(jobs),
        "done": done,
        "counts": counts,
        "progress": round(done / len(jobs), 3) if jobs else 1.0,
        "complete": done == len(jobs),
        "jobs": [{"id": str(job.pk), "name": job.image_name, "status": job.status, "error": job.error,
                  "error_code": job.error_code, "width": job.image_width, "height": job.image_height,
                  "format": job.image_format, "outputs": sorted(job.result_files or {}) if job.is_terminal else [],
                  "preview": depth_job_preview_format(job=job) if job.status == RunStatus.SUCCEEDED else None,
                  "browser_image": job.image_format in BROWSER_IMAGE_TYPES or bool(job.input_preview)}
                 for job in jobs],
    }
