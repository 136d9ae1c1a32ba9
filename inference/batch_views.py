"""Web pages of batches: the batch upload form, a batch's page and live status, its outputs as one zip."""
from __future__ import annotations

from django.http import Http404, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import require_GET, require_http_methods

from depthsite.units import format_size
from inference.api.permissions import UploadThrottle
from inference.forms import BatchUploadLimitHandler, DepthBatchForm, batch_upload_handlers_install
from inference.sessions import upload_session_key
from inference.selectors import (
    depth_batch_get,
    depth_batch_jobs,
    depth_batch_summary,
    model_options,
)
from inference.services.jobs import DEFAULT_MODEL
from inference.services.batch_images import batch_max_bytes, batch_max_files, depth_batch_images_collect
from inference.services.batch_zip import depth_batch_archive_plan, depth_batch_archive_stream
from inference.services.batches import depth_batch_create
from inference.views import (
    _job_options_context,
    _polled,
    _refused_before_reading,
    _too_many_uploads,
    _uploads_allowed,
)
from models_registry.api.throttling import client_address
from depthsite.exceptions import ApplicationError, NotFoundError


def _batch(request, batch_id):
    try:
        return depth_batch_get(batch_id=batch_id, user=request.user)
    except NotFoundError:
        raise Http404("no such batch") from None


def _too_many_batch_uploads(count: int, remaining: int, wait: float | None) -> str:
    later = f" in {int(wait) + 1} s" if wait else " later"
    return (f"this batch of {count} photos would pass your upload rate ({remaining} more now); "
            f"send fewer, or try again{later}")


@csrf_exempt  # checked by _batch_upload once the size limit is in place, as for the single upload
@require_http_methods(["GET", "POST"])
def batch_upload(request):
    limit = None
    if request.method == "POST":
        refused = _refused_before_reading(request, form_class=DepthBatchForm, page=_batch_upload_page)
        if refused is not None:
            return refused
        limit = batch_upload_handlers_install(request, drain=True)
    return _batch_upload(request, limit=limit)


@csrf_protect
@_uploads_allowed
def _batch_upload(request, *, limit: BatchUploadLimitHandler | None):
    options = model_options(user=request.user)
    names = [option.name for option in options]
    if request.method != "POST":
        form = DepthBatchForm(model_names=names, default_model=DEFAULT_MODEL)
        return _batch_upload_page(request, form, status=200, options=options)
    form = DepthBatchForm(request.POST, request.FILES, model_names=names, default_model=DEFAULT_MODEL)
    # Its body has been read (the CSRF token is in it): the request counts one upload whatever becomes of it, as
    # at the single upload; the other N-1 photos count once known.
    throttle = UploadThrottle()
    if not throttle.allow_request(request, None):
        form.add_error(None, _too_many_uploads(throttle.wait()))
        return _batch_upload_page(request, form, status=429, options=options)
    if limit is not None and (limit.exceeded or limit.too_many_files):
        form.is_valid()
        form.errors.pop("images", None)
        refusal = limit.refusal()
        form.add_error("images", refusal.message[:1].upper() + refusal.message[1:])
        return _batch_upload_page(request, form, status=refusal.status, options=options)
    if not form.is_valid():
        return _batch_upload_page(request, form, status=400, options=options)
    data = form.cleaned_data
    try:
        with depth_batch_images_collect(images=data["images"], archive=data["archive"]) as photos:
            if not throttle.allow_uploads(request, len(photos) - 1):
                form.add_error(None, _too_many_batch_uploads(len(photos), throttle.remaining, throttle.wait()))
                return _batch_upload_page(request, form, status=429, options=options)
            batch = depth_batch_create(images=photos, model=data["model"], outputs=data["outputs"],
                                       colormap=data["colormap"], fov=data.get("fov"), owner=request.user,
                                       session_key=upload_session_key(request, create=True),
                                       client_address=client_address(request))
    except ApplicationError as exc:
        field = exc.extra.get("field")
        message = exc.message
        if field in form.fields and message.startswith(f"{field}: "):
            message = message[len(field) + 2:]
        form.add_error(field if field in form.fields else None, message)
        return _batch_upload_page(request, form, status=exc.status if 400 <= exc.status < 500 else 400,
                                  options=options)
    return redirect("inference:batch_detail", batch_id=batch.pk)


def _batch_upload_page(request, form: DepthBatchForm, *, status: int, options=None, refusal: str = ""):
    return render(request, "inference/batch_upload.html", {
        **_job_options_context(request, form, options=options, refusal=refusal),
        "max_files": batch_max_files(),
        "max_batch": format_size(batch_max_bytes()) if batch_max_bytes() else None,
    }, status=status)


def batch_urls(batch, summary: dict) -> dict:
    """The URLs of a batch and of each of its jobs, added to its summary by the web door."""
    jobs = []
    for item in summary["jobs"]:
        job_id = item["id"]
        preview = item["preview"]
        jobs.append({**item,
                     "page_url": reverse("inference:job_detail", args=[job_id]),
                     "input_url": reverse("inference:job_input", args=[job_id]) if item["browser_image"] else "",
                     "depth_url": reverse("inference:job_file", args=[job_id, preview]) if preview else ""})
    return {**summary, "jobs": jobs,
            "page_url": reverse("inference:batch_detail", args=[batch.pk]),
            "status_url": reverse("inference:batch_status", args=[batch.pk]),
            "archive_url": reverse("inference:batch_archive", args=[batch.pk])}


@require_GET
@_uploads_allowed
def batch_detail(request, batch_id):
    batch = _batch(request, batch_id)
    state = batch_urls(batch, depth_batch_summary(batch=batch, jobs=depth_batch_jobs(batch=batch)))
    return render(request, "inference/batch_detail.html", {"batch": batch, "state": state})


@never_cache
@require_GET
def batch_status(request, batch_id):
    """The small JSON the batch page polls."""
    def state() -> dict:
        batch = depth_batch_get(batch_id=batch_id, user=request.user)
        return batch_urls(batch, depth_batch_summary(batch=batch, jobs=depth_batch_jobs(batch=batch)))

    return _polled(request, what="batch", state=state)


@require_GET
@_uploads_allowed
def batch_archive(request, batch_id):
    """Every finished output of the batch as one zip, with a manifest of all its jobs (finished or not)."""
    batch = _batch(request, batch_id)
    entries, manifest = depth_batch_archive_plan(batch=batch, jobs=depth_batch_jobs(batch=batch))
    response = StreamingHttpResponse(depth_batch_archive_stream(entries=entries, manifest=manifest),
                                     content_type="application/zip")
    response["Content-Disposition"] = f'attachment; filename="depth-batch-{batch.short_id}.zip"'
    response["X-Batch-Complete"] = "true" if manifest["complete"] else "false"
    return response
