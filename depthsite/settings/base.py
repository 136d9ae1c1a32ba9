"""Django core: apps, middleware, templates, static and media files, security."""
import os
import secrets
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from depthsite import env

BASE_DIR = env.BASE_DIR
DEBUG = env.DEBUG
ALLOWED_HOSTS = env.ALLOWED_HOSTS
CSRF_TRUSTED_ORIGINS = env.CSRF_TRUSTED_ORIGINS


TEST_SETTINGS_MODULE = "depthsite.settings.test"


def _secret_key() -> str:
    """DJANGO_SECRET_KEY; else the local key in var/secret_key (created by a debug run such as `make run`)."""
    if env.SECRET_KEY:
        return env.SECRET_KEY
    key_file = env.VAR_DIR / "secret_key"
    try:
        # A local key that survives restarts, so sessions stay valid across `make run`s, and the commands
        # run beside it (createsuperuser, models ...) sign with the same key.
        return key_file.read_text().strip()
    except FileNotFoundError:
        pass
    if env.SETTINGS_MODULE == TEST_SETTINGS_MODULE:
        return ""  # the test settings set their own key
    if not env.DEBUG:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY must be set when DJANGO_DEBUG is off (the default); for a local site, `make run` "
            f"turns debug on and keeps a generated key in {key_file}"
        )
    env.VAR_DIR.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(50)
    # Written whole under a temporary name, then linked: the web server and the task cluster start
    # together, and the one that loses the race reads the winner's complete key.
    tmp = key_file.with_name(f".secret_key-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key)
    try:
        os.link(tmp, key_file)
    except FileExistsError:
        key = key_file.read_text().strip()
    finally:
        os.unlink(tmp)
    return key


SECRET_KEY = _secret_key()

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_q",
    "models_registry",
    "inference",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Every response's Content-Security-Policy, and the nonce a template's inline script needs (depthsite.csp).
    "depthsite.csp.ContentSecurityPolicyMiddleware",
    # Cache-Control: private, no-store on whatever names no caching itself (depthsite.cache_headers).
    "depthsite.cache_headers.PrivateByDefaultMiddleware",
    # Before anything reads a body (the CSRF check reads a form's): a body over its address's limit is refused
    # unread. After the security middleware, so its redirects and headers still apply.
    "depthsite.middleware_limits.RequestBodyLimitMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

# Counts a failed CSRF check at an upload form against the upload rate (its body was read to find the token).
CSRF_FAILURE_VIEW = "inference.views.csrf_failure"

ROOT_URLCONF = "depthsite.urls"
WSGI_APPLICATION = "depthsite.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = env.VAR_DIR / "static"
STATICFILES_DIRS = [BASE_DIR / "static"]
MEDIA_URL = "media/"
MEDIA_ROOT = env.MEDIA_ROOT


def media_storage(kind: str) -> dict:
    """STORAGES["default"] for DEPTHSITE_MEDIA_STORAGE: the local folder, or an S3-compatible bucket."""
    if kind in ("", "local"):
        return {"BACKEND": "django.core.files.storage.FileSystemStorage"}
    if kind != "s3":
        raise ImproperlyConfigured(f"DEPTHSITE_MEDIA_STORAGE={kind!r}: use local or s3")
    if not env.MEDIA_S3_BUCKET:
        raise ImproperlyConfigured("DEPTHSITE_MEDIA_STORAGE=s3 needs DEPTHSITE_MEDIA_S3_BUCKET")
    return {"BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": {
        "bucket_name": env.MEDIA_S3_BUCKET,
        "endpoint_url": env.MEDIA_S3_ENDPOINT or None,
        "region_name": env.MEDIA_S3_REGION or None,
        "access_key": env.MEDIA_S3_ACCESS_KEY or None,
        "secret_key": env.MEDIA_S3_SECRET_KEY or None,
        "location": env.MEDIA_S3_PREFIX.strip("/"),
        # Job code picks unique names and replaces a re-run's results in place: never a renamed copy.
        "file_overwrite": True,
        # Private objects: every download goes through the site's owner check (see inference.media).
        "default_acl": None,
        "querystring_auth": True,
    }}


STORAGES = {
    "default": media_storage(env.MEDIA_STORAGE),
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Caches that live inside one process: what one gunicorn worker counts there, the others never see.
PER_PROCESS_CACHES = ("django.core.cache.backends.locmem.LocMemCache", "django.core.cache.backends.dummy.DummyCache")


def cache_settings(*, redis_url: str, var_dir: Path, key_prefix: str) -> dict:
    """CACHES: one cache that every process of the site shares, because the upload and write rates are counted
    there. Django's default keeps a cache per process: with gunicorn's workers (each restarted every couple of
    thousand requests) every worker counted "30/hour" on its own.

    Redis when REDIS_URL is set, so every machine of the site counts together; the keys carry the queue's name,
    as deployments sharing one Redis keep their counts apart. Its `clear()` empties the whole Redis database,
    django-q2's queue included: nothing in the site calls it. Otherwise a folder under the var/ folder, which
    every process of one machine shares and which `make run` creates on first use."""
    if redis_url:
        # Bounded waits: a stuck Redis answers a request with an error, not a worker held until gunicorn's timeout.
        return {"default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": redis_url,
                            "KEY_PREFIX": key_prefix,
                            "OPTIONS": {"socket_connect_timeout": 5, "socket_timeout": 5}}}
    # One file per client and rate: room for many more clients than Django's default of 300 entries, past which
    # it deletes a third of them (their counts with them).
    return {"default": {"BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
                        "LOCATION": str(var_dir / "django-cache"), "KEY_PREFIX": key_prefix,
                        "OPTIONS": {"MAX_ENTRIES": 10_000}}}


def shared_caches(caches: dict) -> dict:
    """`caches`, unless one of them lives inside each process (ImproperlyConfigured, naming it)."""
    for alias, config in caches.items():
        if config.get("BACKEND") in PER_PROCESS_CACHES:
            raise ImproperlyConfigured(
                f"CACHES[{alias!r}] is {config['BACKEND']}, a cache each process keeps for itself: the upload "
                "rates counted in it would be counted per gunicorn worker. Use the shared cache the settings "
                "choose (Redis with REDIS_URL, else a folder under DEPTHSITE_VAR_DIR)")
    return caches


CACHES = cache_settings(redis_url=env.REDIS_URL, var_dir=env.VAR_DIR, key_prefix=env.QUEUE_NAME)
