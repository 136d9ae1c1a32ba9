"""The web pages: upload form (CSRF, limits, clear errors), job page with live status, files, history, access."""
from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client
from django.urls import reverse
from PIL import Image

from depthsite.choices import RunStatus
from inference.models import DepthJob
from inference.sessions import session_digest
from depthsite.testing import images
from tests.jobs.conftest import upload

pytestmark = pytest.mark.django_db


@pytest.fixture
def web(client, user):
    client.force_login(user)
    return client


@pytest.fixture
def public(settings):
    settings.DEPTHSITE_PUBLIC_UPLOADS = True


def post_photo(client, run_jobs, data: bytes | None = None, name: str = "photo.jpg", **fields):
    form = {"image": upload(data, name), "model": "MiDaS_small", "colormap": "inferno", "outputs": ["png", "npy"]}
    form.update(fields)
    with run_jobs():
        return client.post(reverse("inference:upload"), form)


def test_upload_page_needs_login_unless_uploads_are_public(client, small_model, settings):
    response = client.get("/")
    assert response.status_code == 302 and response["Location"].startswith(reverse("login"))
    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    assert client.get("/").status_code == 200


def test_upload_page_lists_models_with_their_cache_status(web, cached_small, settings, staff):
    settings.DEPTHSITE_OFFLINE = False
    page = web.get("/").content.decode()
    assert 'enctype="multipart/form-data"' in page and "csrfmiddlewaretoken" in page
    assert re.search(r'value="MiDaS_small" checked>\s*<span class="name">MiDaS_small</span>\s*<span class="badge ok">cached', page)
    assert "downloaded from github.com on first use" in page  # the uncached models
    assert "jobs.js" in page and "jobs.css" in page
    settings.DEPTHSITE_OFFLINE = True
    page = web.get("/").content.decode()
    # A user learns what it means for them; only staff get the operators' command.
    assert "this site is offline: an administrator must import it first" in page and "manage.py" not in page
    web.force_login(staff)
    page = web.get("/").content.decode()
    assert "manage.py models import PATH --model DPT_Large" in page


def test_upload_runs_the_job_and_the_page_shows_the_result(web, cached_small, run_jobs, user):
    response = post_photo(web, run_jobs)
    job = DepthJob.objects.get()
    assert response.status_code == 302 and response["Location"] == reverse("inference:job_detail", args=[job.pk])
    assert job.owner == user and job.status == RunStatus.SUCCEEDED
    page = web.get(response["Location"]).content.decode()
    assert 'class="badge succeeded"' in page
    assert reverse("inference:job_input", args=[job.pk]) in page
    png_url = reverse("inference:job_file", args=[job.pk, "png"])
    assert f'src="{png_url}"' in page and f'href="{png_url}?download=1"' in page
    assert f'{reverse("inference:job_file", args=[job.pk, "npy"])}?download=1' in page
    assert 'id="compare-slider"' in page and "ms</td>" in page


def test_a_file_gone_between_the_access_check_and_the_read_is_a_404_not_a_500(web, api, cached_small, run_jobs,
                                                                             monkeypatch):
    # A job deleted (or expired) as its file was asked for: the selectors found the file, then it was gone.
    post_photo(web, run_jobs)
    job = DepthJob.objects.get()
    media = Path(settings.MEDIA_ROOT)
    (media / job.result_files["png"]).unlink()
    (media / job.image.name).unlink()
    monkeypatch.setattr("inference.selectors.media_exists", lambda name: True)  # the check ran before the delete
    assert web.get(reverse("inference:job_file", args=[job.pk, "png"])).status_code == 404
    assert web.get(reverse("inference:job_input", args=[job.pk])).status_code == 404
    api.force_authenticate(job.owner)
    response = api.get(f"/api/predictions/{job.pk}/files/png/")
    assert response.status_code == 404 and response.json()["extra"]["kind"] == "gone"


