"""Web pages of single jobs: the upload form, a job's page and live status, result files, the history; and the
upload checks and page pieces the batch pages (`batch_views.py`) share."""
from __future__ import annotations

import functools
from urllib.parse import urlencode

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import FileResponse, Http404, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_exempt, csrf_protect
from django.views.decorators.http import require_GET, require_http_methods, require_POST
from django.views.csrf import csrf_failure as django_csrf_failure

from depthsite.units import format_size
from inference.api.permissions import UploadThrottle
from inference.colormaps import DEFAULT_COLORMAP
from inference.images import ALPHA_NOTE, BROWSER_IMAGE_TYPES
from inference.forms import DepthJobForm, UploadLimitHandler
from inference.media import media_open_served
from inference.models import DepthJob
from depthsite.choices import RunStatus
from inference.sessions import upload_session_key
from inference.selectors import (
    depth_job_file,
    depth_job_file_sizes,
    depth_job_get,
    depth_job_history,
    depth_job_input,
    depth_job_is_another_users,
    depth_job_list,
    depth_job_model_names,
    depth_job_may_delete,
    depth_job_may_list_everyone,
    depth_job_may_run_again,
    depth_job_reused_from,
    depth_job_summary,
    model_options,
    output_choices,
    uploads_allowed,
)
from inference.services.jobs import DEFAULT_MODEL, depth_job_create, depth_job_delete
from inference.services.rerun import depth_job_run_again
from models_registry.api.throttling import client_address
from models_registry.catalogue import cpu_times_machine
from depthsite.exceptions import ApplicationError, NotFoundError

HISTORY_PAGE_SIZE = 20


def _uploads_allowed(view):
    """Anonymous visitors go to the login page unless DEPTHSITE_PUBLIC_UPLOADS is on."""
    @functools.wraps(view)
    def wrapper(request, *args, **kwargs):
        if not uploads_allowed(user=request.user):
            return redirect_to_login(request.get_full_path())
        return view(request, *args, **kwargs)

    return wrapper


def _job(request, job_id) -> DepthJob:
    try:
        return depth_job_get(job_id=job_id, user=request.user)
    except NotFoundError:
        raise Http404("no such job") from None


def _with_reuse_shown(request, jobs) -> list[DepthJob]:
    """Marks the jobs whose reused source the caller owns: only those say "reused" in a table."""
    session_key = upload_session_key(request)
    jobs = list(jobs)
    for job in jobs:
        job.reuse_shown = depth_job_reused_from(job=job, user=request.user, session_key=session_key) is not None
    return jobs


def job_urls(job: DepthJob) -> dict:
    files = {fmt: reverse("inference:job_file", args=[job.pk, fmt]) for fmt in (job.result_files or {})}
    return {
        "page_url": reverse("inference:job_detail", args=[job.pk]),
        "status_url": reverse("inference:job_status", args=[job.pk]),
        "input_url": reverse("inference:job_input", args=[job.pk]),
        "files": files,
        "downloads": {fmt: f"{url}?download=1" for fmt, url in files.items()},
    }


# --- upload --------------------------------------------------------------------------------------


def _too_many_uploads(wait: float | None) -> str:
    return "too many uploads from you; try again" + (f" in {int(wait) + 1} s" if wait else " later")


@csrf_exempt  # checked by _upload, once the size limit is in place (the CSRF check reads the body)
@require_http_methods(["GET", "POST"])
def upload(request):
    limit = None
    if request.method == "POST":
        refused = _refused_before_reading(request, form_class=DepthJobForm, page=_upload_page)
        if refused is not None:
            return refused
        limit = UploadLimitHandler(request, drain=True)
        request.upload_handlers.insert(0, limit)
    return _upload(request, limit=limit)


def _refused_before_reading(request, *, form_class, page):
    """Before a byte of an upload's body is read (the form's CSRF token is in it): who may upload at all, and
    whether this client is already over its rate. The response that refuses it, or None; the server discards
    the unread body itself."""
    if not uploads_allowed(user=request.user):
        return redirect_to_login(request.get_full_path())
    throttle = UploadThrottle()
    if not throttle.would_allow(request):
        names = [option.name for option in model_options()]
        form = form_class(model_names=names, default_model=DEFAULT_MODEL)
        return page(request, form, status=429, refusal=_too_many_uploads(throttle.wait()))
    return None


