"""Fixtures of the API and dashboard tests: users of each kind with their token clients, and a weight mirror."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
from django.contrib.auth import get_user_model
from django.core.cache import cache
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from depthsite.testing.weightserver import WeightServer
from tests.support.operators import grant_operator_permissions

MIRROR_FILE = "midas_v21_small_256.pt"


@pytest.fixture(autouse=True)
def _fresh_throttles():
    """Throttle counters live in the default cache, which outlives a test: every test starts with none."""
    cache.clear()
    yield
    cache.clear()


def _token_client(user) -> APIClient:
    client = APIClient()
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


@pytest.fixture
def reader(db):
    return get_user_model().objects.create_user("reader", "reader@example.com", "pw-reader-123")


@pytest.fixture
def operator(db):
    """A staff user holding the registry's operator permissions (is_staff alone may change nothing)."""
    user = get_user_model().objects.create_user("operator", "operator@example.com", "pw-operator-123", is_staff=True)
    return grant_operator_permissions(user)


@pytest.fixture
def anon_client(db) -> APIClient:
    return APIClient()


@pytest.fixture
def user_client(reader) -> APIClient:
    """A signed-in user who is not staff, authenticated by token."""
    return _token_client(reader)


@pytest.fixture
def staff_client(operator) -> APIClient:
    """A staff operator (with the registry's permissions), authenticated by token (as a script would be)."""
    return _token_client(operator)


@pytest.fixture
def clients(anon_client, user_client, staff_client) -> dict[str, APIClient]:
    return {"anonymous": anon_client, "user": user_client, "staff": staff_client}


@pytest.fixture(scope="session")
def mirror_folder(tmp_path_factory, small_arrays) -> dict:
    """A folder holding the MiDaS_small release file under its released name, as a mirror serves it."""
    from models_registry.formats import content_digest, write_weights

    root = tmp_path_factory.mktemp("mirror")
    path = root / MIRROR_FILE
    write_weights(small_arrays, path, "pt", {})
    return {"root": root, "path": path, "size": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "digest": content_digest(small_arrays)}


@pytest.fixture
def cached_record(small_model, mirror_folder):
    """The release file copied into the cache and recorded as healthy, without loading it: for the tests that
    only read or delete records (an import, as `cached_small` does, costs seconds of torch)."""
    from models_registry import cachefs
    from models_registry.models import WeightFile
    from models_registry.services.records import cache_file_path

    dest = cache_file_path(model=small_model, fmt="pt")
    shutil.copyfile(mirror_folder["path"], dest)
    return WeightFile.objects.create(model=small_model, format="pt", path=cachefs.relative(dest),
                                     size=mirror_folder["size"], sha256=mirror_folder["sha256"],
                                     content_digest=mirror_folder["digest"], dtype="float32", health="ok",
                                     node="test-node")


@pytest.fixture
def mirror(settings, mirror_folder):
    """DEPTHSITE_MODEL_MIRROR pointed at a loopback HTTP server of `mirror_folder`."""
    with WeightServer(mirror_folder["root"]) as server:
        settings.DEPTHSITE_MODEL_MIRROR = server.url
        yield server


def cache_leftovers(root: Path) -> list[str]:
    """Files under the cache other than lock files: uploads and exports must not leave any behind."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.is_file() and not str(p.relative_to(root)).startswith(".locks"))
