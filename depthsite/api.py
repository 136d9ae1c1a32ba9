"""REST plumbing shared by every API: domain errors rendered as {"message": ..., "extra": ...}."""
from __future__ import annotations

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from depthsite.exceptions import ApplicationError


def _first_message(detail) -> str:
    if isinstance(detail, dict):
        for field, value in detail.items():
            inner = _first_message(value)
            return inner if field in ("non_field_errors", "detail") else f"{field}: {inner}"
    if isinstance(detail, (list, tuple)) and detail:
        return _first_message(detail[0])
    return str(detail)


def _body_limit_response(exc) -> Response | None:
    """Django's refusals of a body over its limits (raised while DRF parses it): a JSON 413/400, not the HTML page
    Django would render for these SuspiciousOperations."""
    if isinstance(exc, RequestDataTooBig):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        return Response({"message": f"the request body is too large: over the limit of {limit} bytes "
                                    "(DATA_UPLOAD_MAX_MEMORY_SIZE); send a smaller body",
                         "extra": {"code": "too_large", "limit": limit}},
                        status=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE)
    for kind, setting, what in ((TooManyFieldsSent, "DATA_UPLOAD_MAX_NUMBER_FIELDS", "fields"),
                                (TooManyFilesSent, "DATA_UPLOAD_MAX_NUMBER_FILES", "files")):
        if isinstance(exc, kind):
            limit = getattr(settings, setting)
            return Response({"message": f"the request sends too many {what}: over the limit of {limit} ({setting})",
                             "extra": {"code": f"too_many_{what}", "limit": limit}},
                            status=status.HTTP_400_BAD_REQUEST)
    return None


# The next step in the API's own words, for domain errors that state a fact any door may meet (the CLI words
# the same kinds for its options: models_registry/management/base.py).
API_NEXT_STEPS: dict[str, str] = {
    "unknown_layout": "send the model field to see what differs",
    "ambiguous_model": "send the model field with one of them",
}


def exception_handler(exc, context):
    """One error shape for every endpoint: a message a person can read, and machine-readable extra."""
    if isinstance(exc, ApplicationError):
        step = API_NEXT_STEPS.get(str(exc.extra.get("kind", "")))
        message = f"{exc.message}; {step}" if step else exc.message
        extra = {**exc.extra, "hint": step} if step else exc.extra
        return Response({"message": message, "extra": extra}, status=exc.status)
    refused = _body_limit_response(exc)
    if refused is not None:
        return refused
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, exceptions.ValidationError):
        detail = exc.detail
        response.data = {"message": _first_message(detail), "extra": {"fields": detail}}
        status_code = getattr(exc, "status_code", status.HTTP_400_BAD_REQUEST)
        response.status_code = status_code
    else:
        detail = response.data.get("detail", response.data) if isinstance(response.data, dict) else response.data
        response.data = {"message": str(detail), "extra": {"code": getattr(detail, "code", None)}}
    return response
