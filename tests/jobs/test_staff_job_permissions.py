"""Other users' jobs need Django's model permissions, not just is_staff: listing everyone's jobs and reading another
user's job, photo or results needs inference.view_depthjob; deleting one also inference.delete_depthjob; running one
again (the admin's re-run) also inference.change_depthjob. A user's own jobs need nothing."""
from __future__ import annotations

import re

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.urls import reverse
from rest_framework.test import APIClient

from depthsite.choices import RunStatus
from inference.models import DepthJob
from inference.services.jobs import depth_job_create
from tests.jobs.conftest import upload

pytestmark = pytest.mark.django_db
HISTORY = "/jobs/"
LIST = "/api/predictions/"


def _staff(username: str, *codenames: str):
    user = get_user_model().objects.create_user(username, f"{username}@example.com", "pw-staff-12345", is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="inference", codename__in=codenames))
    return user


def _job(owner, *, status=RunStatus.SUCCEEDED) -> DepthJob:
    job = depth_job_create(image=upload(), owner=owner, model="MiDaS_small")  # queued: commit callbacks not run
    DepthJob.objects.filter(pk=job.pk).update(status=status)
    return DepthJob.objects.get(pk=job.pk)


def _rows(html: str) -> list[str]:
    return re.findall(r'<tr data-job="([0-9a-f-]+)">', html)


def _api(user) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


@pytest.fixture
def theirs(small_model, other_user) -> DepthJob:
    return _job(other_user)


@pytest.fixture
def bare_staff():
    """Staff (may sign in to the admin) without any permission on jobs."""
    return _staff("bare")


@pytest.fixture
def viewer():
    return _staff("viewer", "view_depthjob")


# --- staff without the view permission: another user's job does not exist for them ----------------


def test_staff_without_the_view_permission_cannot_list_everyone(client, bare_staff, theirs):
    mine = _job(bare_staff)
    client.force_login(bare_staff)
    response = client.get(HISTORY + "?everyone=1")
    assert response.status_code == 403
    assert _rows(response.content.decode()) == [str(mine.pk)]
    assert 'name="everyone"' not in client.get(HISTORY).content.decode()  # no checkbox offered
    listed = _api(bare_staff).get(LIST).json()
    assert [item["id"] for item in listed["results"]] == [str(mine.pk)]


def test_staff_without_the_view_permission_cannot_read_another_users_job(client, bare_staff, theirs):
    client.force_login(bare_staff)
    for name in ("inference:job_detail", "inference:job_input", "inference:job_status"):
        assert client.get(reverse(name, args=[theirs.pk])).status_code == 404, name
    assert _api(bare_staff).get(f"{LIST}{theirs.pk}/").status_code == 404


def test_staff_without_permissions_cannot_delete_another_users_job(client, bare_staff, theirs):
    client.force_login(bare_staff)
    assert client.post(reverse("inference:job_delete", args=[theirs.pk])).status_code == 404
    response = _api(bare_staff).delete(f"{LIST}{theirs.pk}/")
    assert response.status_code == 404 and set(response.json()) == {"message", "extra"}
    assert DepthJob.objects.filter(pk=theirs.pk).exists()


# --- view permission only: read, but neither delete nor run again ---------------------------------


def test_the_view_permission_lists_and_reads_everyones_jobs(client, viewer, theirs):
    client.force_login(viewer)
    response = client.get(HISTORY + "?everyone=1")
    assert response.status_code == 200 and _rows(response.content.decode()) == [str(theirs.pk)]
    assert 'name="everyone"' in client.get(HISTORY).content.decode()
    assert client.get(reverse("inference:job_detail", args=[theirs.pk])).status_code == 200
    assert client.get(reverse("inference:job_input", args=[theirs.pk])).status_code == 200
    assert [item["id"] for item in _api(viewer).get(LIST).json()["results"]] == [str(theirs.pk)]
    assert _api(viewer).get(f"{LIST}{theirs.pk}/").status_code == 200


