"""URL map: the web pages, the REST API with its schema and docs, accounts, and the admin."""
from django.conf import settings
from django.contrib import admin
from django.http import HttpResponsePermanentRedirect
from django.templatetags.static import static
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

admin.site.site_header = "depthsite administration"
admin.site.site_title = "depthsite administration"
admin.site.index_title = "Models, weight files, downloads and depth jobs"


def favicon(request):
    """Pages that name no icon (the API docs, a browser's first guess) ask for /favicon.ico: send them to ours."""
    return HttpResponsePermanentRedirect(static("depthsite/favicon.ico"))


urlpatterns = [
    path("favicon.ico", favicon, name="favicon"),
    path("", include("inference.urls")),
    path("models/", include("models_registry.urls")),
    path("api/predictions/", include("inference.api.urls")),
    path("api/models/", include("models_registry.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("admin/", admin.site.urls),
]

if settings.DEBUG:
    from django.contrib.staticfiles.urls import staticfiles_urlpatterns

    urlpatterns += staticfiles_urlpatterns()
