"""Test settings: tasks run inline, fast hashing, and nothing touches the user's real cache or media."""
import os
import tempfile
from pathlib import Path

from depthsite.settings import *  # noqa: F401,F403
from depthsite.settings import DATABASES, Q_CLUSTER

_scratch = Path(tempfile.gettempdir()) / "depthsite-tests"
# Per-test folders are set by an autouse fixture; these defaults only guard imports and stray code.
DEPTHSITE_CACHE_DIR = _scratch / "cache"
MEDIA_ROOT = _scratch / "media"
DEPTHSITE_NODE = "test-node"
DEPTHSITE_MODEL_MIRROR = ""
DEPTHSITE_OFFLINE = False
DEPTHSITE_PUBLIC_UPLOADS = False
DEPTHSITE_PUBLIC_STATUS = False
DEPTHSITE_CACHE_MAX_BYTES = None
DEPTHSITE_CACHE_FORMAT = ""
# Exporting an ONNX artifact costs seconds per model: the runtime tests ask for it, the others run eager.
DEPTHSITE_RUNTIME = "eager"
# A child process would open the database the settings name, not the test database this process made.
DEPTHSITE_RUNTIME_BUILD = "inline"

Q_CLUSTER = {**Q_CLUSTER, "sync": True}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # A file, not Django's shared-cache in-memory database: threads (live server, the estimator pool's
    # concurrency test) then get SQLite's real locking with WAL and the busy timeout, as in production.
    _scratch.mkdir(parents=True, exist_ok=True)
    DATABASES["default"]["TEST"] = {"NAME": str(_scratch / f"test-db-{os.getpid()}.sqlite3")}
# A fixed key for tests only: DEBUG is off (as Django's test runner wants) and no key file is generated.
SECRET_KEY = SECRET_KEY or "depthsite-tests-only-not-a-secret"  # noqa: F405
# pytest-xdist's workers run side by side and each clears the cache between tests: each keeps its own (and none
# writes into the var/ folder of the checkout).
CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
