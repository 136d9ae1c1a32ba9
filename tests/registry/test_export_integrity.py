"""No export sends bytes under a sha256 it has not checked: the plain-file export (API, admin, service) hashes the
cached file it streams, refuses a changed one with a 409 and marks it corrupt, as the bundle export does."""
from __future__ import annotations

import base64
import hashlib
import json
import os
from datetime import timedelta

import pytest
from django.contrib.auth import get_user_model
from django.core.cache import cache
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from depthsite.exceptions import DigestMismatchError
from models_registry import cachefs
from models_registry.choices import Health
from models_registry.models import WeightFile
from models_registry.services.export import weight_export_artifact
from tests.support.operators import grant_operator_permissions

pytestmark = pytest.mark.django_db

EXPORT_URL = "/api/models/MiDaS_small/export?format=pt"


@pytest.fixture
def api():
    cache.clear()  # throttle counters outlive a test
    user = get_user_model().objects.create_user("op", "op@example.com", "pw-operator-123", is_staff=True)
    client = APIClient()
    client.force_authenticate(grant_operator_permissions(user))
    yield client
    cache.clear()


@pytest.fixture
def admin_client(client):
    client.force_login(get_user_model().objects.create_superuser("admin", "admin@example.com", "pw-admin-123"))
    return client


def flip_one_byte(weight_file: WeightFile, *, keep_mtime: bool = False) -> bytes:
    """Change one byte in the middle of the cached file, keeping its size (and, if asked, its mtime); the write
    sets its ctime to now, as any real write does. The bytes now on disk."""
    path = cachefs.absolute(weight_file.path)
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert after.st_size == weight_file.size
    assert weight_file.verified_at is None or after.st_ctime >= weight_file.verified_at.timestamp() - 1
    return bytes(data)


def assert_marked_corrupt(weight_file: WeightFile) -> None:
    weight_file.refresh_from_db()
    assert weight_file.health == Health.CORRUPT
    assert "sha256 changed" in weight_file.health_reason


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- a changed file is refused and marked corrupt ------------------------------------------------------------


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["written", "mtime-kept"])
def test_service_refuses_a_file_changed_on_disk_and_marks_it_corrupt(cached_small, keep_mtime):
    flip_one_byte(cached_small, keep_mtime=keep_mtime)
    with pytest.raises(DigestMismatchError) as caught:
        weight_export_artifact(model=cached_small.model, fmt="pt")
    assert "changed on disk" in caught.value.message
    assert caught.value.extra == {"kind": "changed_on_disk", "model": "MiDaS_small", "format": "pt"}
    assert_marked_corrupt(cached_small)


def test_service_refuses_bit_rot_that_left_the_inode_times_alone(cached_small):
    """Bytes that rot on the medium change no ctime: a record hashed "after" the last inode change still may not
    vouch for them, so the export hashes every time."""
    flip_one_byte(cached_small)
    later = timezone.now() + timedelta(hours=1)
    WeightFile.objects.filter(pk=cached_small.pk).update(verified_at=later)
    cached_small.refresh_from_db()
    with pytest.raises(DigestMismatchError):
        weight_export_artifact(model=cached_small.model, fmt="pt")
    assert_marked_corrupt(cached_small)


@pytest.mark.parametrize("accept", ["application/json", "application/octet-stream"])
def test_api_refuses_a_file_changed_on_disk_with_409_and_marks_it_corrupt(api, cached_small, accept):
    flip_one_byte(cached_small)
    response = api.get(EXPORT_URL, HTTP_ACCEPT=accept)
    assert response.status_code == 409, response.status_code
    body = json.loads(response.content)  # the error, as JSON text whatever was accepted
    assert "changed on disk" in body["message"] and body["extra"]["kind"] == "changed_on_disk"
    assert "ETag" not in response and "Digest" not in response and "Repr-Digest" not in response
    assert_marked_corrupt(cached_small)
    # The corrupt copy is never offered again: with no other copy, there is nothing to export.
    assert api.get(EXPORT_URL).status_code == 404


def test_admin_export_of_a_changed_file_is_refused_and_marks_it_corrupt(admin_client, cached_small):
    flip_one_byte(cached_small)
    url = reverse("admin:models_registry_weightfile_changelist")
    response = admin_client.post(url, {"action": "export_file", "_selected_action": [str(cached_small.pk)]})
    assert response.status_code == 302  # back to the list with the error, no file
    assert "Content-Disposition" not in response
    assert_marked_corrupt(cached_small)
    page = admin_client.get(response["Location"])
    assert b"changed on disk" in page.content


# --- an unchanged file exports as before -----------------------------------------------------------------------


def test_service_exports_an_unchanged_file_and_its_bytes_hash_to_the_record(cached_small):
    result = weight_export_artifact(model=cached_small.model, fmt="pt")
    assert not result.temporary and result.path == cachefs.absolute(cached_small.path)
    assert (result.sha256, result.size) == (cached_small.sha256, cached_small.size)
    with result.open() as handle:
        body = handle.read()
    assert sha256_of(body) == cached_small.sha256 and len(body) == cached_small.size
    cached_small.refresh_from_db()
    assert cached_small.health == Health.OK


def test_the_checked_bytes_are_the_ones_served_even_if_the_file_is_replaced_meanwhile(cached_small, tmp_path):
    result = weight_export_artifact(model=cached_small.model, fmt="pt")
    path = cachefs.absolute(cached_small.path)
    other = tmp_path / "other.pt"
    other.write_bytes(b"\0" * cached_small.size)
    os.replace(other, path)  # as an atomic cache write would, between the check and the stream
    with result.open() as handle:
        assert sha256_of(handle.read()) == result.sha256 == cached_small.sha256


def test_api_streams_an_unchanged_file_under_its_etag_and_digests(api, cached_small):
    response = api.get(EXPORT_URL, HTTP_ACCEPT="application/octet-stream")
    assert response.status_code == 200
    body = b"".join(response.streaming_content)
    digest = hashlib.sha256(body).digest()
    assert digest.hex() == cached_small.sha256
    assert response["ETag"] == f'"{cached_small.sha256}"'
    assert response["Digest"] == f"sha-256={base64.b64encode(digest).decode()}"
    assert response["Repr-Digest"] == f"sha-256=:{base64.b64encode(digest).decode()}:"
    assert response["Content-Length"] == str(len(body)) == str(cached_small.size)
    # A second download of the same file carries the same validator.
    again = api.get(EXPORT_URL, HTTP_ACCEPT="application/octet-stream")
    assert again["ETag"] == response["ETag"] and b"".join(again.streaming_content) == body
