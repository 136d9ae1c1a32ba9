"""Refuses a request body larger than its address can take, from the declared length, before a byte is read.

Django reads a body as soon as anything asks for `request.POST`, and the CSRF check asks first: a form's token
is in the body. Without a bound in front, a POST of gigabytes with a wrong token was read whole (the web forms
read an oversized photo on, to show the form again), answered 403, and never counted against the upload rate.
Each address takes what it can use: a photo's limit where photos are uploaded, a batch's where batches are,
the import limit at the weight import, and DATA_UPLOAD_MAX_MEMORY_SIZE (Django's bound on form fields and JSON)
everywhere else; each with room for the multipart envelope around it. The web forms read a body of up to
FORM_DRAIN_FACTOR times their limit on (dropping the file) so that the form comes back with the user's choices
and the size next to the file; past that, they too get the short page, unread.
"""
from __future__ import annotations

import html
from typing import Callable

from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler
from django.http import HttpResponse, JsonResponse
from django.urls import Resolver404, resolve

from depthsite.exceptions import ApplicationError, InvalidRequestError, TooLargeError
from depthsite.units import format_size
from inference.forms import ENVELOPE_BYTES, BatchUploadLimitHandler, UploadLimitHandler
from models_registry.api.uploads import ImportUploadHandler


class LengthRequiredError(ApplicationError):
    """A body of unknown length (chunked): Django reads no byte of it, so an upload would arrive empty."""

    status = 411


def _import_handler() -> ImportUploadHandler:
    return ImportUploadHandler(max_bytes=settings.DEPTHSITE_MAX_IMPORT_BYTES)


# The addresses that take uploads (URL names), each with the upload handler its door installs: asked about the
# declared length alone (its `unread_refusal`), it refuses exactly what the door would, in the door's words, so the
# two never disagree. The web forms' handlers read an oversized body on to show the form again, up to
# FORM_DRAIN_FACTOR times their limit (inference.forms).
UPLOAD_DOORS: dict[str, Callable[[], FileUploadHandler]] = {
    "inference:upload": lambda: UploadLimitHandler(drain=True),
    "inference:batch_upload": lambda: BatchUploadLimitHandler(drain=True),
    "predictions-api:prediction-list": lambda: UploadLimitHandler(drain=False),
    "predictions-api:batch-create": lambda: BatchUploadLimitHandler(drain=False),
    "models-api:import": _import_handler,
    "models-api:import-alt": _import_handler,
}

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title></head>
<body><h1>{title}</h1><p>{message}</p>{back}</body></html>
"""


def _declared_length(request) -> int | None:
    """The body's Content-Length; None when the request declares none; ValueError when it is not a byte count."""
    text = (request.META.get("CONTENT_LENGTH") or "").strip()
    if not text:
        return None
    length = int(text)  # as Django reads it (surrounding spaces, a sign); ValueError when it is no number
    if length < 0:
        raise ValueError(text)
    return length


def _view_name(request) -> str | None:
    try:
        return resolve(request.path_info).view_name
    except Resolver404:
        return None


def _default_refusal(length: int) -> TooLargeError | None:
    if settings.DATA_UPLOAD_MAX_MEMORY_SIZE is None:  # Django's own bound turned off: so is this one
        return None
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE + ENVELOPE_BYTES
    if length <= limit:
        return None
    return TooLargeError(f"the request body is {format_size(length)}, over the {format_size(limit)} this address "
                         "takes (DATA_UPLOAD_MAX_MEMORY_SIZE); photos go to the upload form or the API",
                         extra={"kind": "too_many_bytes", "limit": limit, "size": length})


def body_refusal(request) -> ApplicationError | None:
    """Why this request's body will not be read (its `status` says it over HTTP); None when it may be."""
    try:
        length = _declared_length(request)
    except ValueError:
        return InvalidRequestError("the Content-Length header is not a number of bytes", extra={"kind": "bad_length"})
    if length is None:
        if request.META.get("HTTP_TRANSFER_ENCODING"):
            return LengthRequiredError("the request body has no Content-Length (it is chunked); send it with a "
                                       "Content-Length header", extra={"kind": "length_required"})
        return None
    if length == 0:
        return None
    door = UPLOAD_DOORS.get(_view_name(request) or "")
    return door().unread_refusal(length) if door is not None else _default_refusal(length)


class RequestBodyLimitMiddleware:
    """Answers a body over its address's limit (413), of unknown length (411) or with a malformed length (400)
    before anything reads it: JSON like every API error under /api/, a short page elsewhere. Placed before the
    CSRF middleware and every door. gunicorn (deploy/) closes the connection on the unread body; Django's
    runserver (`make run`, loopback only) still reads it before the next request on that connection."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        refusal = body_refusal(request)
        if refusal is None:
            return self.get_response(request)
        if request.path_info.startswith("/api/"):
            return JsonResponse({"message": refusal.message, "extra": refusal.extra}, status=refusal.status)
        return HttpResponse(_page(request, refusal), status=refusal.status, content_type="text/html; charset=utf-8")


def _page(request, refusal: ApplicationError) -> str:
    message = refusal.message[:1].upper() + refusal.message[1:]
    upload_form = _view_name(request) in UPLOAD_DOORS
    title = ("Request body not read" if refusal.status != 413 else
             "Upload too large" if upload_form else "Request body too large")
    # An upload form is shown again at its own address; another address has no form to go back to.
    back = f'<p><a href="{html.escape(request.path)}">Back to the form</a></p>' if upload_form else ""
    return _PAGE.format(title=title, message=html.escape(message), back=back)
