"""Anonymous uploads are kept by a keyed digest of the visitor's session key, never by the sessionid cookie itself:
whoever reads a job's row (the admin, a copy of the database) cannot become the visitor."""
from __future__ import annotations

import importlib
import re

import pytest
from django.conf import settings
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from inference.models import DepthBatch, DepthJob
from inference.sessions import session_digest, upload_session_key
from depthsite.testing import images
from tests.jobs.conftest import upload

pytestmark = pytest.mark.django_db
LIST = "/api/predictions/"
MIGRATION = ("inference", "0011_session_key_digest")
migration = importlib.import_module(f"inference.migrations.{MIGRATION[1]}")
DIGEST = re.compile(r"[0-9a-f]{40}")


@pytest.fixture
def public(settings):
    settings.DEPTHSITE_PUBLIC_UPLOADS = True


def _cookie(client) -> str:
    return client.cookies[settings.SESSION_COOKIE_NAME].value


def _web_upload(client, django_capture_on_commit_callbacks):
    # Queued, not run: what is stored at upload time is what matters here.
    with django_capture_on_commit_callbacks(execute=False):
        response = client.post(reverse("inference:upload"), {"image": upload(), "model": "MiDaS_small",
                                                              "colormap": "inferno", "outputs": ["png"]})
    assert response.status_code == 302, response.content
    return DepthJob.objects.order_by("-created_at").first()


def _api_upload(client, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False):
        response = client.post(LIST, {"image": upload()}, format="multipart")
    assert response.status_code == 202, response.content
    return DepthJob.objects.get(pk=response.json()["id"])


# --- what is stored ----------------------------------------------------------------------------------------------


def test_a_web_upload_stores_a_digest_not_the_sessionid_cookie(client, small_model, public,
                                                              django_capture_on_commit_callbacks):
    job = _web_upload(client, django_capture_on_commit_callbacks)
    cookie = _cookie(client)
    assert cookie and job.owner is None
    assert job.session_key != cookie and cookie not in job.session_key
    assert DIGEST.fullmatch(job.session_key) and job.session_key == session_digest(cookie)


def test_an_api_upload_stores_a_digest_not_the_sessionid_cookie(small_model, public,
                                                               django_capture_on_commit_callbacks):
    anonymous = APIClient()
    job = _api_upload(anonymous, django_capture_on_commit_callbacks)
    cookie = _cookie(anonymous)
    assert job.owner is None and job.session_key != cookie and cookie not in job.session_key
    assert DIGEST.fullmatch(job.session_key) and job.session_key == session_digest(cookie)


def test_a_batch_stores_the_digest_its_jobs_carry(client, small_model, public, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False):
        response = client.post(reverse("inference:batch_upload"), {
            "images": [upload(images.jpeg(), "a.jpg"), upload(images.jpeg(), "b.jpg")], "model": "MiDaS_small",
            "colormap": "inferno", "outputs": ["png"]})
    assert response.status_code == 302, response.content
    batch = DepthBatch.objects.get()
    cookie = _cookie(client)
    assert batch.session_key == session_digest(cookie) and cookie not in batch.session_key
    assert {job.session_key for job in DepthJob.objects.all()} == {batch.session_key}
    # The batch page lists its uploader's jobs (matched by the digest), for the uploader and a holder of its id.
    page = client.get(response["Location"]).content.decode()
    assert "a.jpg" in page and "b.jpg" in page


def test_the_digest_is_keyed_and_empty_stays_empty(settings):
    assert session_digest("") == ""
    key = "abcdefghijklmnopqrstuvwxyz012345"
    first = session_digest(key)
    assert DIGEST.fullmatch(first) and first == session_digest(key) and first != session_digest(key[::-1])
    settings.SECRET_KEY = "another-secret-key-for-this-test-only"
    assert session_digest(key) != first  # without SECRET_KEY, the table alone cannot be matched to cookies


def test_a_signed_in_user_and_a_request_without_session_have_no_upload_key(rf, django_user_model):
    from django.contrib.auth.models import AnonymousUser

    request = rf.get("/")
    request.user = AnonymousUser()
    assert upload_session_key(request) == ""  # no session attribute at all (a schema request)
    request.user = django_user_model(username="u")
    request.session = object()
    assert upload_session_key(request) == ""


