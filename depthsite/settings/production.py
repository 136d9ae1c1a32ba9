"""Production settings: the base settings with debug off, HTTPS enforced and static files served by whitenoise.

Use with `DJANGO_SETTINGS_MODULE=depthsite.settings.production` (gunicorn, qcluster, manage.py); every value
still comes from depthsite.env, whose production defaults are the secure ones.
"""
import re

from django.conf import global_settings
from django.core.exceptions import ImproperlyConfigured

from depthsite import env
from depthsite import settings as _base
from depthsite.settings import *  # noqa: F401,F403
from depthsite.settings import CACHES, MIDDLEWARE
from depthsite.settings.base import shared_caches

if env.DEBUG:
    # Refuse rather than silently override: a deployment that asks for debug pages is misconfigured.
    raise ImproperlyConfigured("depthsite.settings.production needs DJANGO_DEBUG=0")
DEBUG = False
# The upload rates are counted in the cache: one that each gunicorn worker keeps for itself would count them per
# worker, several times the rate the settings name.
CACHES = shared_caches(CACHES)

# WhiteNoise serves collected static files straight after the security middleware (so redirects and
# security headers still apply), with hashed names cached for a year and pre-compressed variants.
MIDDLEWARE = list(MIDDLEWARE)
MIDDLEWARE.insert(MIDDLEWARE.index("django.middleware.security.SecurityMiddleware") + 1,
                  "whitenoise.middleware.WhiteNoiseMiddleware")
STORAGES = {
    **getattr(_base, "STORAGES", global_settings.STORAGES),
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

SECURE_SSL_REDIRECT = env.SECURE_SSL_REDIRECT
SESSION_COOKIE_SECURE = env.SECURE_COOKIES
CSRF_COOKIE_SECURE = env.SECURE_COOKIES
if env.SECURE_HSTS_SECONDS < 0:
    raise ImproperlyConfigured(f"DJANGO_SECURE_HSTS_SECONDS={env.SECURE_HSTS_SECONDS} must be 0 (off) or more")
SECURE_HSTS_SECONDS = env.SECURE_HSTS_SECONDS
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.SECURE_HSTS_INCLUDE_SUBDOMAINS
SECURE_HSTS_PRELOAD = env.SECURE_HSTS_PRELOAD
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True


def _proxy_ssl_header(name: str) -> tuple[str, str] | None:
    """`X-Forwarded-Proto` -> ("HTTP_X_FORWARDED_PROTO", "https"); only set when a proxy overwrites that header.

    Trusting a header that clients can send themselves would let any client claim HTTPS, so there is no default.
    """
    if not name:
        return None
    if not re.fullmatch(r"[A-Za-z0-9]+(-[A-Za-z0-9]+)*", name):
        raise ImproperlyConfigured(
            f"DJANGO_SECURE_PROXY_SSL_HEADER={name!r} is not an HTTP header name (e.g. X-Forwarded-Proto)")
    return "HTTP_" + name.upper().replace("-", "_"), "https"


SECURE_PROXY_SSL_HEADER = _proxy_ssl_header(env.SECURE_PROXY_SSL_HEADER)