def test_the_view_permission_alone_cannot_delete_another_users_job(client, viewer, theirs):
    client.force_login(viewer)
    page = client.get(reverse("inference:job_detail", args=[theirs.pk])).content.decode()
    assert "delete-job" not in page and reverse("inference:job_delete", args=[theirs.pk]) not in page
    assert client.post(reverse("inference:job_delete", args=[theirs.pk])).status_code == 403
    response = _api(viewer).delete(f"{LIST}{theirs.pk}/")
    # The job is visible to them, so the refusal says why instead of pretending it is not there.
    assert response.status_code == 403 and set(response.json()) == {"message", "extra"}
    assert "inference.delete_depthjob" in response.json()["message"]
    assert DepthJob.objects.filter(pk=theirs.pk).exists()


def test_the_view_permission_alone_cannot_run_another_users_job_again(client, viewer, theirs):
    client.force_login(viewer)
    page = client.get(reverse("inference:job_detail", args=[theirs.pk])).content.decode()
    assert reverse("inference:job_run_again", args=[theirs.pk]) not in page
    response = client.post(reverse("inference:job_run_again", args=[theirs.pk]), {"model": "DPT_Hybrid"})
    assert response.status_code == 403
    assert DepthJob.objects.count() == 1


# --- with the permission, and superusers ----------------------------------------------------------


def test_the_delete_permission_deletes_another_users_job_on_the_web(client, theirs):
    client.force_login(_staff("deleter", "view_depthjob", "delete_depthjob"))
    page = client.get(reverse("inference:job_detail", args=[theirs.pk])).content.decode()
    assert reverse("inference:job_delete", args=[theirs.pk]) in page
    assert client.post(reverse("inference:job_delete", args=[theirs.pk])).status_code == 302
    assert not DepthJob.objects.filter(pk=theirs.pk).exists()


def test_the_delete_permission_deletes_another_users_job_through_the_api(theirs):
    response = _api(_staff("deleter", "view_depthjob", "delete_depthjob")).delete(f"{LIST}{theirs.pk}/")
    assert response.status_code == 204
    assert not DepthJob.objects.filter(pk=theirs.pk).exists()


def test_the_change_permission_runs_another_users_job_again(client, theirs):
    runner = _staff("runner", "view_depthjob", "change_depthjob")
    client.force_login(runner)
    page = client.get(reverse("inference:job_detail", args=[theirs.pk])).content.decode()
    assert reverse("inference:job_run_again", args=[theirs.pk]) in page
    response = client.post(reverse("inference:job_run_again", args=[theirs.pk]), {"model": "DPT_Hybrid"})
    assert response.status_code == 302
    assert DepthJob.objects.filter(owner=runner, model_name="DPT_Hybrid").count() == 1


def test_superusers_may_do_everything(client, staff, theirs):
    client.force_login(staff)
    assert _rows(client.get(HISTORY + "?everyone=1").content.decode()) == [str(theirs.pk)]
    assert client.post(reverse("inference:job_run_again", args=[theirs.pk]), {"model": "DPT_Hybrid"}).status_code == 302
    assert client.post(reverse("inference:job_delete", args=[theirs.pk])).status_code == 302
    assert not DepthJob.objects.filter(pk=theirs.pk).exists()


def test_own_jobs_need_no_permission(client, bare_staff, small_model):
    mine = _job(bare_staff)
    client.force_login(bare_staff)
    assert _rows(client.get(HISTORY).content.decode()) == [str(mine.pk)]
    assert client.post(reverse("inference:job_run_again", args=[mine.pk]), {"model": "DPT_Hybrid"}).status_code == 302
    assert client.post(reverse("inference:job_delete", args=[mine.pk])).status_code == 302
    assert _api(bare_staff).delete(f"{LIST}{DepthJob.objects.get().pk}/").status_code == 204
    assert not DepthJob.objects.exists()


def test_the_table_matches_the_admins_rerun_action():
    from inference import admin as inference_admin
    from models_registry.api.permissions import OPERATOR_PERMISSIONS

    assert list(inference_admin.rerun_jobs.allowed_permissions) == ["change"]
    assert "inference.change_depthjob" in OPERATOR_PERMISSIONS["jobs_run_again_others"]
    assert "inference.delete_depthjob" in OPERATOR_PERMISSIONS["jobs_delete_others"]
    assert OPERATOR_PERMISSIONS["jobs_view_others"] == ("inference.view_depthjob",)