# The upload forms, whose CSRF token is only found by reading the body (up to the upload limit).
_UPLOAD_FORMS = ("inference:upload", "inference:batch_upload")


def csrf_failure(request, reason: str = ""):
    """Django's 403 for a failed CSRF check (CSRF_FAILURE_VIEW); at an upload form the request also counts as an
    upload against the rate. Its body was read to find the token, and a client that sent bodies with wrong tokens
    over and over was never counted, so the rate, which refuses before reading, never stopped it."""
    match = request.resolver_match
    if request.method == "POST" and match is not None and match.view_name in _UPLOAD_FORMS:
        UploadThrottle().allow_request(request, None)
    return django_csrf_failure(request, reason=reason)


@csrf_protect
@_uploads_allowed
def _upload(request, *, limit: UploadLimitHandler | None):
    options = model_options(user=request.user)
    names = [option.name for option in options]
    status = 200
    if request.method == "POST":
        form = DepthJobForm(request.POST, request.FILES, model_names=names, default_model=DEFAULT_MODEL)
        throttle = UploadThrottle()
        if not throttle.allow_request(request, None):
            form.add_error(None, _too_many_uploads(throttle.wait()))
            status = 429
        elif limit is not None and limit.exceeded:
            form.is_valid()
            form.errors.pop("image", None)
            form.add_error("image", limit.refusal().message)
            status = 413
        elif form.is_valid():
            data = form.cleaned_data
            try:
                job = depth_job_create(image=data["image"], model=data["model"], outputs=data["outputs"],
                                       colormap=data["colormap"], fov=data.get("fov"), owner=request.user,
                                       session_key=upload_session_key(request, create=True),
                                       client_address=client_address(request))
            except ApplicationError as exc:
                field = exc.extra.get("field")
                form.add_error(field if field in form.fields else None, exc.message)
                status = exc.status if 400 <= exc.status < 500 else 400
            else:
                return redirect("inference:job_detail", job_id=job.pk)
        else:
            status = 400
    else:
        form = DepthJobForm(model_names=names, default_model=DEFAULT_MODEL)
    return _upload_page(request, form, status=status, options=options)


def _job_options_context(request, form, *, options=None, refusal: str = "") -> dict:
    """What the job options (templates/inference/_job_options.html) and the limits beside them need, for the
    single upload form and the batch form alike."""
    return {
        "form": form,
        "model_options": model_options(user=request.user) if options is None else options,
        "cpu_times_machine": cpu_times_machine(),
        "selected_model": form["model"].value() or DEFAULT_MODEL,
        "selected_outputs": form["outputs"].value() or ["png"],
        "selected_colormap": form["colormap"].value() or DEFAULT_COLORMAP,
        "output_choices": output_choices(),
        "max_upload": format_size(settings.DEPTHSITE_MAX_UPLOAD_BYTES) if settings.DEPTHSITE_MAX_UPLOAD_BYTES else None,
        "max_megapixels": settings.DEPTHSITE_MAX_IMAGE_PIXELS / 1e6,
        "alpha_note": ALPHA_NOTE,
        "refusal": refusal,
    }


def _upload_page(request, form: DepthJobForm, *, status: int, options=None, refusal: str = ""):
    recent = _with_reuse_shown(request, depth_job_list(user=request.user, session_key=upload_session_key(request))[:5])
    return render(request, "inference/upload.html",
                  {**_job_options_context(request, form, options=options, refusal=refusal), "recent": recent},
                  status=status)


# --- a job ---------------------------------------------------------------------------------------


@require_GET
@_uploads_allowed
def job_detail(request, job_id):
    return _job_page(request, _job(request, job_id))


