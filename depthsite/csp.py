"""A Content-Security-Policy on every response: a page runs only the site's own scripts.

Templates escape what users send (file names, error texts), and this is the second wall behind that: should
markup ever slip through, the browser refuses to run any script the site did not serve itself. Inline scripts
are refused unless they carry the request's nonce (`request.csp_nonce`: the 3D viewer's import map is the only
one), event-handler attributes and `javascript:` URLs never run, nothing may frame the site, forms post only to
it, and a page cannot load from or talk to another origin.

Styles may be inline: the admin's markup and Swagger UI set `style` attributes, and a style cannot run code.

Anything that is not an HTML page (JSON, a result file, a weight export) gets the closed policy: opened directly
in a tab, it renders as a sandboxed document that may load nothing.
"""
from __future__ import annotations

import secrets
from typing import Callable

from django.http import HttpRequest, HttpResponse

HEADER = "Content-Security-Policy"
_PAGE = ("default-src 'self'; script-src 'self' 'nonce-{nonce}'; style-src 'self' 'unsafe-inline'; "
         "img-src 'self' data: blob:; connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
         "frame-ancestors 'none'; form-action 'self'")
CLOSED = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'; sandbox"


def page_policy(nonce: str) -> str:
    return _PAGE.format(nonce=nonce)


def _is_html(response: HttpResponse) -> bool:
    return response.get("Content-Type", "").split(";", 1)[0].strip().lower() == "text/html"


class ContentSecurityPolicyMiddleware:
    """Gives each request a fresh nonce and each response its policy (a view that set one keeps its own)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        request.csp_nonce = secrets.token_urlsafe(18)
        response = self.get_response(request)
        if HEADER not in response:
            response[HEADER] = page_policy(request.csp_nonce) if _is_html(response) else CLOSED
        return response
