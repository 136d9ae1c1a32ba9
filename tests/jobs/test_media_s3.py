"""Job media in an S3-compatible store: moto's real HTTP server on loopback, django-storages' S3Storage in front.

Upload -> job run -> download through the web page and the API -> reuse of the first result -> delete, and
every byte lives in the bucket, none under MEDIA_ROOT.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from botocore.config import Config
from django.urls import reverse

from inference.models import DepthJob
from depthsite.testing import images
from tests.jobs.conftest import upload

pytestmark = [pytest.mark.django_db, pytest.mark.slow]
BUCKET = "depthsite-media"
KEYS = {"access_key": "testing-access", "secret_key": "testing-secret", "region_name": "us-east-1"}
# Every call to the loopback server is bounded: a stuck server fails the test instead of hanging it.
BOUNDED = Config(connect_timeout=5, read_timeout=15, retries={"max_attempts": 1})


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint, settings, tmp_path):
    """An empty bucket, and the site's default storage pointed at it (as DEPTHSITE_MEDIA_STORAGE=s3 does)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, aws_access_key_id=KEYS["access_key"],
                          aws_secret_access_key=KEYS["secret_key"], region_name=KEYS["region_name"], config=BOUNDED)
    client.create_bucket(Bucket=BUCKET)
    settings.STORAGES = {**settings.STORAGES, "default": {"BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": {
        "bucket_name": BUCKET, "endpoint_url": s3_endpoint, **KEYS, "location": "site", "file_overwrite": True,
        "default_acl": None, "addressing_style": "path", "client_config": BOUNDED}}}
    settings.DEPTHSITE_MEDIA_STAGING = tmp_path / "staging"
    yield client
    keys = [item["Key"] for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    for key in keys:
        client.delete_object(Bucket=BUCKET, Key=key)
    client.delete_bucket(Bucket=BUCKET)


def _keys(client) -> set[str]:
    return {item["Key"] for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", [])}


def _body(client, key: str) -> bytes:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def _files_under(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()] if folder.exists() else []


def test_media_in_s3_upload_run_download_reuse_delete(bucket, api, user, other_user, cached_small, run_jobs, client,
                                                        settings):
    photo = images.jpeg()
    with run_jobs():
        first = api.post("/api/predictions/", {"image": upload(photo), "outputs": ["png", "npy"]}, format="multipart")
    assert first.status_code == 202, first.content
    job = DepthJob.objects.get(pk=first.json()["id"])
    assert job.status == "succeeded", job.error
    keys = _keys(bucket)
    assert f"site/{job.image.name}" in keys and _body(bucket, f"site/{job.image.name}") == photo
    assert {f"site/{name}" for name in job.result_files.values()} <= keys
    assert all(name.startswith(f"results/{job.pk}/") for name in job.result_files.values())
    assert job.results_bytes > 0
    # Nothing went to the local media folder, and the worker's staging folder is empty again.
    assert _files_under(Path(settings.MEDIA_ROOT)) == [] and _files_under(settings.DEPTHSITE_MEDIA_STAGING) == []

    # Downloads stream from the bucket, through the API and the web page, to the owner only.
    stored_png = _body(bucket, f"site/{job.result_files['png']}")
    api_png = api.get(f"/api/predictions/{job.pk}/files/png/")
    assert api_png.status_code == 200 and b"".join(api_png.streaming_content) == stored_png
    client.force_login(user)
    web_npy = client.get(reverse("inference:job_file", args=[job.pk, "npy"]) + "?download=1")
    assert web_npy.status_code == 200 and b"".join(web_npy.streaming_content) == _body(
        bucket, f"site/{job.result_files['npy']}")
    assert client.get(reverse("inference:job_detail", args=[job.pk])).status_code == 200
    assert client.get(reverse("inference:job_input", args=[job.pk])).status_code == 200
    client.force_login(other_user)
    assert client.get(reverse("inference:job_file", args=[job.pk, "png"])).status_code == 404

    # The same photo again: the earlier result is reused, copied into the new job's own folder.
    with run_jobs():
        second_id = api.post("/api/predictions/", {"image": upload(photo), "outputs": ["png", "npy"]},
                             format="multipart").json()["id"]
    again = DepthJob.objects.get(pk=second_id)
    assert again.status == "succeeded" and again.reused_from_id == job.pk
    assert all(name.startswith(f"results/{again.pk}/") for name in again.result_files.values())
    assert _body(bucket, f"site/{again.result_files['png']}") == stored_png
    assert b"".join(api.get(f"/api/predictions/{again.pk}/files/png/").streaming_content) == stored_png

    # Deleting the first job removes its objects, and only its own.
    first_keys = {f"site/{job.image.name}"} | {f"site/{name}" for name in job.result_files.values()}
    with run_jobs():
        assert api.delete(f"/api/predictions/{job.pk}/").status_code == 204
    left = _keys(bucket)
    assert not first_keys & left
    assert not [key for key in left if key.startswith(f"site/results/{job.pk}/")]
    assert {f"site/{again.image.name}"} | {f"site/{name}" for name in again.result_files.values()} <= left
    assert api.get(f"/api/predictions/{again.pk}/files/npy/").status_code == 200


def test_a_rerun_in_s3_replaces_the_earlier_results_without_renamed_copies(bucket, api, cached_small, run_jobs):
    from inference.services.jobs import depth_job_rerun

    with run_jobs():
        job_id = api.post("/api/predictions/", {"image": upload(), "outputs": ["png"]}, format="multipart").json()["id"]
    job = DepthJob.objects.get(pk=job_id)
    before = {key for key in _keys(bucket) if key.startswith(f"site/results/{job.pk}/")}
    assert before == {f"site/{job.result_files['png']}"}
    with run_jobs():
        depth_job_rerun(job=job)
    job.refresh_from_db()
    assert job.status == "succeeded"
    assert {key for key in _keys(bucket) if key.startswith(f"site/results/{job.pk}/")} == before


def test_a_tiffs_browser_preview_is_an_object_served_to_the_owner_and_deleted_with_the_job(bucket, api, user,
                                                                                        cached_small, run_jobs,
                                                                                        client):
    from PIL import Image

    tiff = images.encode(Image.fromarray(images.photo_array(40, 30)), "TIFF")
    with run_jobs():
        job_id = api.post("/api/predictions/", {"image": upload(tiff, "scan.tif")}, format="multipart").json()["id"]
    job = DepthJob.objects.get(pk=job_id)
    assert job.status == "succeeded" and job.input_preview.endswith(".preview.png")
    preview_key = f"site/{job.input_preview}"
    assert preview_key in _keys(bucket) and _body(bucket, preview_key).startswith(b"\x89PNG")
    client.force_login(user)
    shown = client.get(reverse("inference:job_input", args=[job.pk]))
    assert shown.status_code == 200 and shown["Content-Type"] == "image/png"
    assert b"".join(shown.streaming_content) == _body(bucket, preview_key)
    with run_jobs():
        assert api.delete(f"/api/predictions/{job.pk}/").status_code == 204
    assert _keys(bucket) == set()