# --- the visitor still owns their uploads; nobody else does ----------------------------------------------------


def test_an_anonymous_visitor_lists_sees_and_deletes_their_own_web_jobs_only(client, small_model, public,
                                                                              django_capture_on_commit_callbacks):
    mine = _web_upload(client, django_capture_on_commit_callbacks)
    stranger = Client()
    theirs = _web_upload(stranger, django_capture_on_commit_callbacks)
    listed = client.get(reverse("inference:job_list")).content.decode()
    assert mine.short_id in listed and theirs.short_id not in listed
    assert client.get(reverse("inference:job_detail", args=[mine.pk])).status_code == 200
    # A stranger holding the id may look, but not delete.
    assert stranger.post(reverse("inference:job_delete", args=[mine.pk])).status_code == 404
    assert client.post(reverse("inference:job_delete", args=[theirs.pk])).status_code == 404
    assert DepthJob.objects.filter(pk__in=[mine.pk, theirs.pk]).count() == 2
    assert client.post(reverse("inference:job_delete", args=[mine.pk])).status_code in (302, 303)
    assert not DepthJob.objects.filter(pk=mine.pk).exists()
    assert DepthJob.objects.filter(pk=theirs.pk).exists()


def test_an_anonymous_api_caller_lists_and_deletes_their_own_predictions_only(small_model, public,
                                                                              django_capture_on_commit_callbacks):
    anonymous, stranger = APIClient(), APIClient()
    mine = _api_upload(anonymous, django_capture_on_commit_callbacks)
    theirs = _api_upload(stranger, django_capture_on_commit_callbacks)
    assert [item["id"] for item in anonymous.get(LIST).json()["results"]] == [str(mine.pk)]
    assert [item["id"] for item in stranger.get(LIST).json()["results"]] == [str(theirs.pk)]
    assert APIClient().get(LIST).json()["count"] == 0
    assert stranger.delete(f"{LIST}{mine.pk}/").status_code == 404
    assert anonymous.delete(f"{LIST}{mine.pk}/").status_code == 204
    assert list(DepthJob.objects.values_list("pk", flat=True)) == [theirs.pk]


def test_the_api_shows_a_reused_result_to_its_session_only(small_model, public, django_capture_on_commit_callbacks):
    # The serializer matches the session as the views do (by the digest): reused_from names the earlier
    # prediction to its own session, and is null for anyone else.
    anonymous = APIClient()
    earlier = _api_upload(anonymous, django_capture_on_commit_callbacks)
    later = _api_upload(anonymous, django_capture_on_commit_callbacks)
    DepthJob.objects.filter(pk=earlier.pk).update(status="succeeded")
    DepthJob.objects.filter(pk=later.pk).update(status="succeeded", reused_from=earlier)
    assert anonymous.get(f"{LIST}{later.pk}/").json()["reused_from"] == str(earlier.pk)
    assert APIClient().get(f"{LIST}{later.pk}/").json()["reused_from"] is None


# --- the admin -------------------------------------------------------------------------------------------------


def test_the_admin_does_not_show_the_visitors_session(client, staff, small_model, public,
                                                      django_capture_on_commit_callbacks):
    visitor = Client()
    with django_capture_on_commit_callbacks(execute=False):
        response = visitor.post(reverse("inference:batch_upload"), {
            "images": [upload(images.jpeg(), "a.jpg")], "model": "MiDaS_small", "colormap": "inferno",
            "outputs": ["png"]})
    assert response.status_code == 302, response.content
    job = _web_upload(visitor, django_capture_on_commit_callbacks)
    batch = DepthBatch.objects.get()
    cookie = _cookie(visitor)
    client.force_login(staff)
    pages = [reverse("admin:inference_depthjob_change", args=[job.pk]),
             reverse("admin:inference_depthjob_changelist"),
             reverse("admin:inference_depthbatch_change", args=[batch.pk]),
             reverse("admin:inference_depthbatch_changelist")]
    for url in pages:
        response = client.get(url)
        assert response.status_code == 200, url
        text = response.content.decode()
        assert cookie not in text and job.session_key not in text, url
    change = client.get(pages[0]).content.decode()
    assert "anonymous browser session" in change.lower() and 'name="session_key"' not in change


