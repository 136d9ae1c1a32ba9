"""The batch pages: the form with several files or a zip, the batch page with progress and thumbnails, its
status JSON, the zip of outputs, refusals shown under the right field, and who may see a batch."""
from __future__ import annotations

import io
import json
import re
import zipfile

import pytest
from django.test import Client
from django.urls import reverse

from inference.models import DepthBatch, DepthJob
from inference.sessions import session_digest
from depthsite.testing import images
from tests.jobs.conftest import upload
from tests.jobs.test_batch import assert_nothing_created, make_zip

pytestmark = pytest.mark.django_db


@pytest.fixture
def web(client, user):
    client.force_login(user)
    return client


def post_batch(client, run_jobs, *, photos=(), archive: bytes | None = None, **fields):
    form = {"images": [upload(data, name) for name, data in photos], "model": "MiDaS_small", "colormap": "inferno",
            "outputs": ["png"], **fields}
    if archive is not None:
        form["archive"] = upload(archive, "photos.zip", content_type="application/zip")
    with run_jobs():
        return client.post(reverse("inference:batch_upload"), form)


def test_the_batch_form_takes_several_files_and_a_zip(web, small_model):
    page = web.get(reverse("inference:batch_upload")).content.decode()
    assert re.search(r'<input type="file" name="images"[^>]* multiple', page)
    assert re.search(r'<input type="file" name="archive"[^>]*accept=".zip', page)
    assert "at most 50 photos and 200.0 MB in all" in page and 'value="MiDaS_small" checked' in page
    assert 'id="batch-link"' in web.get("/").content.decode()  # the single upload page leads to it


def test_the_batch_form_needs_login_unless_uploads_are_public(client, small_model, settings):
    response = client.get(reverse("inference:batch_upload"))
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]
    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    assert client.get(reverse("inference:batch_upload")).status_code == 200


def test_several_photos_lead_to_the_batch_page_with_every_job(web, cached_small, run_jobs, user):
    response = post_batch(web, run_jobs, photos=[("a.jpg", images.jpeg()), ("b.jpg", images.jpeg(80, 60))])
    batch = DepthBatch.objects.get()
    assert response.status_code == 302 and response["Location"] == f"/batch/{batch.pk}/"
    assert batch.owner == user and DepthJob.objects.filter(batch=batch).count() == 2
    page = web.get(response["Location"]).content.decode()
    assert '<progress id="batch-progress" max="2" value="2">' in page and "2 of 2 done" in page
    for job in DepthJob.objects.filter(batch=batch):
        assert f'href="/jobs/{job.pk}/"' in page
        assert f'src="/jobs/{job.pk}/input"' in page and f'src="/jobs/{job.pk}/files/png"' in page
    assert "Download all outputs (zip)" in page and f'href="/batch/{batch.pk}/archive.zip"' in page
    assert "batch.js" in page


def test_the_status_json_says_the_progress(web, cached_small, run_jobs, monkeypatch):
    from inference.services import jobs as job_services
    from inference.services.job_runs import depth_job_run

    monkeypatch.setattr(job_services, "depth_job_enqueue", lambda job_id: None)  # left queued
    post_batch(web, run_jobs, photos=[("a.jpg", images.jpeg()), ("b.jpg", images.jpeg(80, 60))])
    batch = DepthBatch.objects.get()
    url = reverse("inference:batch_status", args=[batch.pk])
    state = web.get(url).json()
    assert state["total"] == 2 and state["done"] == 0 and not state["complete"] and state["progress"] == 0
    assert state["counts"]["queued"] == 2 and all(job["depth_url"] == "" for job in state["jobs"])
    first = DepthJob.objects.filter(batch=batch).order_by("created_at").first()
    depth_job_run(job=first)
    state = web.get(url).json()
    assert state["done"] == 1 and state["progress"] == 0.5 and state["counts"]["succeeded"] == 1
    assert state["jobs"][0]["depth_url"] == f"/jobs/{first.pk}/files/png"
    page = web.get(state["page_url"]).content.decode()
    assert "Download the finished outputs so far (zip)" in page and "1 of 2 done" in page


def test_a_zip_upload_lists_what_it_skipped(web, cached_small, run_jobs):
    archive = make_zip({"trip/a.jpg": images.jpeg(), "trip/notes.txt": b"hi"})
    response = post_batch(web, run_jobs, archive=archive)
    assert response.status_code == 302
    page = web.get(response["Location"]).content.decode()
    assert "1 file of the zip skipped" in page and "trip/notes.txt" in page and "from photos.zip" in page


def test_a_hostile_zip_is_refused_under_the_archive_field_and_nothing_is_kept(web, small_model, run_jobs):
    response = post_batch(web, run_jobs, photos=[("a.jpg", images.jpeg())],
                          archive=make_zip({"../../evil.jpg": images.jpeg()}))
    assert response.status_code == 400
    errors = re.search(r'<ul class="errorlist" id="archive-errors">(.*?)</ul>', response.content.decode(), re.S)
    assert errors and "climbs out of the archive" in errors.group(1)
    assert 'value="MiDaS_small" checked' in response.content.decode()
    assert_nothing_created()


