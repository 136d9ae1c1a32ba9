"""The only reader of environment variables: typed values with safe local defaults for the settings."""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

from depthsite.rates import parse_rate
from depthsite.units import parse_size

BASE_DIR = Path(__file__).resolve().parent.parent

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class EnvError(ValueError):
    """An environment variable holds a value that cannot be used."""


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value is None else value.strip()


def get_str(name: str, default: str = "") -> str:
    value = _raw(name)
    return default if value is None or value == "" else value


def get_bool(name: str, default: bool = False) -> bool:
    value = _raw(name)
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise EnvError(f"{name}={value!r} is not a boolean (use 1/0, true/false, yes/no)")


def get_int(name: str, default: int) -> int:
    value = _raw(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise EnvError(f"{name}={value!r} is not an integer") from None


def get_size(name: str, default: int | None) -> int | None:
    value = _raw(name)
    if value is None or value == "":
        return default
    try:
        return parse_size(value)
    except ValueError as exc:
        raise EnvError(f"{name}: {exc}") from None


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def get_duration(name: str, default: int) -> int:
    """Seconds from '3600', '90m', '12h' or '7d'."""
    value = _raw(name)
    if value is None or value == "":
        return default
    text = value.lower()
    unit = text[-1] if text[-1:] in _DURATION_UNITS else ""
    number = text[: len(text) - len(unit)].strip()
    if not number.isdigit():
        raise EnvError(f"{name}={value!r} is not a duration (examples: 3600, 90m, 12h, 7d)")
    return int(number) * _DURATION_UNITS[unit]


def get_list(name: str, default: list[str]) -> list[str]:
    value = _raw(name)
    if value is None or value == "":
        return list(default)
    return [item.strip() for item in value.split(",") if item.strip()]


def get_rate(name: str, default: str) -> str | None:
    """An attempt rate ('10/15m', '30/hour'; depthsite.rates); None for 'off'."""
    value = get_str(name, default)
    try:
        return None if parse_rate(value) is None else value
    except ValueError as exc:
        raise EnvError(f"{name}: {exc}") from None


# --- Django core -------------------------------------------------------------------------------
SECRET_KEY = get_str("DJANGO_SECRET_KEY", "")
# Off unless asked for: debug pages show settings and tracebacks to anyone. `make run` turns it on locally.
DEBUG = get_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = get_list("DJANGO_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = get_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])
LOG_LEVEL = get_str("DEPTHSITE_LOG_LEVEL", "WARNING").upper()
# Only to recognise the test settings, which bring their own secret key (see settings/base.py).
SETTINGS_MODULE = get_str("DJANGO_SETTINGS_MODULE", "")

# --- storage and services ----------------------------------------------------------------------
VAR_DIR = Path(get_str("DEPTHSITE_VAR_DIR", str(BASE_DIR / "var")))
DATABASE_URL = get_str("DATABASE_URL", f"sqlite:///{VAR_DIR / 'depthsite.sqlite3'}")
# How long a process keeps its database connection (seconds; 0 closes it after every request and task).
# Kept, a worker does not reconnect for each job, nor the web server for each request (Django checks a kept
# connection before reusing it).
DATABASE_CONN_MAX_AGE = get_duration("DATABASE_CONN_MAX_AGE", 60)
REDIS_URL = get_str("REDIS_URL", "")
MEDIA_ROOT = Path(get_str("DEPTHSITE_MEDIA_ROOT", str(VAR_DIR / "media")))
# Where uploads and results live: "local" (MEDIA_ROOT, or a shared file system mounted there) or "s3"
# (an S3-compatible object store through django-storages, with the DEPTHSITE_MEDIA_S3_* values below).
MEDIA_STORAGE = get_str("DEPTHSITE_MEDIA_STORAGE", "local").lower()
MEDIA_S3_BUCKET = get_str("DEPTHSITE_MEDIA_S3_BUCKET", "")
MEDIA_S3_ENDPOINT = get_str("DEPTHSITE_MEDIA_S3_ENDPOINT", "")  # empty: AWS itself
MEDIA_S3_REGION = get_str("DEPTHSITE_MEDIA_S3_REGION", "")
# Empty keys: boto3's own chain (AWS_* variables, an instance or pod role).
MEDIA_S3_ACCESS_KEY = get_str("DEPTHSITE_MEDIA_S3_ACCESS_KEY", "")
MEDIA_S3_SECRET_KEY = get_str("DEPTHSITE_MEDIA_S3_SECRET_KEY", "")
MEDIA_S3_PREFIX = get_str("DEPTHSITE_MEDIA_S3_PREFIX", "")  # a folder inside the bucket
# A worker writes results here before putting them into an object store (a local storage stages in its own folder).
MEDIA_STAGING = Path(get_str("DEPTHSITE_MEDIA_STAGING", str(Path(tempfile.gettempdir()) / "depthsite-media-staging")))

# --- the weight cache --------------------------------------------------------------------------
_XDG_CACHE = Path(get_str("XDG_CACHE_HOME", str(Path.home() / ".cache")))
CACHE_DIR = Path(get_str("DEPTHSITE_CACHE_DIR", str(_XDG_CACHE / "depthsite" / "models"))).expanduser()
CACHE_MAX_BYTES = get_size("DEPTHSITE_CACHE_MAX_BYTES", None)
CACHE_FORMAT = get_str("DEPTHSITE_CACHE_FORMAT", "").lower()
NODE = get_str("DEPTHSITE_NODE", socket.gethostname())
MODEL_MIRROR = get_str("DEPTHSITE_MODEL_MIRROR", "")
OFFLINE = get_bool("DEPTHSITE_OFFLINE", False)
# Licences of weights this deployment uses (comma-separated SPDX ids, e.g. "MIT,Apache-2.0"); empty or "*": all.
ACCEPTED_LICENSES = get_list("DEPTHSITE_ACCEPTED_LICENSES", [])

# --- inference ---------------------------------------------------------------------------------
DEVICE = get_str("DEPTHSITE_DEVICE", "")
COMPILE = get_bool("DEPTHSITE_COMPILE", False)
FP16 = get_bool("DEPTHSITE_FP16", False)
# auto: a verified ONNX Runtime artifact on CPU when onnxruntime is installed, eager PyTorch on CUDA.
RUNTIME = get_str("DEPTHSITE_RUNTIME", "auto").lower()
if RUNTIME not in ("auto", "onnx", "eager"):
    raise EnvError(f"DEPTHSITE_RUNTIME={RUNTIME!r} is not one of auto, onnx, eager")
# Where an artifact is exported on first use: "process" (a child process, so a worker keeps neither torch nor
# the export's peak memory, 4.35x DPT_Large's weights when built inside it) or "inline" (this process).
RUNTIME_BUILD = get_str("DEPTHSITE_RUNTIME_BUILD", "process").lower()
if RUNTIME_BUILD not in ("process", "inline"):
    raise EnvError(f"DEPTHSITE_RUNTIME_BUILD={RUNTIME_BUILD!r} is not one of process, inline")
WARM_MODELS = get_int("DEPTHSITE_WARM_MODELS", 2)
WARM_BYTES = get_size("DEPTHSITE_WARM_BYTES", None)  # tensor bytes kept loaded per worker; unset: no limit
PRELOAD = get_list("DEPTHSITE_PRELOAD", [])  # models a worker warms before taking its first job
TORCH_THREADS = get_int("DEPTHSITE_TORCH_THREADS", 0)
MAX_IMAGE_PIXELS = get_int("DEPTHSITE_MAX_IMAGE_PIXELS", 50_000_000)

# --- jobs, web and API -------------------------------------------------------------------------
QUEUE_NAME = get_str("DEPTHSITE_QUEUE_NAME", "depthsite")
WORKERS = get_int("DEPTHSITE_WORKERS", 1)
JOB_TIMEOUT = get_int("DEPTHSITE_JOB_TIMEOUT", 600)
# A download task's own limit: the largest file (1.4 GB) on a slow link (~1 Mbit/s) fits in 3 hours.
DOWNLOAD_TIMEOUT = get_int("DEPTHSITE_DOWNLOAD_TIMEOUT", 3 * 3600)
JOB_MAX_ATTEMPTS = get_int("DEPTHSITE_JOB_MAX_ATTEMPTS", 3)
# Seconds a running job's lease lasts; its worker renews it every third of that, and a job whose lease
# ran out has no live worker (recovery queues it again).
JOB_LEASE = get_int("DEPTHSITE_JOB_LEASE", 30)
WORKER_MAX_RSS_KB = get_int("DEPTHSITE_WORKER_MAX_RSS_KB", 8 * 1024 * 1024)
REUSE_RESULTS = get_bool("DEPTHSITE_REUSE_RESULTS", True)
# bench/scale.py: a folder where each process keeps the count of SQL statements it sent (unset: not counted).
COUNT_QUERIES_DIR = get_str("DEPTHSITE_COUNT_QUERIES_DIR", "")
MAX_UPLOAD_BYTES = get_size("DEPTHSITE_MAX_UPLOAD_BYTES", 25 * 1000**2)
# A batch (several photos or a zip): at most this many photos, and this many bytes in all (body and unpacked).
BATCH_MAX_FILES = get_int("DEPTHSITE_BATCH_MAX_FILES", 50)
BATCH_MAX_BYTES = get_size("DEPTHSITE_BATCH_MAX_BYTES", 200 * 1000**2)
MAX_IMPORT_BYTES = get_size("DEPTHSITE_MAX_IMPORT_BYTES", 4 * 1000**3)
PUBLIC_UPLOADS = get_bool("DEPTHSITE_PUBLIC_UPLOADS", False)
PUBLIC_STATUS = get_bool("DEPTHSITE_PUBLIC_STATUS", False)
UPLOAD_RATE = get_str("DEPTHSITE_UPLOAD_RATE", "30/hour")
WRITE_RATE = get_str("DEPTHSITE_WRITE_RATE", "120/hour")
# Proxies in front of the site that append to X-Forwarded-For; 0 trusts no header and uses the peer address.
TRUSTED_PROXIES = get_int("DEPTHSITE_TRUSTED_PROXIES", 0)
ANON_MAX_JOBS = get_int("DEPTHSITE_ANON_MAX_JOBS", 50)
ANON_MAX_BYTES = get_size("DEPTHSITE_ANON_MAX_BYTES", 500 * 1000**2)
ANON_RETENTION = get_duration("DEPTHSITE_ANON_RETENTION", 7 * 86400)
# Sign-in limits (depthsite.auth_limits): failed logins per (user name, address), per address and per user name
# from every address; reset requests per e-mail and per address.
LOGIN_RATE = get_rate("DEPTHSITE_LOGIN_RATE", "10/15m")
LOGIN_ADDRESS_RATE = get_rate("DEPTHSITE_LOGIN_ADDRESS_RATE", "30/15m")
LOGIN_USER_RATE = get_rate("DEPTHSITE_LOGIN_USER_RATE", "100/15m")
PASSWORD_RESET_RATE = get_rate("DEPTHSITE_PASSWORD_RESET_RATE", "5/hour")
PASSWORD_RESET_ADDRESS_RATE = get_rate("DEPTHSITE_PASSWORD_RESET_ADDRESS_RATE", "5/hour")

# --- production web server (used by depthsite.settings.production only; secure unless told otherwise) --
SECURE_SSL_REDIRECT = get_bool("DJANGO_SECURE_SSL_REDIRECT", True)
SECURE_COOKIES = get_bool("DJANGO_SECURE_COOKIES", True)
SECURE_HSTS_SECONDS = get_int("DJANGO_SECURE_HSTS_SECONDS", 365 * 24 * 3600)
SECURE_HSTS_INCLUDE_SUBDOMAINS = get_bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
SECURE_HSTS_PRELOAD = get_bool("DJANGO_SECURE_HSTS_PRELOAD", True)
# The header a trusted reverse proxy sets to "https" (e.g. X-Forwarded-Proto); unset = no proxy is trusted.
SECURE_PROXY_SSL_HEADER = get_str("DJANGO_SECURE_PROXY_SSL_HEADER", "")
