"""System checks (`manage.py check`, and before `migrate` and `runserver`): what would otherwise fail only at the
first request that needs it."""
from __future__ import annotations

import tempfile
from pathlib import Path

from django.conf import settings
from django.core.checks import Error, Tags, register

FILE_CACHE = "django.core.cache.backends.filebased.FileBasedCache"


@register(Tags.caches)
def shared_cache_writable(app_configs=None, **kwargs) -> list[Error]:
    """A file cache's folder exists (made if missing) and takes a file: the upload rates are counted there, and a
    folder it cannot write made every throttled request a 500 instead of a refusal at start."""
    errors = []
    for alias, config in settings.CACHES.items():
        if config.get("BACKEND") != FILE_CACHE:
            continue
        folder = Path(config["LOCATION"])
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".check-"):
                pass
        except OSError as exc:
            errors.append(Error(
                f"CACHES[{alias!r}] keeps its entries in {folder}, which cannot be written ({exc.strerror or exc})",
                hint="make the folder writable by the site's processes, set DEPTHSITE_VAR_DIR to one that is, or "
                     "set REDIS_URL to count in Redis", obj=f"CACHES[{alias!r}]", id="depthsite.E010"))
    return errors
