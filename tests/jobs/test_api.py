"""The predictions API: 202 on create, reads, paging, delete, files with content types, access and error shapes."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings
from rest_framework.authtoken.models import Token
from rest_framework.settings import api_settings
from rest_framework.test import APIClient

from inference.models import DepthJob
from depthsite.testing import images
from tests.jobs.conftest import upload

pytestmark = pytest.mark.django_db
LIST = "/api/predictions/"


def submit(client, run_jobs, data: bytes | None = None, name: str = "photo.jpg", **fields):
    payload = {"image": upload(data, name), **fields}
    with run_jobs():
        return client.post(LIST, payload, format="multipart")


def test_create_answers_202_with_the_job_and_its_urls(api, cached_small, run_jobs, user):
    response = submit(api, run_jobs, model="midas_small", outputs=["png", "npy"], colormap="magma")
    assert response.status_code == 202, response.content
    body = response.json()
    job = DepthJob.objects.get()
    assert body["id"] == str(job.pk) and job.owner == user
    assert body["url"] == f"http://testserver/api/predictions/{job.pk}/" == response["Location"]
    assert body["page_url"] == f"http://testserver/jobs/{job.pk}/"
    assert body["model"] == "MiDaS_small" and body["outputs"] == ["png", "npy"] and body["colormap"] == "magma"
    # queued on commit: here the test's transaction commits after the response, then the job runs inline
    assert body["status"] == "queued" and body["files"] == {}
    body = api.get(body["url"]).json()
    assert body["status"] == "succeeded", body["error"]
    assert set(body["files"]) == {"png", "npy"}


def test_read_shows_status_timings_files_range_and_semantics(api, cached_small, run_jobs):
    job_id = submit(api, run_jobs, outputs="png,npy,pfm").json()["id"]
    body = api.get(f"{LIST}{job_id}/").json()
    assert body["status"] == "succeeded" and body["attempts"] == 1 and body["error"] == ""
    assert body["inference_ms"] > 0 and body["load_ms"] is not None
    assert body["started_at"] and body["finished_at"] and body["queued_at"]
    assert body["depth_max"] > body["depth_min"] and "inverse depth" in body["semantics"]
    assert len(body["weights_sha256"]) == 64 and body["preview"] == "png"
    assert body["image"] == {"name": "photo.jpg", "size": len(images.jpeg()), "sha256": body["image"]["sha256"],
                             "format": "JPEG", "width": 96, "height": 72}
    assert body["files"] == {fmt: f"http://testserver/api/predictions/{job_id}/files/{fmt}/"
                             for fmt in ("png", "npy", "pfm")}


def test_result_files_download_with_their_content_types(api, cached_small, run_jobs):
    body = submit(api, run_jobs, outputs=["png", "png16", "npy", "pfm", "side"]).json()
    body = api.get(body["url"]).json()
    expected = {"png": "image/png", "png16": "image/png", "npy": "application/octet-stream",
                "pfm": "application/octet-stream", "side": "image/png"}
    for fmt, content_type in expected.items():
        response = api.get(body["files"][fmt])
        assert response.status_code == 200 and response["Content-Type"] == content_type
        assert "photo-depth" in response["Content-Disposition"]
    npy = b"".join(api.get(body["files"]["npy"]).streaming_content)
    depth = np.load(io.BytesIO(npy))
    assert depth.shape == (72, 96) and float(depth.max()) == pytest.approx(body["depth_max"])
    missing = api.get(f"{LIST}{body['id']}/files/exr/", HTTP_ACCEPT="image/png")
    assert missing.status_code == 404 and missing["Content-Type"] == "application/json"
    assert "no 'exr' output" in missing.json()["message"]


def test_list_is_paginated_and_only_the_callers(api, small_model, user, other_user, staff):
    from inference.services.jobs import depth_job_create

    for _ in range(22):
        depth_job_create(image=upload(), owner=user)
    theirs = depth_job_create(image=upload(), owner=other_user)
    first = api.get(LIST).json()
    assert first["count"] == 22 and len(first["results"]) == 20 and first["next"]
    assert str(theirs.pk) not in {item["id"] for item in first["results"]}
    assert len(api.get(first["next"]).json()["results"]) == 2
    assert api.get(LIST + "?page=9").status_code == 404
    admin = APIClient()
    admin.force_authenticate(staff)
    assert admin.get(LIST).json()["count"] == 23  # staff see all
    assert admin.get(f"{LIST}{theirs.pk}/").status_code == 200


def test_another_users_job_does_not_exist_for_you(api, small_model, other_user):
    from inference.services.jobs import depth_job_create

    theirs = depth_job_create(image=upload(), owner=other_user)
    for response in (api.get(f"{LIST}{theirs.pk}/"), api.delete(f"{LIST}{theirs.pk}/"),
                     api.get(f"{LIST}{theirs.pk}/files/png/")):
        assert response.status_code == 404 and response.json()["message"].startswith("no prediction")
    assert DepthJob.objects.filter(pk=theirs.pk).exists()


def test_delete_removes_the_job_and_its_files(api, cached_small, run_jobs):
    body = submit(api, run_jobs, outputs=["png", "npy"]).json()
    body = api.get(body["url"]).json()
    job = DepthJob.objects.get()
    paths = [Path(settings.MEDIA_ROOT) / job.image.name, Path(settings.MEDIA_ROOT) / "results" / body["id"]]
    assert all(path.exists() for path in paths)
    with run_jobs():
        response = api.delete(f"{LIST}{body['id']}/")
    assert response.status_code == 204
    assert not DepthJob.objects.exists() and not any(path.exists() for path in paths)
    assert api.get(f"{LIST}{body['id']}/").status_code == 404
    assert api.get(body["files"]["png"]).status_code == 404


@pytest.mark.parametrize("fields, message", [
    ({"model": "GPT-5"}, "model: unknown model 'GPT-5'"),
    ({"outputs": ["png", "tiff"]}, "outputs: unknown output format 'tiff'"),
    ({"colormap": "rainbow"}, 'colormap: "rainbow" is not a valid choice.'),
])
def test_bad_fields_are_400_naming_the_field(api, small_model, run_jobs, fields, message):
    response = submit(api, run_jobs, **fields)
    assert response.status_code == 400
    assert response.json()["message"] == message or response.json()["message"].startswith(message)
    assert set(response.json()) == {"message", "extra"}
    assert not DepthJob.objects.exists()


def test_a_missing_or_textual_image_is_400(api, small_model):
    response = api.post(LIST, {"model": "MiDaS_small"}, format="multipart")
    assert response.status_code == 400 and response.json()["message"].startswith("image:")
    response = api.post(LIST, {"image": "not a file"}, format="multipart")
    assert response.status_code == 400 and response.json()["message"].startswith("image:")
    assert api.post(LIST, {"image": "x"}, format="json").status_code == 415


def test_over_the_byte_limit_is_413_before_the_body_is_read(api, small_model, run_jobs, settings):
    settings.DEPTHSITE_MAX_UPLOAD_BYTES = 100_000
    big = b"\xff\xd8" + b"\0" * 300_000
    response = submit(api, run_jobs, big, "huge.jpg")
    assert response.status_code == 413
    body = response.json()
    assert body["message"].startswith("image: the file is") and "the limit is 100.0 KB" in body["message"]
    assert body["extra"]["limit"] == 100_000 and not DepthJob.objects.exists()
    # under the envelope allowance the file's own size is what counts
    response = submit(api, run_jobs, b"\xff\xd8" + b"\0" * 120_000, "bigger.jpg")
    assert response.status_code == 413 and not DepthJob.objects.exists()


def test_token_and_session_authentication(cached_small, run_jobs, user, client):
    token = Token.objects.create(user=user)
    by_token = APIClient()
    by_token.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    response = submit(by_token, run_jobs)
    assert response.status_code == 202 and DepthJob.objects.get().owner == user
    client.force_login(user)
    assert client.get(LIST).json()["count"] == 1
    assert APIClient().get(LIST).status_code == 401  # anonymous, uploads not public (Token first: 401)
    bad = APIClient()
    bad.credentials(HTTP_AUTHORIZATION="Token nope")
    assert bad.get(LIST).status_code in (401, 403)


def test_session_clients_need_csrf(user, small_model):
    strict = APIClient(enforce_csrf_checks=True)
    strict.force_login(user)
    response = strict.post(LIST, {"image": upload()}, format="multipart")
    assert response.status_code == 403 and "CSRF" in response.json()["message"]
    assert not DepthJob.objects.exists()


def test_anonymous_callers_when_uploads_are_public(cached_small, run_jobs, settings):
    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    anonymous = APIClient()
    response = submit(anonymous, run_jobs)
    assert response.status_code == 202
    job_id = response.json()["id"]
    job = DepthJob.objects.get()
    assert job.owner is None and job.session_key
    assert [item["id"] for item in anonymous.get(LIST).json()["results"]] == [job_id]  # its session's jobs
    stranger = APIClient()
    assert stranger.get(LIST).json()["count"] == 0
    assert stranger.get(f"{LIST}{job_id}/").json()["status"] == "succeeded"  # readable by its random id
    assert stranger.delete(f"{LIST}{job_id}/").status_code == 404  # but only its session deletes it
    assert anonymous.delete(f"{LIST}{job_id}/").status_code == 204


def test_anonymous_uploads_are_throttled(small_model, run_jobs, settings, monkeypatch):
    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    monkeypatch.setitem(settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES", {"uploads": "2/hour", "writes": "50/hour"})
    api_settings.reload()
    try:
        anonymous = APIClient()
        codes = [submit(anonymous, run_jobs).status_code for _ in range(3)]
        throttled = submit(anonymous, run_jobs)
        reads = anonymous.get(LIST).status_code
    finally:
        monkeypatch.undo()
        api_settings.reload()
    assert codes == [202, 202, 429] and reads == 200
    assert throttled.status_code == 429 and "throttled" in throttled.json()["message"].lower()


def test_unknown_or_malformed_ids_are_404(api, small_model):
    assert api.get(f"{LIST}00000000-0000-0000-0000-000000000000/").status_code == 404
    malformed = api.get(f"{LIST}not-a-uuid/")
    assert malformed.status_code == 404 and malformed.json()["message"].startswith("no prediction with id")
    assert api.get(f"{LIST}null,null/files/png/").status_code == 404
    assert api.delete(f"{LIST}00000000-0000-0000-0000-000000000000/").status_code == 404


def test_schema_describes_the_multipart_create_and_202(api):
    schema = api.get("/api/schema/", HTTP_ACCEPT="application/json").json()
    create = schema["paths"]["/api/predictions/"]["post"]
    assert "multipart/form-data" in create["requestBody"]["content"]
    assert {"202", "400", "413"} <= set(create["responses"])
    files = schema["paths"]["/api/predictions/{id}/files/{fmt}/"]["get"]["responses"]["200"]["content"]
    assert {"image/png", "application/octet-stream"} <= set(files)
