"""REST routes of the model registry, at the seed's paths; each also answers with the other trailing-slash form."""
from django.urls import path

from models_registry.api import views

app_name = "models-api"


def route(canonical: str, view, name: str) -> list:
    """The canonical path, plus its twin with (or without) a trailing slash, left out of the OpenAPI schema.

    The seed's scripts call `/api/models/status` and `.../cache/clear` without a slash; Django's APPEND_SLASH
    cannot redirect a POST, so both spellings are routed explicitly.
    """
    patterns = [path(canonical, view.as_view(), name=name)]
    if canonical:  # the list is the include's root: "api/models/" only
        twin = canonical[:-1] if canonical.endswith("/") else canonical + "/"
        patterns.append(path(twin, view.as_view(schema=None), name=f"{name}-alt"))
    return patterns


urlpatterns = [
    *route("", views.ModelListApi, "list"),
    # Fixed words before `<str:name>/...`, so that "status", "cache" or "import" is never taken for a model.
    *route("status", views.ModelStatusApi, "status"),
    *route("cache/info", views.CacheInfoApi, "cache-info"),
    *route("cache/clear", views.CacheClearApi, "cache-clear"),
    *route("cache/optimize", views.CacheOptimizeApi, "cache-optimize"),
    *route("import", views.WeightImportApi, "import"),
    *route("downloads/<int:pk>", views.DownloadDetailApi, "download-detail"),
    *route("runs/<int:pk>", views.ManagementRunDetailApi, "run-detail"),
    *route("<str:name>/", views.ModelDetailApi, "detail"),
    *route("<str:name>/download", views.ModelDownloadApi, "download"),
    *route("<str:name>/verify", views.ModelVerifyApi, "verify"),
    *route("<str:name>/convert", views.ModelConvertApi, "convert"),
    *route("<str:name>/export", views.ModelExportApi, "export"),
]
