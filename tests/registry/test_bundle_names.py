"""A bundle member's name is untrusted: it is looked up in the archive and quoted (shortened) in messages, never
made part of a path. A name of any length imports or is refused with a 4xx, never an OSError (an HTTP 500)."""
from __future__ import annotations

import builtins
import errno
import io
import json
import tarfile

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from depthsite.exceptions import ApplicationError, WeightFileError
from models_registry import cachefs
from models_registry.models import WeightFile
from models_registry.services import imports
from models_registry.services.imports import weight_import
from tests.api.conftest import cache_leftovers

pytestmark = [pytest.mark.django_db]

LONG = "w" * 296 + ".pt"  # 299 characters: legal in a PAX tar, longer than any file name may be (NAME_MAX 255)
NOT_WEIGHTS = b"not weights at all"  # refused by content, naming the file it read


def bundle(path, member: str, payload: bytes | None = None, source=None):
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        manifest = json.dumps({"bundle_version": 1, "model": "MiDaS_small", "format": "pt", "file": member}).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(manifest)
        archive.addfile(info, io.BytesIO(manifest))
        if source is not None:
            archive.add(source, arcname=member)
        else:
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    return path


@pytest.fixture
def extraction_targets(monkeypatch):
    """The names _bundle_extract copies members to."""
    seen: list[str] = []
    real = imports._bundle_extract

    def spy(path, workdir):
        target, manifest = real(path, workdir)
        seen.append(target.name)
        return target, manifest

    monkeypatch.setattr(imports, "_bundle_extract", spy)
    return seen


def test_a_long_member_name_imports_and_is_never_part_of_a_path(tmp_path, small_model, small_pt,
                                                                  extraction_targets):
    result = weight_import(path=bundle(tmp_path / "b.tar", LONG, source=small_pt), pin=False)
    assert result.created and result.weight_file.format == "pt"
    assert extraction_targets and all("w" * 20 not in name and ".pt" not in name for name in extraction_targets)
    assert cache_leftovers(cachefs.cache_root()) == [result.weight_file.path]


@pytest.mark.parametrize("member", ["midas_v21_small_256.pt", "../../etc/passwd.pt", "dir/sub/weights.pt"])
def test_the_extracted_copy_has_a_fixed_name(tmp_path, small_model, small_pt, extraction_targets, member):
    weight_import(path=bundle(tmp_path / "b.tar", member, source=small_pt), pin=False)
    assert extraction_targets and all(name.endswith("-bundle") for name in extraction_targets), extraction_targets
    assert cache_leftovers(cachefs.cache_root()) == [WeightFile.objects.get().path]


def test_bad_weights_under_a_long_name_are_refused_naming_the_member_briefly(tmp_path, small_model):
    with pytest.raises(WeightFileError) as caught:
        weight_import(path=bundle(tmp_path / "b.tar", LONG, NOT_WEIGHTS), pin=False)
    message = caught.value.message
    assert "w" * 150 in message and LONG not in message and len(message) < 600, message
    assert not WeightFile.objects.exists() and cache_leftovers(cachefs.cache_root()) == []


def _open_failing_for_the_copy(monkeypatch, code: int) -> None:
    def fake_open(file, mode="r", *args, **kwargs):
        if mode == "xb":
            raise OSError(code, "refused by the test", str(file))
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(imports, "open", fake_open, raising=False)


@pytest.mark.parametrize("code", [errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ])
def test_an_oserror_while_extracting_is_a_bad_bundle(tmp_path, small_model, monkeypatch, code):
    _open_failing_for_the_copy(monkeypatch, code)
    with pytest.raises(WeightFileError) as caught:
        weight_import(path=bundle(tmp_path / "b.tar", LONG, NOT_WEIGHTS), pin=False)
    assert caught.value.status == 422 and caught.value.extra.get("kind") == "bad_bundle"
    assert "w" * 150 in caught.value.message and LONG not in caught.value.message
    assert str(tmp_path) not in caught.value.message and cache_leftovers(cachefs.cache_root()) == []


def test_too_many_open_files_while_extracting_is_temporary(tmp_path, small_model, monkeypatch):
    _open_failing_for_the_copy(monkeypatch, errno.EMFILE)
    with pytest.raises(ApplicationError) as caught:
        weight_import(path=bundle(tmp_path / "b.tar", "midas_v21_small_256.pt", NOT_WEIGHTS), pin=False)
    assert caught.value.status == 503 and "try again" in caught.value.message
    assert cache_leftovers(cachefs.cache_root()) == []


# A guard (so it was before): no space left while extracting is the one DiskFullError.
def test_no_space_while_extracting_stays_disk_full(tmp_path, small_model, monkeypatch):
    _open_failing_for_the_copy(monkeypatch, errno.ENOSPC)
    with pytest.raises(ApplicationError) as caught:
        weight_import(path=bundle(tmp_path / "b.tar", "midas_v21_small_256.pt", NOT_WEIGHTS), pin=False)
    assert caught.value.status == 507


# --- over HTTP -------------------------------------------------------------------------------------


@pytest.fixture
def staff_client(db):
    """An operator's token client that answers a server error as a response (a 500), as a real client sees it."""
    from django.contrib.auth import get_user_model
    from django.core.cache import cache
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    from tests.support.operators import grant_operator_permissions

    cache.clear()  # throttle counters
    user = grant_operator_permissions(get_user_model().objects.create_user(
        "operator", "operator@example.com", "pw-operator-123", is_staff=True))
    client = APIClient(raise_request_exception=False)
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    yield client
    cache.clear()


def _post(client, path):
    return client.post("/api/models/import", {"file": SimpleUploadedFile("b.tar", path.read_bytes())},
                       format="multipart")


def test_api_imports_weights_under_a_long_member_name(staff_client, tmp_path, small_model, small_pt):
    response = _post(staff_client, bundle(tmp_path / "b.tar", LONG, source=small_pt))
    assert response.status_code == 201, response.content[:500]
    assert response.json()["format"] == "pt"
    assert cache_leftovers(cachefs.cache_root()) == [WeightFile.objects.get().path]


def test_api_refuses_bad_weights_under_a_long_member_name_with_json(staff_client, tmp_path, small_model):
    response = _post(staff_client, bundle(tmp_path / "b.tar", LONG, NOT_WEIGHTS))
    assert response.status_code == 422, (response.status_code, response.content[:300])
    body = response.json()
    assert set(body) == {"message", "extra"} and body["message"].startswith("b.tar/"), body
    assert LONG not in body["message"]
    assert not WeightFile.objects.exists() and cache_leftovers(cachefs.cache_root()) == []


def test_api_answers_an_oserror_while_extracting_with_json(staff_client, tmp_path, small_model, monkeypatch):
    _open_failing_for_the_copy(monkeypatch, errno.ENAMETOOLONG)
    response = _post(staff_client, bundle(tmp_path / "b.tar", LONG, NOT_WEIGHTS))
    assert response.status_code == 422, (response.status_code, response.content[:300])
    assert response.json()["extra"]["kind"] == "bad_bundle"
