"""The admin of depth jobs: list with status, model, owner, timings and error; filters; re-run; delete with files."""
from __future__ import annotations

from pathlib import Path

import pytest
from django.conf import settings
from django.urls import reverse

from inference.models import DepthJob
from inference.services.jobs import depth_job_create
from tests.jobs.conftest import upload

pytestmark = pytest.mark.django_db
CHANGELIST = "admin:inference_depthjob_changelist"


@pytest.fixture
def admin_client(client, staff):
    client.force_login(staff)
    return client


def finished_job(run_jobs, **kwargs) -> DepthJob:
    with run_jobs():
        job = depth_job_create(image=upload(), **kwargs)
    job.refresh_from_db()
    return job


def test_list_shows_status_model_owner_timings_and_error(admin_client, cached_small, run_jobs, user, settings):
    ok = finished_job(run_jobs, owner=user)
    page = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert ok.short_id in page and "succeeded" in page and "MiDaS_small" in page and "alice" in page
    assert f"{ok.inference_ms:.0f} ms" in page
    failed = DepthJob.objects.filter(pk=ok.pk)
    failed.update(status="failed", error="the worker running this job stopped 3 time(s)", error_code="interrupted")
    page = admin_client.get(reverse(CHANGELIST) + "?status__exact=failed").content.decode()
    assert "stopped 3 time(s)" in page
    assert admin_client.get(reverse(CHANGELIST) + "?status__exact=queued").content.decode().count(ok.short_id) == 0
    for query in ("?owner__isempty=1", "?error_code__exact=interrupted", f"?q={ok.image_sha256[:12]}",
                  "?model_name=MiDaS_small"):
        assert admin_client.get(reverse(CHANGELIST) + query).status_code == 200
    detail = admin_client.get(reverse("admin:inference_depthjob_change", args=[ok.pk])).content.decode()
    assert reverse("inference:job_detail", args=[ok.pk]) in detail and ok.weights_sha256 in detail


def test_rerun_action_runs_failed_jobs_again_and_refuses_active_ones(admin_client, cached_small, run_jobs):
    job = finished_job(run_jobs)
    DepthJob.objects.filter(pk=job.pk).update(status="failed", error="out of memory", error_code="out_of_memory")
    queued = depth_job_create(image=upload())
    with run_jobs():
        response = admin_client.post(reverse(CHANGELIST), {"action": "rerun_jobs",
                                                           "_selected_action": [str(job.pk), str(queued.pk)]},
                                     follow=True)
    text = response.content.decode()
    assert f"Queued again: {job.short_id}" in text  # the admin capitalises messages
    assert f"{queued.short_id.capitalize()}: job {queued.short_id} is already queued" in text
    job.refresh_from_db()
    assert job.status == "succeeded" and job.error == "" and job.attempts == 1


def test_a_view_only_staff_user_can_neither_see_nor_run_the_rerun(client, cached_small, run_jobs):
    from django.contrib.auth import get_user_model
    from django.contrib.auth.models import Permission

    viewer = get_user_model().objects.create_user("viewer", "viewer@example.com", "pw-viewer-123", is_staff=True)
    viewer.user_permissions.set(Permission.objects.filter(codename="view_depthjob"))
    client.force_login(viewer)
    job = finished_job(run_jobs)
    page = client.get(reverse(CHANGELIST))
    assert page.status_code == 200 and "rerun_jobs" not in page.content.decode()
    with run_jobs():
        client.post(reverse(CHANGELIST), {"action": "rerun_jobs", "_selected_action": [str(job.pk)]})
    after = DepthJob.objects.get(pk=job.pk)
    assert (after.attempts, after.finished_at, after.result_files) == (job.attempts, job.finished_at, job.result_files)


def test_admin_cannot_add_jobs_and_delete_removes_files(admin_client, cached_small, run_jobs):
    assert admin_client.get(reverse("admin:inference_depthjob_add")).status_code == 403
    job = finished_job(run_jobs)
    results = Path(settings.MEDIA_ROOT) / "results" / str(job.pk)
    assert results.is_dir()
    with run_jobs():
        admin_client.post(reverse(CHANGELIST), {"action": "delete_selected", "_selected_action": [str(job.pk)],
                                                "post": "yes"})
    assert not DepthJob.objects.exists() and not results.exists()
    assert not (Path(settings.MEDIA_ROOT) / job.image.name).exists()
