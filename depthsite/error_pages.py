"""Django's own error answers (a path no view serves, a server error, a refused request) in the API's shape under
/api/: {"message", "extra"} as JSON, like every answer of a view there. Elsewhere they are Django's pages.

DRF renders the errors its views raise; these are the ones no view saw: an unrouted /api/ address (a client's
typo, a trailing part too many) and an exception that escaped the exception handler (a 500)."""
from __future__ import annotations

from django.http import JsonResponse
from django.views import defaults

API_PREFIX = "/api/"


def _wants_api(request) -> bool:
    # path_info: the address within the site, also when it is served under a prefix (SCRIPT_NAME).
    return request.path_info.startswith(API_PREFIX)


def _api_error(status: int, message: str, code: str) -> JsonResponse:
    return JsonResponse({"message": message, "extra": {"code": code}}, status=status)


def not_found(request, exception=None):
    if _wants_api(request):
        return _api_error(404, f"no such API address: {request.path[:200]}; see /api/docs/", "not_found")
    return defaults.page_not_found(request, exception)


def server_error(request):
    if _wants_api(request):
        # Nothing of the failure: it is in the server's log.
        return _api_error(500, "the server failed to answer this request; it has been logged", "server_error")
    return defaults.server_error(request)


def bad_request(request, exception=None):
    if _wants_api(request):
        return _api_error(400, "the request could not be understood", "bad_request")
    return defaults.bad_request(request, exception)


def permission_denied(request, exception=None):
    if _wants_api(request):
        return _api_error(403, "you may not do this", "permission_denied")
    return defaults.permission_denied(request, exception)
