"""One cache for every process of a site: the upload rates are counted there, and gunicorn runs several workers
(each restarted every few thousand requests), so a per-process cache multiplies every rate by their number."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from depthsite.settings.base import cache_settings, shared_caches
from tests.conftest import require_service

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = "redis://127.0.0.1:6379/0"
# One anonymous upload from 127.0.0.1 through the throttle the API and the web form share; prints whether it passed.
COUNT_ONE_UPLOAD = (
    "from django.contrib.auth.models import AnonymousUser; from django.test import RequestFactory; "
    "from inference.api.permissions import UploadThrottle; "
    "request = RequestFactory().post('/'); request.user = AnonymousUser(); "
    "print('ALLOWED', UploadThrottle().allow_request(request, None))"
)
SHOW_CACHE = ("from django.conf import settings; d = settings.CACHES['default']; "
              "print('BACKEND', d['BACKEND']); print('LOCATION', d['LOCATION'])")


def _shell(tmp_path: Path, probe: str, *, settings_module: str = "depthsite.settings", **env_values: str) -> list[str]:
    """The lines a fresh `manage.py shell -c probe` printed: a separate process, as each gunicorn worker is."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("DEPTHSITE_", "DJANGO_")) and key != "REDIS_URL"}
    env.update({"DJANGO_SETTINGS_MODULE": settings_module, "DJANGO_SECRET_KEY": "k",
                "DEPTHSITE_VAR_DIR": str(tmp_path / "var"), "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
                **env_values})
    result = subprocess.run([sys.executable, str(PROJECT_ROOT / "manage.py"), "shell", "-c", probe], cwd=PROJECT_ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_without_redis_every_process_of_the_host_shares_a_file_cache_under_var(tmp_path):
    lines = _shell(tmp_path, SHOW_CACHE)
    assert "BACKEND django.core.cache.backends.filebased.FileBasedCache" in lines
    assert f"LOCATION {tmp_path / 'var' / 'django-cache'}" in lines


def test_with_redis_url_the_cache_is_redis(tmp_path):
    lines = _shell(tmp_path, SHOW_CACHE, REDIS_URL=REDIS_URL)
    assert lines[-2:] == ["BACKEND django.core.cache.backends.redis.RedisCache", f"LOCATION {REDIS_URL}"]


def test_production_gets_the_shared_cache_too(tmp_path):
    lines = _shell(tmp_path, SHOW_CACHE, settings_module="depthsite.settings.production", DJANGO_DEBUG="0")
    assert "BACKEND django.core.cache.backends.filebased.FileBasedCache" in lines


def test_two_processes_count_uploads_against_one_rate(tmp_path):
    rate = {"DEPTHSITE_UPLOAD_RATE": "1/hour"}
    assert _shell(tmp_path, COUNT_ONE_UPLOAD, **rate)[-1] == "ALLOWED True"
    # Another worker of the same site: the upload the first one counted is already there.
    assert _shell(tmp_path, COUNT_ONE_UPLOAD, **rate)[-1] == "ALLOWED False"


@pytest.mark.services
def test_two_processes_count_uploads_against_one_rate_in_redis(tmp_path):
    require_service("Redis", "127.0.0.1", 6379)
    import redis

    # A key prefix of this test's own (the queue name prefixes the cache's keys): no other run shares the count.
    prefix = f"test-cache-{uuid.uuid4().hex[:12]}"
    rate = {"DEPTHSITE_UPLOAD_RATE": "1/hour", "REDIS_URL": REDIS_URL, "DEPTHSITE_QUEUE_NAME": prefix}
    client = redis.Redis.from_url(REDIS_URL)
    try:
        assert _shell(tmp_path / "a", COUNT_ONE_UPLOAD, **rate)[-1] == "ALLOWED True"
        # Another machine of the site (no var/ folder in common): Redis holds the count.
        assert _shell(tmp_path / "b", COUNT_ONE_UPLOAD, **rate)[-1] == "ALLOWED False"
    finally:
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)