def test_job_status_json_is_small_and_complete(web, cached_small, run_jobs):
    post_photo(web, run_jobs)
    job = DepthJob.objects.get()
    data = web.get(reverse("inference:job_status", args=[job.pk])).json()
    assert data["status"] == "succeeded" and data["terminal"] and not data["active"]
    assert data["files"]["png"] == reverse("inference:job_file", args=[job.pk, "png"])
    assert data["preview"] == "png" and data["inference_ms"] > 0 and data["depth_max"] > data["depth_min"]
    assert data["image"]["width"] == 96 and data["model"] == "MiDaS_small"


@pytest.mark.slow
def test_result_files_are_served_with_their_content_types(web, cached_small, run_jobs):
    post_photo(web, run_jobs, outputs=["png", "png16", "npy", "pfm", "side"])
    job = DepthJob.objects.get()
    expected = {"png": "image/png", "png16": "image/png", "npy": "application/octet-stream",
                "pfm": "application/octet-stream", "side": "image/png"}
    for fmt, content_type in expected.items():
        response = web.get(reverse("inference:job_file", args=[job.pk, fmt]) + "?download=1")
        assert response.status_code == 200 and response["Content-Type"] == content_type
        assert "attachment" in response["Content-Disposition"] and "photo-depth" in response["Content-Disposition"]
        body = b"".join(response.streaming_content)
        assert body[:8] == b"\x89PNG\r\n\x1a\n" if content_type == "image/png" else len(body) > 100
    assert web.get(reverse("inference:job_file", args=[job.pk, "exr"])).status_code == 404
    photo = web.get(reverse("inference:job_input", args=[job.pk]))
    assert photo.status_code == 200 and photo["Content-Type"] == "image/jpeg"


def test_an_input_browsers_cannot_show_is_converted_once_by_the_worker(web, cached_small, run_jobs, monkeypatch):
    tiff = images.encode(Image.fromarray(images.photo_array(40, 30)), "TIFF")
    post_photo(web, run_jobs, tiff, "scan.tif")
    job = DepthJob.objects.get()
    assert job.input_preview.endswith(".preview.png")
    stored = (Path(settings.MEDIA_ROOT) / job.input_preview).read_bytes()

    def no_decoding(*args, **kwargs):
        raise AssertionError("a GET of the input decoded or encoded an image")

    # Served as stored: no GET opens or saves an image in the web process.
    monkeypatch.setattr(Image, "open", no_decoding)
    monkeypatch.setattr(Image.Image, "save", no_decoding)
    for _ in range(2):
        response = web.get(reverse("inference:job_input", args=[job.pk]))
        assert response.status_code == 200 and response["Content-Type"] == "image/png"
        assert b"".join(response.streaming_content) == stored
    monkeypatch.undo()
    assert Image.open(io.BytesIO(stored)).size == (40, 30)
    # The preview goes with its job.
    preview = Path(settings.MEDIA_ROOT) / job.input_preview
    with run_jobs():
        web.post(reverse("inference:job_delete", args=[job.pk]))
    assert not preview.exists()


@pytest.mark.parametrize("case, status, text", [
    ("text_named_jpg", 400, "not an image"),
    ("zero_bytes", 400, "empty"),
    ("png_bomb_20000", 413, "megapixels"),
])
def test_bad_files_come_back_as_form_errors(web, small_model, run_jobs, case, status, text):
    name, data, _ = images.bad_uploads()[case]
    response = post_photo(web, run_jobs, data, name)
    assert response.status_code == status
    errors = re.search(r'<ul class="errorlist" id="image-errors">(.*?)</ul>', response.content.decode(), re.S)
    assert errors and text in errors.group(1)
    assert not DepthJob.objects.exists()


def test_a_file_over_the_byte_limit_is_a_form_error(web, small_model, run_jobs, settings):
    settings.DEPTHSITE_MAX_UPLOAD_BYTES = 2000
    response = post_photo(web, run_jobs, images.png(600, 400), "big.png")
    assert response.status_code == 413
    assert "the limit is 2.0 KB" in response.content.decode()
    assert not DepthJob.objects.exists()


def test_unknown_model_and_no_model_are_form_errors(web, small_model, run_jobs):
    response = post_photo(web, run_jobs, model="NoSuchNet")
    assert response.status_code == 400 and "Select a valid choice" in response.content.decode()
    assert not DepthJob.objects.exists()