def _job_page(request, job: DepthJob, *, run_again_error: str = "", status: int = 200):
    summary = depth_job_summary(job, user=request.user, session_key=upload_session_key(request))
    urls = job_urls(job)
    labels = dict(output_choices())
    files = []
    sizes = depth_job_file_sizes(job=job)
    for fmt, url in urls["files"].items():
        size = sizes.get(fmt)
        files.append({"format": fmt, "label": labels.get(fmt, fmt), "url": url, "download": urls["downloads"][fmt],
                      "size": format_size(size) if size is not None else "missing"})
    return render(request, "inference/job_detail.html", {
        "job": job,
        "summary": summary,
        "urls": urls,
        "files": files,
        "preview_url": urls["files"].get(summary["preview"]) if summary["preview"] else None,
        "state": {**summary, **urls, "labels": labels},
        "can_delete": depth_job_may_delete(job=job, user=request.user, session_key=upload_session_key(request)),
        "alpha_note": ALPHA_NOTE if _input_had_alpha(job) else "",
        **_run_again_context(request, job, error=run_again_error),
    }, status=status)


def _refused(request, job: DepthJob, what: str):
    """The refusal of an action on a job the caller may see but not act on: 403 for another user's job (seen through
    the view permission, acted on only with the action's own: models_registry.api.permissions), else the 404 of a
    job that is not theirs."""
    if depth_job_is_another_users(job=job, user=request.user):
        raise PermissionDenied(f"you may see this job but not {what}: that needs another permission")
    raise Http404("no such job")


def _run_again_context(request, job: DepthJob, *, error: str = "") -> dict:
    """The "run again with another model" form: for a finished job, to its owner (or uploading session) and staff
    holding the re-run permission."""
    allowed = (job.status in RunStatus.TERMINAL
               and depth_job_may_run_again(job=job, user=request.user, session_key=upload_session_key(request)))
    names = [option.name for option in model_options()] if allowed else []
    return {"can_run_again": allowed, "run_again_models": [name for name in names if name != job.model_name],
            "run_again_error": error}


@csrf_exempt  # checked by _job_run_again once the upload rules are in place, as for the upload form
@require_POST
def job_run_again(request, job_id):
    # The upload rules first: who may upload at all, and the upload rate, before the body is read.
    if not uploads_allowed(user=request.user):
        return redirect_to_login(reverse("inference:job_detail", args=[job_id]))
    return _job_run_again(request, job_id)


@csrf_protect
def _job_run_again(request, job_id):
    job = _job(request, job_id)
    if not depth_job_may_run_again(job=job, user=request.user, session_key=upload_session_key(request)):
        _refused(request, job, "run it again")  # someone else's job: not theirs to spend a quota or a worker on
    throttle = UploadThrottle()
    if not throttle.allow_request(request, None):
        return _job_page_with_error(request, job, _too_many_uploads(throttle.wait()), status=429)
    model = request.POST.get("model", "")
    try:
        new_job = depth_job_run_again(job=job, model=model, owner=request.user,
                                      session_key=upload_session_key(request, create=True),
                                      client_address=client_address(request))
    except ApplicationError as exc:
        return _job_page_with_error(request, job, exc.message, status=exc.status if 400 <= exc.status < 500 else 400)
    messages.success(request, f"Job {new_job.short_id} runs the photo of job {job.short_id} with {new_job.model_name}.")
    return redirect("inference:job_detail", job_id=new_job.pk)


def _job_page_with_error(request, job: DepthJob, error: str, *, status: int):
    return _job_page(request, job, run_again_error=error, status=status)


def _input_had_alpha(job: DepthJob) -> bool:
    """Recorded at upload: a page view never reads the stored photo, whose header a stranger wrote (a JPEG of
    millions of empty markers cost seconds and hundreds of MB to parse, on every view). Jobs from before the
    column (empty) say nothing."""
    return bool(job.image_alpha)


@never_cache
@require_GET
def job_status(request, job_id):
    """The small JSON the job page polls."""
    def state() -> dict:
        job = depth_job_get(job_id=job_id, user=request.user)
        return {**depth_job_summary(job, user=request.user, session_key=upload_session_key(request)), **job_urls(job)}

    return _polled(request, what="job", state=state)


