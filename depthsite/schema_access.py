"""Who may read the OpenAPI schema and its Swagger UI: whoever may use the API.

The schema lists every endpoint, the operators' ones included. On an open site (DEPTHSITE_PUBLIC_UPLOADS or
DEPTHSITE_PUBLIC_STATUS on) anyone may call part of the API, so anyone may read it; on a closed site only signed-in
users (session or token) may. SPECTACULAR_SETTINGS["SERVE_PERMISSIONS"] names the permission, so every
drf-spectacular view has it (this module imports none of them: they read that setting as they are defined);
depthsite.schema_views words the refusals the site's way.
"""
from __future__ import annotations

from django.conf import settings
from rest_framework.permissions import BasePermission


def site_is_public() -> bool:
    """Whether anonymous visitors may use part of the API (read per request: an override applies at once)."""
    return bool(settings.DEPTHSITE_PUBLIC_UPLOADS or settings.DEPTHSITE_PUBLIC_STATUS)


class CanReadApiSchema(BasePermission):
    """The schema and its docs: anyone on an open site, signed-in users on a closed one."""

    message = "sign in (session or token) to read the API schema"

    def has_permission(self, request, view) -> bool:
        return site_is_public() or bool(request.user and request.user.is_authenticated)