def test_the_form_needs_its_csrf_token(small_model, user):
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(user)
    response = strict.post("/", {"image": upload(), "model": "MiDaS_small", "outputs": ["png"],
                                 "colormap": "inferno"})
    assert response.status_code == 403
    assert not DepthJob.objects.exists()


def test_anonymous_uploads_are_throttled(client, small_model, public, monkeypatch, run_jobs, settings):
    monkeypatch.setitem(settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES", {"uploads": "2/hour", "writes": "9/hour"})
    from rest_framework.settings import api_settings

    api_settings.reload()
    try:
        codes = [post_photo(client, run_jobs).status_code for _ in range(3)]
    finally:
        monkeypatch.undo()
        api_settings.reload()
    assert codes == [302, 302, 429]


def test_anonymous_history_is_per_session(client, small_model, public, run_jobs):
    post_photo(client, run_jobs)
    job = DepthJob.objects.get()
    # The stored key is a digest of the session key, never the sessionid cookie itself.
    assert job.owner is None and job.session_key == session_digest(client.session.session_key)
    assert client.session.session_key not in job.session_key
    assert job.short_id in client.get(reverse("inference:job_list")).content.decode()
    stranger = Client()
    assert job.short_id not in stranger.get(reverse("inference:job_list")).content.decode()
    # the random id itself is the link: a stranger holding it may look, but not delete
    assert stranger.get(reverse("inference:job_detail", args=[job.pk])).status_code == 200
    assert stranger.post(reverse("inference:job_delete", args=[job.pk])).status_code == 404
    assert client.post(reverse("inference:job_delete", args=[job.pk])).status_code == 302
    assert not DepthJob.objects.exists()


def test_users_see_only_their_own_jobs(web, client, cached_small, run_jobs, other_user):
    post_photo(web, run_jobs)
    job = DepthJob.objects.get()
    other = Client()
    other.force_login(other_user)
    for name, args in [("job_detail", [job.pk]), ("job_input", [job.pk]), ("job_file", [job.pk, "png"])]:
        assert other.get(reverse(f"inference:{name}", args=args)).status_code == 404
    assert other.get(reverse("inference:job_status", args=[job.pk])).status_code == 404
    assert job.short_id not in other.get(reverse("inference:job_list")).content.decode()
    assert job.short_id in web.get(reverse("inference:job_list")).content.decode()


def test_history_pages(web, small_model, user):
    from inference.services.jobs import depth_job_create

    for _ in range(23):
        depth_job_create(image=upload(), owner=user)  # queued only: commit callbacks are not run
    first = web.get(reverse("inference:job_list")).content.decode()
    assert first.count('class="badge queued"') == 20 and "page 1 of 2" in first
    second = web.get(reverse("inference:job_list") + "?page=2").content.decode()
    assert second.count('class="badge queued"') == 3


def test_a_queued_job_page_polls_and_the_status_follows(web, small_model, user):
    from inference.services.jobs import depth_job_create

    job = depth_job_create(image=upload(), owner=user)
    page = web.get(reverse("inference:job_detail", args=[job.pk])).content.decode()
    assert f'data-status-url="{reverse("inference:job_status", args=[job.pk])}"' in page
    assert '"active": true' in page and 'id="job-result" hidden' in page
    data = web.get(reverse("inference:job_status", args=[job.pk])).json()
    assert data["status"] == "queued" and data["active"] and data["files"] == {}


def test_a_failed_job_page_shows_the_error(web, small_model, run_jobs, settings):
    settings.DEPTHSITE_OFFLINE = True
    post_photo(web, run_jobs)
    job = DepthJob.objects.get()
    page = web.get(reverse("inference:job_detail", args=[job.pk])).content.decode()
    assert 'class="badge failed"' in page and "not cached on this node" in page
    assert 'id="job-error" hidden' not in page and 'id="job-result" hidden' in page


def test_static_files_of_the_pages_exist():
    root = settings.BASE_DIR / "static" / "depthsite"
    js = (root / "jobs.js").read_text()
    assert "fetch(" in js and "compare-slider" in js and (root / "jobs.css").is_file()
