"""REST plumbing shared by every API: domain errors rendered as {"message": ..., "extra": ...}."""
from __future__ import annotations

from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from models_registry.exceptions import ApplicationError


def _first_message(detail) -> str:
    if isinstance(detail, dict):
        for field, value in detail.items():
            inner = _first_message(value)
            return inner if field in ("non_field_errors", "detail") else f"{field}: {inner}"
    if isinstance(detail, (list, tuple)) and detail:
        return _first_message(detail[0])
    return str(detail)


def exception_handler(exc, context):
    """One error shape for every endpoint: a message a person can read, and machine-readable extra."""
    if isinstance(exc, ApplicationError):
        return Response({"message": exc.message, "extra": exc.extra}, status=exc.status)
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
