"""URL map: the web pages, the REST API with its schema and docs, accounts, and the admin."""
from django.conf import settings
from django.contrib import admin
from django.http import HttpResponsePermanentRedirect
from django.templatetags.static import static
from django.urls import include, path

from depthsite.auth_limits import (LimitedAdminAuthenticationForm, LimitedLoginView, LimitedPasswordChangeView,
                                   LimitedPasswordResetView, admin_login, admin_password_change)
from depthsite.schema_views import SchemaView, SwaggerView

admin.site.site_header = "depthsite administration"
admin.site.site_title = "depthsite administration"
admin.site.index_title = "Models, weight files, downloads and depth jobs"
# Failed admin sign-ins count with the site's (depthsite.auth_limits); admin_login below answers a refusal 429.
admin.site.login_form = LimitedAdminAuthenticationForm


def favicon(request):
    """Pages that name no icon (the API docs, a browser's first guess) ask for /favicon.ico: send them to ours."""
    return HttpResponsePermanentRedirect(static("depthsite/favicon.ico"))


urlpatterns = [
    path("favicon.ico", favicon, name="favicon"),
    path("", include("inference.urls")),
    path("models/", include("models_registry.urls")),
    path("api/predictions/", include("inference.api.urls")),
    path("api/models/", include("models_registry.api.urls")),
    # Served to whoever may use the API (depthsite.schema_access): anyone on an open site, else signed-in users.
    path("api/schema/", SchemaView.as_view(), name="schema"),
    path("api/docs/", SwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    # Sign-in, password change and password reset with their attempt limits (depthsite.auth_limits), ahead of
    # Django's own views at the same addresses; the rest of django.contrib.auth.urls (logout, the reset links) as
    # they are.
    path("accounts/login/", LimitedLoginView.as_view(), name="login"),
    path("accounts/password_change/", LimitedPasswordChangeView.as_view(), name="password_change"),
    path("accounts/password_reset/", LimitedPasswordResetView.as_view(), name="password_reset"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("admin/login/", admin_login),
    # The admin's own password change checks the old password unlimited: this one counts it with the sign-ins.
    path("admin/password_change/", admin.site.admin_view(admin_password_change, cacheable=True)),
    path("admin/", admin.site.urls),
]

if settings.DEBUG:
    from django.contrib.staticfiles.urls import staticfiles_urlpatterns

    urlpatterns += staticfiles_urlpatterns()

# Under /api/, Django's own error answers in the API's JSON shape (depthsite.error_pages).
handler400 = "depthsite.error_pages.bad_request"
handler403 = "depthsite.error_pages.permission_denied"
handler404 = "depthsite.error_pages.not_found"
handler500 = "depthsite.error_pages.server_error"
