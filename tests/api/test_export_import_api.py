"""Export streams and multipart imports over HTTP: bytes, headers, every format, bundles, limits, hostile files."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from models_registry import cachefs
from models_registry.api.uploads import ENVELOPE_BYTES, ImportUploadHandler
from models_registry.choices import Health
from depthsite.exceptions import TooLargeError
from models_registry.formats import content_digest, read_weights
from models_registry.models import WeightFile
from tests.api.conftest import cache_leftovers
from tests.api.test_models_api import assert_error

pytestmark = pytest.mark.django_db


def body_of(response) -> bytes:
    return b"".join(response.streaming_content)


def assert_digest_headers(response, body: bytes) -> str:
    sha256 = hashlib.sha256(body).hexdigest()
    encoded = base64.b64encode(hashlib.sha256(body).digest()).decode()
    assert response["Content-Length"] == str(len(body))
    assert response["ETag"] == f'"{sha256}"'
    assert response["Digest"] == f"sha-256={encoded}"
    assert response["Repr-Digest"] == f"sha-256=:{encoded}:"
    return sha256


def upload(path, name: str | None = None) -> SimpleUploadedFile:
    return SimpleUploadedFile(name or path.name, path.read_bytes(), content_type="application/octet-stream")


# --- export --------------------------------------------------------------------------------------


def test_export_streams_the_cached_file_with_its_digests(staff_client, cached_small):
    response = staff_client.get("/api/models/midas-small/export?format=pt")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/octet-stream"
    assert response["Content-Disposition"] == 'attachment; filename="midas_v21_small_256.pt"'
    body = body_of(response)
    assert body == cachefs.absolute(cached_small.path).read_bytes()
    assert assert_digest_headers(response, body) == cached_small.sha256
    assert response["X-Content-Digest"] == cached_small.content_digest


def test_export_in_another_format_converts_on_the_fly_and_leaves_nothing(staff_client, cached_small, tmp_path):
    # `format` is the weight format, not DRF's renderer override, even when the client asks for bytes.
    response = staff_client.get("/api/models/MiDaS_small/export/?format=h5", HTTP_ACCEPT="application/octet-stream")
    assert response.status_code == 200
    assert response["Content-Disposition"] == 'attachment; filename="midas_v21_small_256.h5"'
    body = body_of(response)
    assert_digest_headers(response, body)
    target = tmp_path / "out.h5"
    target.write_bytes(body)
    assert content_digest(read_weights(target).arrays) == cached_small.content_digest
    assert cache_leftovers(cachefs.cache_root()) == [cached_small.path]  # the temporary export is gone
    assert not WeightFile.objects.filter(format="h5").exists()  # an export is not a conversion


def test_export_bundle_is_a_tar_with_a_manifest(staff_client, cached_small):
    response = staff_client.get("/api/models/MiDaS_small/export?format=pt&bundle=1")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/x-tar"
    assert response["Content-Disposition"] == 'attachment; filename="midas_v21_small_256.pt.tar"'
    body = body_of(response)
    assert_digest_headers(response, body)
    with tarfile.open(fileobj=io.BytesIO(body)) as archive:
        assert archive.getnames() == ["manifest.json", "midas_v21_small_256.pt"]
        manifest = json.loads(archive.extractfile("manifest.json").read())
        member = archive.extractfile("midas_v21_small_256.pt").read()
    assert manifest["model"] == "MiDaS_small" and manifest["file_sha256"] == hashlib.sha256(member).hexdigest()
    assert manifest["content_digest"] == cached_small.content_digest


@pytest.mark.parametrize("query, status, words", [
    ("format=onnx", 400, "unknown format 'onnx'"),
    ("bundle=perhaps", 400, "bundle:"),
])
def test_export_rejects_bad_queries(staff_client, small_model, query, status, words):
    assert_error(staff_client.get(f"/api/models/MiDaS_small/export?{query}"), status, words)


def test_export_without_cached_weights_or_model_is_not_found(staff_client, small_model):
    assert_error(staff_client.get("/api/models/MiDaS_small/export?format=pt"), 404, "no healthy cached weights")
    assert_error(staff_client.get("/api/models/ResNet/export"), 404, "unknown model")


def test_export_of_a_file_changed_on_disk_is_a_conflict(staff_client, cached_small):
    path = cachefs.absolute(cached_small.path)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    # The cached file is not streamed as is (its size is unchanged, but a bundle re-hashes what it copies).
    assert_error(staff_client.get("/api/models/MiDaS_small/export?bundle=true"), 409, "changed on disk")
    cached_small.refresh_from_db()
    assert cached_small.health == Health.CORRUPT


# --- import --------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "h5", "pkl"])
def test_import_of_each_format(staff_client, small_model, write_checkpoint, fmt):
    path = write_checkpoint(fmt, name=f"weights-{fmt}.bin")  # the name says nothing: the content decides
    response = staff_client.post("/api/models/import", {"file": upload(path)}, format="multipart")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["model"] == "MiDaS_small" and body["format"] == fmt and body["created"] is True
    assert f"from weights-{fmt}.bin (" in body["message"]
    assert body["file"]["health"] == "ok" and body["file"]["functional_hash"]
    weight_file = WeightFile.objects.get(model=small_model, format=fmt)
    assert cachefs.absolute(weight_file.path).read_bytes() == path.read_bytes()
    assert cache_leftovers(cachefs.cache_root()) == [weight_file.path]


def test_import_of_a_bundle_and_then_the_same_weights_again(staff_client, cached_small, tmp_path):
    exported = staff_client.get("/api/models/MiDaS_small/export?format=safetensors&bundle=1")
    bundle = tmp_path / "small.tar"
    bundle.write_bytes(body_of(exported))

    response = staff_client.post("/api/models/import/", {"file": upload(bundle)}, format="multipart")
    assert response.status_code == 201, response.content
    assert response.json()["format"] == "safetensors"

    again = staff_client.post("/api/models/import", {"file": upload(bundle), "model": "midas_small"},
                              format="multipart")
    assert again.status_code == 200 and again.json()["created"] is False
    assert "already cached with identical weights" in again.json()["message"]
    assert sorted(cache_leftovers(cachefs.cache_root())) == sorted(f.path for f in WeightFile.objects.all())


class _Exploit:
    """A pickle payload whose loading would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_and_runs_nothing(staff_client, small_model, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"weight": np.zeros(3, np.float32), "x": _Exploit(marker)}, protocol=4)
    evil = SimpleUploadedFile("midas_v21_small_256.pkl", payload)
    body = assert_error(staff_client.post("/api/models/import", {"file": evil, "model": "MiDaS_small"},
                                          format="multipart"), 422, "system")
    assert body["extra"]["kind"] == "unsafe_pickle"
    assert body["message"].startswith("midas_v21_small_256.pkl: refused to unpickle")  # the name the client sent
    assert not marker.exists()
    assert not WeightFile.objects.exists() and cache_leftovers(cachefs.cache_root()) == []


