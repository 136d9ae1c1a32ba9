"""Result reuse shares computed files, never the other job's identity: no id, file name or times of a stranger's job."""
from __future__ import annotations

import pytest
from django.urls import reverse
from rest_framework.test import APIClient

from inference.models import DepthJob
from tests.jobs.conftest import upload

pytestmark = pytest.mark.django_db
LIST = "/api/predictions/"
SECRET_NAME = "IMG_home_address_1234.jpg"


def submit(client, run_jobs, name: str) -> dict:
    with run_jobs():
        response = client.post(LIST, {"image": upload(name=name), "outputs": ["png"]}, format="multipart")
    assert response.status_code == 202, response.content
    return client.get(response.json()["url"]).json()


def assert_nothing_of(first: DepthJob, texts: list[str]) -> None:
    for text in texts:
        assert str(first.pk) not in text and first.pk.hex not in text
        assert SECRET_NAME not in text and "IMG_home_address" not in text


def test_an_anonymous_stranger_reusing_a_result_learns_nothing_of_the_first_job(cached_small, run_jobs, settings,
                                                                               client, staff):
    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    owner = APIClient()
    first_body = submit(owner, run_jobs, SECRET_NAME)
    first = DepthJob.objects.get(pk=first_body["id"])
    assert first_body["status"] == "succeeded" and first_body["reused_from"] is None

    stranger = APIClient()
    body = submit(stranger, run_jobs, "mine.jpg")
    job = DepthJob.objects.get(pk=body["id"])
    assert job.reused_from_id == first.pk  # the files were shared...
    assert body["status"] == "succeeded" and body["reused_from"] is None  # ...the identity was not
    texts = [stranger.get(body["url"]).content.decode(),
             stranger.get(LIST).content.decode(),
             stranger.get(reverse("inference:job_status", args=[job.pk])).content.decode(),
             stranger.get(reverse("inference:job_detail", args=[job.pk])).content.decode(),
             stranger.get(reverse("inference:job_list")).content.decode()]
    assert_nothing_of(first, texts)
    assert 'id="job-reused" hidden' in texts[3]

    # The first job's own session and staff may follow the link.
    client.force_login(staff)
    assert client.get(reverse("inference:job_status", args=[job.pk])).json()["reused_from"] == str(first.pk)
    staff_api = APIClient()
    staff_api.force_authenticate(staff)
    assert staff_api.get(body["url"]).json()["reused_from"] == str(first.pk)


@pytest.mark.slow
def test_signed_in_users_see_reuse_of_their_own_jobs_only(cached_small, run_jobs, user, other_user):
    alice = APIClient()
    alice.force_authenticate(user)
    first_body = submit(alice, run_jobs, SECRET_NAME)
    again = submit(alice, run_jobs, "again.jpg")
    assert again["reused_from"] == first_body["id"]  # her own earlier job

    bob = APIClient()
    bob.force_authenticate(other_user)
    body = submit(bob, run_jobs, "bob.jpg")
    assert DepthJob.objects.get(pk=body["id"]).reused_from_id is not None
    assert body["reused_from"] is None
    assert_nothing_of(DepthJob.objects.get(pk=first_body["id"]), [bob.get(body["url"]).content.decode()])
