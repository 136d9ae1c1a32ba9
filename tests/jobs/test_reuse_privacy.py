"""Result reuse stays within one client: a stranger sending the same pixels gets a job computed for them, which
tells them nothing of anybody else's job (no id, no file name, no missing timings); the same client's repeat
is still reused."""
from __future__ import annotations

import pytest
from django.urls import reverse
from PIL import Image
from rest_framework.test import APIClient

from depthsite.testing import images
from inference.models import DepthJob
from tests.jobs.conftest import upload

pytestmark = pytest.mark.django_db
LIST = "/api/predictions/"
SECRET_NAME = "IMG_home_address_1234.jpg"


def submit(client, run_jobs, name: str, data: bytes | None = None, content_type: str = "image/jpeg") -> dict:
    with run_jobs():
        response = client.post(LIST, {"image": upload(data, name=name, content_type=content_type),
                                      "outputs": ["png"]}, format="multipart")
    assert response.status_code == 202, response.content
    return client.get(response.json()["url"]).json()


def assert_nothing_of(first: DepthJob, texts: list[str]) -> None:
    for text in texts:
        assert str(first.pk) not in text and first.pk.hex not in text
        assert SECRET_NAME not in text and "IMG_home_address" not in text


def shape(body: dict, prefix: str = "") -> dict[str, str]:
    """Each field of a response and the kind of its value (null, number, text...): what a reader could tell apart."""
    kinds = {}
    for key, value in body.items():
        if isinstance(value, dict):
            kinds.update(shape(value, f"{prefix}{key}."))
        else:
            kinds[prefix + key] = "number" if isinstance(value, (int, float)) else type(value).__name__
    return kinds


def test_a_stranger_sending_the_same_photo_gets_a_result_of_their_own(cached_small, run_jobs, settings, client,
                                                                     staff):
    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    settings.DEPTHSITE_REUSE_RESULTS = True
    owner = APIClient()
    first_body = submit(owner, run_jobs, SECRET_NAME)
    first = DepthJob.objects.get(pk=first_body["id"])
    assert first_body["status"] == "succeeded" and first_body["reused_from"] is None

    stranger = APIClient()
    body = submit(stranger, run_jobs, "mine.jpg")
    job = DepthJob.objects.get(pk=body["id"])
    assert job.pixels_sha256 == first.pixels_sha256
    assert job.reused_from_id is None and body["status"] == "succeeded"  # the network ran for the stranger
    assert shape(body) == shape(first_body)  # nothing in it differs in kind from a first job: timings included
    assert body["load_ms"] is not None and body["inference_ms"] is not None
    texts = [stranger.get(body["url"]).content.decode(),
             stranger.get(LIST).content.decode(),
             stranger.get(reverse("inference:job_status", args=[job.pk])).content.decode(),
             stranger.get(reverse("inference:job_detail", args=[job.pk])).content.decode(),
             stranger.get(reverse("inference:job_list")).content.decode()]
    assert_nothing_of(first, texts)
    assert 'id="job-reused" hidden' in texts[3]

    # The first client's own repeat is reused, and it may follow the link; so may staff.
    again_body = submit(owner, run_jobs, "again.jpg")
    again = DepthJob.objects.get(pk=again_body["id"])
    assert again.reused_from_id == first.pk and again_body["reused_from"] == str(first.pk)
    client.force_login(staff)
    assert client.get(reverse("inference:job_status", args=[again.pk])).json()["reused_from"] == str(first.pk)


def test_one_client_sending_one_picture_as_png_and_tiff_gets_one_result(cached_small, run_jobs, settings):
    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    settings.DEPTHSITE_REUSE_RESULTS = True
    picture = Image.fromarray(images.photo_array(80, 60))
    visitor = APIClient()
    first = submit(visitor, run_jobs, "photo.png", images.encode(picture, "PNG"), "image/png")
    second = submit(visitor, run_jobs, "photo.tiff", images.encode(picture, "TIFF"), "image/tiff")
    assert second["status"] == "succeeded" and second["reused_from"] == first["id"]
    stranger = submit(APIClient(), run_jobs, "photo.tiff", images.encode(picture, "TIFF"), "image/tiff")
    assert stranger["reused_from"] is None and DepthJob.objects.get(pk=stranger["id"]).reused_from_id is None


@pytest.mark.slow
def test_signed_in_users_reuse_their_own_jobs_only(cached_small, run_jobs, settings, user, other_user):
    settings.DEPTHSITE_REUSE_RESULTS = True
    alice = APIClient()
    alice.force_authenticate(user)
    first_body = submit(alice, run_jobs, SECRET_NAME)
    again = submit(alice, run_jobs, "again.jpg")
    assert again["reused_from"] == first_body["id"]  # her own earlier job

    bob = APIClient()
    bob.force_authenticate(other_user)
    body = submit(bob, run_jobs, "bob.jpg")
    assert DepthJob.objects.get(pk=body["id"]).reused_from_id is None
    assert body["reused_from"] is None and body["inference_ms"] is not None
    assert_nothing_of(DepthJob.objects.get(pk=first_body["id"]), [bob.get(body["url"]).content.decode()])