def test_a_bad_photo_is_named_under_the_photos_field(web, small_model, run_jobs):
    response = post_batch(web, run_jobs, photos=[("a.jpg", images.jpeg()), ("notes.jpg", b"plain text")])
    errors = re.search(r'<ul class="errorlist" id="images-errors">(.*?)</ul>', response.content.decode(), re.S)
    assert response.status_code == 400 and errors and "notes.jpg: " in errors.group(1)
    assert_nothing_created()


def test_a_body_over_the_batch_limit_is_a_413_next_to_the_photos(web, small_model, run_jobs, settings):
    settings.DEPTHSITE_BATCH_MAX_BYTES = 100_000
    photo = images.jpeg(640, 480)
    response = post_batch(web, run_jobs, photos=[(f"{n}.jpg", photo) for n in range(6)], colormap="magma")
    assert len(photo) * 6 > 100_000 + 64 * 1024
    assert response.status_code == 413
    page = response.content.decode()
    errors = re.search(r'<ul class="errorlist" id="images-errors">(.*?)</ul>', page, re.S)
    assert errors and re.search(r"The batch is about [\d.]+ KB; a batch takes at most 100.0 KB in all "
                                r"\(DEPTHSITE_BATCH_MAX_BYTES\)", errors.group(1))
    assert '<option value="magma" selected>' in page  # the user's choices are kept
    assert_nothing_created()


def test_the_rate_counts_every_photo_of_a_batch(web, small_model, run_jobs, settings):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": {"uploads": "2/hour",
                                                                                     "writes": "2/hour"}}
    response = post_batch(web, run_jobs, photos=[(f"{n}.jpg", images.jpeg()) for n in range(3)])
    assert response.status_code == 429 and "this batch of 3 photos would pass your upload rate" in \
        response.content.decode()
    assert_nothing_created()


def test_the_archive_from_the_web(web, cached_small, run_jobs):
    post_batch(web, run_jobs, photos=[("a.jpg", images.jpeg()), ("a.jpg", images.jpeg(80, 60))])
    batch = DepthBatch.objects.get()
    response = web.get(reverse("inference:batch_archive", args=[batch.pk]))
    assert response.status_code == 200 and response["Content-Type"] == "application/zip"
    bundle = zipfile.ZipFile(io.BytesIO(b"".join(response.streaming_content)))
    assert sorted(bundle.namelist()) == ["a-2-depth.png", "a-depth.png", "manifest.json"]
    assert json.loads(bundle.read("manifest.json"))["complete"] is True


def test_other_users_and_other_sessions_get_404(web, cached_small, run_jobs, other_user, staff, settings):
    post_batch(web, run_jobs, photos=[("a.jpg", images.jpeg())])
    batch = DepthBatch.objects.get()
    urls = [reverse(name, args=[batch.pk]) for name in
            ("inference:batch_detail", "inference:batch_status", "inference:batch_archive")]
    other = Client()
    other.force_login(other_user)
    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    anonymous = Client()
    for client in (other, anonymous):
        assert [client.get(url).status_code for url in urls] == [404, 404, 404]
    admin = Client()
    admin.force_login(staff)
    assert [admin.get(url).status_code for url in urls] == [200, 200, 200]


def test_an_anonymous_batch_is_reachable_by_its_random_id_like_an_anonymous_job(client, cached_small, run_jobs,
                                                                               settings):
    # As for anonymous jobs: the id is the key (a client without cookies reads back what it posted).
    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    response = post_batch(client, run_jobs, photos=[("a.jpg", images.jpeg())])
    assert response.status_code == 302
    batch = DepthBatch.objects.get()
    # The stored key is a digest of the session key, never the sessionid cookie itself.
    assert batch.owner is None and batch.session_key == session_digest(client.session.session_key)
    assert client.session.session_key not in batch.session_key
    assert DepthJob.objects.get().session_key == batch.session_key
    assert client.get(response["Location"]).status_code == 200
    assert Client().get(response["Location"]).status_code == 200
    settings.DEPTHSITE_PUBLIC_UPLOADS = False
    assert Client().get(response["Location"]).status_code == 302  # to the login page


def test_staff_find_batches_in_the_admin(client, staff, cached_small, run_jobs):
    client.force_login(staff)
    post_batch(client, run_jobs, photos=[("a.jpg", images.jpeg()), ("b.jpg", images.jpeg())])
    batch = DepthBatch.objects.get()
    listing = client.get("/admin/inference/depthbatch/").content.decode()
    assert batch.short_id in listing and '<td class="field-job_count">2</td>' in listing
    page = client.get(f"/admin/inference/depthbatch/{batch.pk}/change/").content.decode()
    assert f"/batch/{batch.pk}/" in page


@pytest.mark.parametrize("door", ["web", "api"])
def test_refused_batches_count_against_the_rate_too(web, api, small_model, run_jobs, settings, door):
    """Every batch request counts one upload before its body is read: a refused archive or an oversized body
    cost the server its reading, and before they were never counted, so they could be repeated without end."""
    from tests.jobs.test_batch import post_batch as post_api_batch

    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK,
                               "DEFAULT_THROTTLE_RATES": {"uploads": "3/hour", "writes": "3/hour"}}
    post = (lambda: post_batch(web, run_jobs, archive=b"not a zip at all")) if door == "web" else (
        lambda: post_api_batch(api, run_jobs, archive=b"not a zip at all"))
    assert [post().status_code for _ in range(4)] == [400, 400, 400, 429]
    assert DepthJob.objects.count() == 0