def test_the_cache_settings_pick_redis_when_there_is_one(tmp_path):
    assert cache_settings(redis_url=REDIS_URL, var_dir=tmp_path, key_prefix="site")["default"] == {
        "BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL, "KEY_PREFIX": "site",
        "OPTIONS": {"socket_connect_timeout": 5, "socket_timeout": 5}}
    files = cache_settings(redis_url="", var_dir=tmp_path, key_prefix="site")["default"]
    assert files["BACKEND"] == "django.core.cache.backends.filebased.FileBasedCache"
    assert files["LOCATION"] == str(tmp_path / "django-cache")


@pytest.mark.parametrize("backend", ["django.core.cache.backends.locmem.LocMemCache",
                                     "django.core.cache.backends.dummy.DummyCache"])
def test_a_per_process_cache_is_refused(backend, tmp_path):
    caches = {**cache_settings(redis_url="", var_dir=tmp_path, key_prefix="site"), "other": {"BACKEND": backend}}
    with pytest.raises(ImproperlyConfigured, match=r"CACHES\['other'\].*each process"):
        shared_caches(caches)
    for shared in (cache_settings(redis_url="", var_dir=tmp_path, key_prefix="site"),
                   cache_settings(redis_url=REDIS_URL, var_dir=tmp_path, key_prefix="site")):
        assert shared_caches(shared) == shared


def test_production_refuses_to_start_with_a_per_process_cache(tmp_path):
    # The base settings as a site's own settings module might leave them, with a per-process cache; then the
    # production settings are imported on top, as DJANGO_SETTINGS_MODULE would.
    probe = ("import depthsite.settings as base; "
             "base.CACHES = {'default': {'BACKEND': 'django.core.cache.backends.locmem.LocMemCache'}}; "
             "import depthsite.settings.production")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("DEPTHSITE_", "DJANGO_"))}
    env.update({"DJANGO_SETTINGS_MODULE": "depthsite.settings.production", "DJANGO_SECRET_KEY": "k",
                "DEPTHSITE_VAR_DIR": str(tmp_path / "var")})
    result = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr and "CACHES['default']" in result.stderr


def test_a_file_cache_folder_that_cannot_be_written_fails_the_system_check(settings, tmp_path):
    # Refused at `manage.py check` / `migrate` / `runserver`, not as a 500 on the first throttled upload.
    from inference.checks import FILE_CACHE, shared_cache_writable

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    settings.CACHES = {"default": {"BACKEND": FILE_CACHE, "LOCATION": str(blocker / "django-cache")}}
    errors = shared_cache_writable()
    assert [error.id for error in errors] == ["depthsite.E010"] and "cannot be written" in errors[0].msg
    settings.CACHES = {"default": {"BACKEND": FILE_CACHE, "LOCATION": str(tmp_path / "var" / "django-cache")}}
    assert shared_cache_writable() == [] and (tmp_path / "var" / "django-cache").is_dir()


@pytest.mark.django_db
def test_the_hourly_sweep_deletes_the_folder_caches_expired_entries_and_keeps_live_ones(settings, tmp_path):
    # Django deletes an expired file only when its key is read again; windowed counters are never read again, and
    # culling at MAX_ENTRIES would then delete live counts at random.
    import time

    from django.core.cache import caches

    from depthsite.cache_sweep import cache_sweep_expired
    from inference.tasks import depth_jobs_expire_task

    settings.CACHES = {**settings.CACHES, "default": {
        "BACKEND": "django.core.cache.backends.filebased.FileBasedCache", "LOCATION": str(tmp_path / "cache")}}
    cache = caches["default"]
    cache.set("live", 1, 3600)
    cache.set("forever", 1, None)
    for n in range(5):
        cache.set(f"old-window-{n}", n, 1)
    assert len(cache._list_cache_files()) == 7
    time.sleep(1.1)
    assert cache_sweep_expired() == 5
    assert len(cache._list_cache_files()) == 2 and cache.get("live") == 1 and cache.get("forever") == 1
    cache.set("another-old-window", 1, 1)
    time.sleep(1.1)
    assert depth_jobs_expire_task().endswith("; swept 1 expired cache entries")
    assert cache_sweep_expired() == 0