# --- the model notes of the upload forms: detail for who may fix it --------------------------------

MIRROR = "ftp://alice:s3cret@mirror.internal.example/weights"


def _form_pages(client) -> list[str]:
    return [client.get(url).content.decode() for url in (reverse("inference:upload"),
                                                         reverse("inference:batch_upload"))]


def test_staff_without_the_download_permission_get_the_public_model_notes(client, bare_staff, small_model, settings):
    """is_staff alone is not an operator: the raw download error (the mirror setting, its password) and the
    operators' command are for who may download or import models."""
    client.force_login(_staff("registry_viewer"))  # staff, no registry permission
    settings.DEPTHSITE_OFFLINE = False
    settings.DEPTHSITE_MODEL_MIRROR = MIRROR
    for page in _form_pages(client):
        assert "cannot be downloaded here (an administrator can see why)" in page
        assert "mirror.internal.example" not in page and "DEPTHSITE_MODEL_MIRROR" not in page
        assert "s3cret" not in page
    settings.DEPTHSITE_OFFLINE = True
    settings.DEPTHSITE_MODEL_MIRROR = ""
    for page in _form_pages(client):
        assert "an administrator must import it first" in page and "manage.py" not in page


def test_staff_who_may_download_models_get_the_detailed_notes(client, small_model, settings):
    from tests.support.operators import grant_operator_permissions

    operator = grant_operator_permissions(_staff("operator"))
    client.force_login(operator)
    settings.DEPTHSITE_OFFLINE = False
    settings.DEPTHSITE_MODEL_MIRROR = MIRROR
    for page in _form_pages(client):
        assert "DEPTHSITE_MODEL_MIRROR" in page
    settings.DEPTHSITE_OFFLINE = True
    settings.DEPTHSITE_MODEL_MIRROR = ""
    for page in _form_pages(client):
        assert "manage.py models import PATH --model DPT_Large" in page


# --- other users' batches: inference.view_depthbatch (with view_depthjob, whose results they hold) -------------


def _batch(owner):
    from inference.services.batch_images import depth_batch_images_collect
    from inference.services.batches import depth_batch_create

    # Queued, not run (commit callbacks do not run here): the pages read the batch's rows.
    with depth_batch_images_collect(images=[upload(name="a.jpg"), upload(name="b.jpg")]) as photos:
        return depth_batch_create(images=photos, owner=owner, model="MiDaS_small")


def _batch_urls(batch) -> dict[str, str]:
    return {name: reverse(f"inference:{name}", args=[batch.pk])
            for name in ("batch_detail", "batch_status", "batch_archive")}


def test_staff_without_the_batch_view_permission_cannot_see_another_users_batch(client, small_model, other_user):
    batch = _batch(other_user)
    for user in (_staff("bare_batch"), _staff("jobs_only", "view_depthjob"), _staff("batch_only", "view_depthbatch")):
        client.force_login(user)
        for name, url in _batch_urls(batch).items():
            assert client.get(url).status_code == 404, (user.username, name)


def test_the_batch_view_permission_shows_another_users_batch(client, small_model, other_user):
    batch = _batch(other_user)
    client.force_login(_staff("batch_viewer", "view_depthbatch", "view_depthjob"))
    for name, url in _batch_urls(batch).items():
        response = client.get(url)
        assert response.status_code == 200, name
    assert "a.jpg" in client.get(_batch_urls(batch)["batch_detail"]).content.decode()
    assert len(client.get(_batch_urls(batch)["batch_status"]).json()["jobs"]) == 2


def test_the_refusal_says_what_was_refused(rf, viewer, theirs):
    from django.core.exceptions import PermissionDenied

    from inference import views

    request = rf.post("/")
    request.user = viewer
    for what in ("run it again", "delete it"):  # as job_run_again and job_delete say it
        with pytest.raises(PermissionDenied) as caught:
            views._refused(request, theirs, what)
        assert str(caught.value).startswith(f"you may see this job but not {what}: "), str(caught.value)
