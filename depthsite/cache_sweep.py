"""Deleting the expired entries of the folder cache (Django's FileBasedCache), which Django itself never does.

Django removes an expired file only when something reads its key again, and culls a random third of all the files
once the folder holds MAX_ENTRIES. Rate and sign-in counts live in this cache on a site without Redis, and the
sign-in limits write a new key per window: the files of windows that have passed are never read again, so they
would pile up until culling, which then deletes live counts at random (an attacker's own, or an account's total)
along with them. The hourly housekeeping schedule (inference.tasks.depth_jobs_expire_task) runs this, so the
folder holds about what the last hour counted.
"""
from __future__ import annotations

import logging

from django.core.cache import caches
from django.core.cache.backends.filebased import FileBasedCache

logger = logging.getLogger(__name__)


def cache_sweep_expired() -> int:
    """Delete every expired entry of each folder cache; how many went. Other backends expire their own keys."""
    removed = 0
    for alias in caches:
        cache = caches[alias]
        if not isinstance(cache, FileBasedCache):
            continue
        for path in cache._list_cache_files():
            try:
                with open(path, "rb") as handle:
                    # Reads the expiry that heads the file and deletes the file when it has passed, as a read of
                    # that key would: the same private method Django's own has_key uses.
                    removed += bool(cache._is_expired(handle))
            except (FileNotFoundError, EOFError):
                continue  # deleted meanwhile by a reader, a cull or another sweep
            except Exception as exc:  # a damaged file is Django's to handle when its key is read; keep sweeping
                logger.warning("cache sweep: cannot read %s: %s", path, exc)
    return removed
