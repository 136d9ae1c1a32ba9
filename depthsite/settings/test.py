"""Test settings: tasks run inline, fast hashing, and nothing touches the user's real cache or media."""
import tempfile
from pathlib import Path

from depthsite.settings import *  # noqa: F401,F403
from depthsite.settings import Q_CLUSTER

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

Q_CLUSTER = {**Q_CLUSTER, "sync": True}
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
