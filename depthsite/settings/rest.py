"""Django REST framework and the OpenAPI schema."""
from depthsite import env

REST_FRAMEWORK = {
    # Token first: its WWW-Authenticate header makes an anonymous caller's refusal a 401, not a 403.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # One JSON parser for every view: deep nesting and undecodable bodies are a 400, never a 500.
    "DEFAULT_PARSER_CLASSES": [
        "depthsite.parsers.JSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": 20,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "depthsite.api.exception_handler",
    "DEFAULT_THROTTLE_RATES": {
        "uploads": env.UPLOAD_RATE,
        "writes": env.WRITE_RATE,
    },
}

SPECTACULAR_SETTINGS = {
    "TITLE": "depthsite API",
    "DESCRIPTION": "Monocular depth estimation with MiDaS: predictions and the model registry.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # The schema and its docs list every operator endpoint: served to whoever may use the API (anyone while
    # DEPTHSITE_PUBLIC_UPLOADS or DEPTHSITE_PUBLIC_STATUS is on, else signed-in users), not to anyone at all.
    "SERVE_PERMISSIONS": ["depthsite.schema_access.CanReadApiSchema"],
    # Separate request and response components, so file fields are documented as binary uploads.
    "COMPONENT_SPLIT_REQUEST": True,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}