@pytest.mark.parametrize("content, kind", [
    (b"<!DOCTYPE html><html><body>Sign in</body></html>", "html"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n", "lfs_pointer"),
    (b"not weights at all", "unknown"),
])
def test_import_of_classic_bad_files_names_them(staff_client, small_model, content, kind):
    response = staff_client.post("/api/models/import", {"file": SimpleUploadedFile("w.pt", content)},
                                 format="multipart")
    assert assert_error(response, 422)["extra"]["kind"] == kind
    assert cache_leftovers(cachefs.cache_root()) == []


def test_import_for_the_wrong_model_says_what_differs(staff_client, small_model, small_pt):
    body = assert_error(staff_client.post("/api/models/import", {"file": upload(small_pt), "model": "DPT_Large"},
                                          format="multipart"), 422, "keys do not match the official DPT_Large")
    assert body["extra"]["kind"] == "layout_mismatch"
    assert_error(staff_client.post("/api/models/import", {"file": upload(small_pt), "model": "ResNet"},
                                   format="multipart"), 404, "unknown model")


def test_import_needs_a_file_in_a_multipart_body(staff_client, db):
    assert_error(staff_client.post("/api/models/import", {}, format="multipart"), 400, "file:")
    assert_error(staff_client.post("/api/models/import", {"file": SimpleUploadedFile("e.pt", b"")},
                                   format="multipart"), 400, "empty")
    assert staff_client.post("/api/models/import", {"file": "x"}, format="json").status_code == 415


def test_import_over_the_limit_by_content_length_is_refused_before_reading(staff_client, small_pt, settings):
    settings.DEPTHSITE_MAX_IMPORT_BYTES = 1000
    body = assert_error(staff_client.post("/api/models/import", {"file": upload(small_pt)}, format="multipart"),
                        413, "exceeds the import limit of 1.0 KB", "DEPTHSITE_MAX_IMPORT_BYTES")
    assert body["extra"]["max_bytes"] == 1000
    assert cache_leftovers(cachefs.cache_root()) == [] and not WeightFile.objects.exists()


def test_import_over_the_limit_by_its_bytes_is_refused_while_streaming(staff_client, small_pt, settings):
    # Within the envelope allowance, so the Content-Length passes: the handler counts the bytes themselves.
    settings.DEPTHSITE_MAX_IMPORT_BYTES = small_pt.stat().st_size - 1
    assert_error(staff_client.post("/api/models/import", {"file": upload(small_pt)}, format="multipart"), 413,
                 "exceeds the import limit")
    assert cache_leftovers(cachefs.cache_root()) == [] and not WeightFile.objects.exists()


def test_upload_handler_refuses_before_the_body_is_read(db):
    handler = ImportUploadHandler(max_bytes=100)
    with pytest.raises(TooLargeError):
        handler.handle_raw_input(io.BytesIO(), {}, 100 + ENVELOPE_BYTES + 1, b"x")
    assert handler.handle_raw_input(io.BytesIO(), {}, 100 + ENVELOPE_BYTES, b"x") is None
    assert handler.paths == []
