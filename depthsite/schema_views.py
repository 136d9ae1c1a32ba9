"""The OpenAPI schema and Swagger UI views, refusing in the site's words (who may read them:
depthsite.schema_access, through SPECTACULAR_SETTINGS["SERVE_PERMISSIONS"]): the schema with the API's JSON error
(401 for an anonymous caller), the docs page by sending a browser to the login page, as the other closed pages do.
"""
from __future__ import annotations

from django.contrib.auth.views import redirect_to_login
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView
from rest_framework import exceptions
from rest_framework.renderers import JSONRenderer


class SchemaView(SpectacularAPIView):
    """The OpenAPI document; a refusal is the API's JSON error, not an error document in OpenAPI's YAML."""

    def handle_exception(self, exc):
        response = super().handle_exception(exc)
        # The OpenAPI renderer content negotiation picked would write the error as YAML.
        self.request.accepted_renderer = JSONRenderer()
        self.request.accepted_media_type = JSONRenderer.media_type
        return response


class SwaggerView(SpectacularSwaggerSplitView):
    """The Swagger UI page; an anonymous visitor of a closed site is sent to the login page and back.

    The split view serves the page's start-up script from its own URL (`?script`): inline, the site's
    Content-Security-Policy (depthsite.csp) would refuse to run it."""

    def handle_exception(self, exc):
        if isinstance(exc, exceptions.NotAuthenticated) and not self.request.user.is_authenticated:
            return redirect_to_login(self.request.get_full_path())
        return super().handle_exception(exc)