# --- the migration ---------------------------------------------------------------------------------------------


def _migration_apps():
    return MigrationExecutor(connection).loader.project_state(MIGRATION).apps


def test_the_migration_rewrites_raw_keys_and_leaves_digests_and_empties(small_model):
    raw, other_raw = "abcdefghijklmnopqrstuvwxyz012345", "0123456789abcdefghijklmnopqrstuv"
    already = session_digest("zyxwvutsrqponmlkjihgfedcba543210")
    fields = {"image": "uploads/x.jpg", "image_sha256": "0" * 64, "image_size": 1, "model_name": "MiDaS_small",
              "colormap": "inferno"}
    batch = DepthBatch.objects.create(session_key=raw, model_name="MiDaS_small", colormap="inferno")
    jobs = {key: DepthJob.objects.create(session_key=key, batch=batch, **fields)
            for key in (raw, other_raw, already, "")}
    migration.session_keys_to_digests(_migration_apps(), connection.schema_editor())
    stored = {key: DepthJob.objects.get(pk=job.pk).session_key for key, job in jobs.items()}
    assert stored == {raw: session_digest(raw), other_raw: session_digest(other_raw), already: already, "": ""}
    batch.refresh_from_db()
    assert batch.session_key == session_digest(raw)
    # Idempotent: a second run changes nothing.
    migration.session_keys_to_digests(_migration_apps(), connection.schema_editor())
    assert {key: DepthJob.objects.get(pk=job.pk).session_key for key, job in jobs.items()} == stored
    assert DepthBatch.objects.get(pk=batch.pk).session_key == session_digest(raw)


def test_the_migration_works_in_batches(small_model, monkeypatch):
    monkeypatch.setattr(migration, "BATCH", 2)
    fields = {"image": "uploads/x.jpg", "image_sha256": "0" * 64, "image_size": 1, "model_name": "MiDaS_small",
              "colormap": "inferno"}
    keys = [f"{n:032d}" for n in range(5)]
    for key in keys:
        DepthJob.objects.create(session_key=key, **fields)
    migration.session_keys_to_digests(_migration_apps(), connection.schema_editor())
    assert sorted(DepthJob.objects.values_list("session_key", flat=True)) == sorted(map(session_digest, keys))


def test_a_visitor_finds_their_jobs_from_before_the_migration(client, small_model, public,
                                                              django_capture_on_commit_callbacks):
    job = _web_upload(client, django_capture_on_commit_callbacks)
    cookie = _cookie(client)
    DepthJob.objects.filter(pk=job.pk).update(session_key=cookie)  # as the release before stored it
    assert job.short_id not in client.get(reverse("inference:job_list")).content.decode()
    migration.session_keys_to_digests(_migration_apps(), connection.schema_editor())
    assert job.short_id in client.get(reverse("inference:job_list")).content.decode()
    assert client.post(reverse("inference:job_delete", args=[job.pk])).status_code in (302, 303)
    assert not DepthJob.objects.filter(pk=job.pk).exists()


def test_the_hourly_expiry_digests_keys_an_older_release_stored_during_a_deploy(client, small_model, public,
                                                                              django_capture_on_commit_callbacks):
    # After migration 0011, web processes of the release before it go on storing the raw key until they stop.
    from inference.tasks import depth_jobs_expire_task

    job = _web_upload(client, django_capture_on_commit_callbacks)
    cookie = _cookie(client)
    DepthJob.objects.filter(pk=job.pk).update(session_key=cookie)  # as an old process stores it
    DepthBatch.objects.create(session_key=cookie, model_name="MiDaS_small", colormap="inferno")
    assert job.short_id not in client.get(reverse("inference:job_list")).content.decode()
    assert depth_jobs_expire_task().endswith("; digested 2 raw session key(s)")
    assert not DepthJob.objects.filter(session_key=cookie).exists()
    assert not DepthBatch.objects.filter(session_key=cookie).exists()
    assert job.short_id in client.get(reverse("inference:job_list")).content.decode()
    assert "digested" not in depth_jobs_expire_task()  # nothing left: the usual summary
