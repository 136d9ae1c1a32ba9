"""Responses are private by default: `Cache-Control: private, no-store` on every response that names no caching
of its own.

Job pages, results, uploads, batch archives and API answers are one client's; without a header, a shared cache
is held off only by `Vary: Cookie` (or the rule for an Authorization header), and a browser keeps them on disk after
sign-out, for the next user of a shared computer. A view that may be cached says so itself; static files are
served before this (WhiteNoise, or runserver's handler) with their own long-lived headers."""
from __future__ import annotations

from typing import Callable

from django.http import HttpRequest, HttpResponse

DEFAULT = "private, no-store"


class PrivateByDefaultMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        if "Cache-Control" not in response:
            response["Cache-Control"] = DEFAULT
        return response