def _polled(request, *, what: str, state) -> JsonResponse:
    """What a page polls: `state()` as JSON; 403 for who may not upload, 404 (JSON) for what is not theirs."""
    if not uploads_allowed(user=request.user):
        return JsonResponse({"message": f"sign in to see this {what}", "extra": {}}, status=403)
    try:
        return JsonResponse(state())
    except NotFoundError as exc:
        return JsonResponse({"message": exc.message, "extra": exc.extra}, status=404)


@require_GET
@_uploads_allowed
def job_file(request, job_id, fmt: str):
    job = _job(request, job_id)
    try:
        result = depth_job_file(job=job, fmt=fmt)
        # Streamed from the media storage, after the access check above (no public or presigned URL).
        stored = media_open_served(result.name)
    except NotFoundError:
        raise Http404("no such output") from None
    return FileResponse(stored, content_type=result.content_type, as_attachment=bool(request.GET.get("download")),
                        filename=result.download_name)


@require_GET
@_uploads_allowed
def job_input(request, job_id):
    job = _job(request, job_id)
    try:
        name, content_type = depth_job_input(job=job)
        stored = media_open_served(name)
    except NotFoundError as exc:
        raise Http404(exc.message) from None
    return FileResponse(stored, content_type=content_type)


@require_POST
@_uploads_allowed
def job_delete(request, job_id):
    job = _job(request, job_id)
    if not depth_job_may_delete(job=job, user=request.user, session_key=upload_session_key(request)):
        _refused(request, job, "delete it")
    short_id = job.short_id
    outcome = depth_job_delete(job=job)
    messages.success(request, f"Deleted job {short_id} and its files ({format_size(outcome['bytes'])}).")
    return redirect("inference:job_list")


# --- history -------------------------------------------------------------------------------------


def _history_filters(request) -> tuple[dict, list[str], bool]:
    """`status`, `model` and (staff who may view every job) `everyone` from the query, each checked; the problems
    as sentences, and whether one of them is a refused permission (a 403, not a 400)."""
    problems = []
    refused = False
    everyone = request.GET.get("everyone", "")
    if everyone not in ("", "0", "1"):
        problems.append("everyone is 1 (every user's jobs) or 0 (yours)")
        everyone = ""
    if everyone == "1" and not depth_job_may_list_everyone(user=request.user):
        problems.append("only staff can list everyone's jobs, and only with the permission to view depth jobs")
        everyone = ""
        refused = True
    status = request.GET.get("status", "")
    if status and status not in RunStatus.values:
        problems.append(f"unknown status {status[:40]!r}; one of: {', '.join(RunStatus.values)}")
        status = ""
    model = request.GET.get("model", "")
    names = depth_job_model_names(jobs=depth_job_list(user=request.user, session_key=upload_session_key(request),
                                                      everyone=everyone == "1"))
    if model and model not in names:
        problems.append(f"unknown model {model[:64]!r}; one of: {', '.join(names)}")
        model = ""
    return {"status": status, "model": model, "everyone": everyone == "1", "model_names": names,
            "statuses": RunStatus.values}, problems, refused


@require_GET
@_uploads_allowed
def job_list(request):
    filters, problems, refused = _history_filters(request)
    jobs = depth_job_history(user=request.user, session_key=upload_session_key(request), everyone=filters["everyone"],
                             status=filters["status"], model=filters["model"])
    page = Paginator(jobs, HISTORY_PAGE_SIZE).get_page(request.GET.get("page"))
    jobs = _with_reuse_shown(request, page.object_list)
    for job in jobs:
        urls = job_urls(job)
        job.input_thumb = urls["input_url"] if job.image_format in BROWSER_IMAGE_TYPES or job.input_preview else ""
        job.depth_thumb = urls["files"].get("png", "") if job.status == RunStatus.SUCCEEDED else ""
    query = {key: value for key, value in (("status", filters["status"]), ("model", filters["model"]),
                                          ("everyone", "1" if filters["everyone"] else "")) if value}
    return render(request, "inference/job_list.html", {
        "page": page, "jobs": jobs, "filters": filters, "problems": problems, "query": urlencode(query),
        "filtered": bool(filters["status"] or filters["model"]), "show_owner": filters["everyone"],
        "may_list_everyone": depth_job_may_list_everyone(user=request.user),
    }, status=403 if refused else 400 if problems else 200)

