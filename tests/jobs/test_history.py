"""The history page (thumbnails, filters, everyone's jobs for staff, pages) and "run again with another model"."""
from __future__ import annotations

import re

import pytest
from django.test import Client
from django.urls import reverse

from depthsite.choices import RunStatus
from inference.models import DepthJob
from inference.services.jobs import depth_job_create
from tests.jobs.conftest import upload
from tests.jobs.test_browser import off_the_loop
from tests.jobs.test_views import post_photo

pytestmark = pytest.mark.django_db
HISTORY = "/jobs/"


@pytest.fixture
def web(client, user):
    client.force_login(user)
    return client


def _job(owner, *, model="MiDaS_small", status=RunStatus.QUEUED) -> DepthJob:
    job = depth_job_create(image=upload(), owner=owner, model=model)  # queued: commit callbacks are not run
    DepthJob.objects.filter(pk=job.pk).update(status=status)
    return job


def _rows(html: str) -> list[str]:
    return re.findall(r'<tr data-job="([0-9a-f-]+)">', html)


def test_filters_by_status_and_model(web, small_model, user):
    failed = _job(user, status=RunStatus.FAILED)
    done = _job(user, status=RunStatus.SUCCEEDED)
    other_model = _job(user, model="DPT_Hybrid", status=RunStatus.SUCCEEDED)
    assert set(_rows(web.get(HISTORY).content.decode())) == {str(failed.pk), str(done.pk), str(other_model.pk)}
    assert _rows(web.get(HISTORY + "?status=failed").content.decode()) == [str(failed.pk)]
    assert set(_rows(web.get(HISTORY + "?status=succeeded").content.decode())) == {str(done.pk), str(other_model.pk)}
    assert _rows(web.get(HISTORY + "?status=succeeded&model=DPT_Hybrid").content.decode()) == [str(other_model.pk)]
    html = web.get(HISTORY + "?model=DPT_Hybrid").content.decode()
    assert '<option value="DPT_Hybrid" selected>' in html


@pytest.mark.parametrize("query, message", [
    ("status=exploded", "unknown status &#x27;exploded&#x27;; one of: queued, running, succeeded, failed"),
    ("model=NoSuchNet", "unknown model &#x27;NoSuchNet&#x27;"),
    ("everyone=yes", "everyone is 1"),
])
def test_bad_filters_are_a_400_that_says_why(web, small_model, user, query, message):
    _job(user)
    response = web.get(HISTORY + "?" + query)
    assert response.status_code == 400
    assert message in response.content.decode()


def test_staff_see_everyone_with_the_owner_and_others_cannot(client, small_model, user, other_user, staff):
    mine, theirs = _job(user), _job(other_user)
    client.force_login(user)
    response = client.get(HISTORY + "?everyone=1")
    assert response.status_code == 403 and "only staff can list everyone" in response.content.decode()
    assert _rows(response.content.decode()) == [str(mine.pk)]
    client.force_login(staff)
    html = client.get(HISTORY + "?everyone=1").content.decode()
    assert set(_rows(html)) == {str(mine.pk), str(theirs.pk)}
    assert '<td class="owner">alice</td>' in html and '<td class="owner">bob</td>' in html
    assert _rows(client.get(HISTORY).content.decode()) == []  # their own list stays their own


def test_a_removed_model_is_a_filter_only_for_those_whose_jobs_carry_it(client, small_model, user, other_user):
    theirs = _job(other_user, status=RunStatus.SUCCEEDED)
    DepthJob.objects.filter(pk=theirs.pk).update(model=None, model_name="GoneNet")  # a custom entry removed since
    client.force_login(user)
    response = client.get(HISTORY + "?model=GoneNet")
    assert response.status_code == 400 and "GoneNet" not in response.content.decode().split("unknown model")[0]
    client.force_login(other_user)
    html = client.get(HISTORY + "?model=GoneNet").content.decode()
    assert _rows(html) == [str(theirs.pk)] and '<option value="GoneNet" selected>' in html


def test_pages_keep_the_filters(web, small_model, user):
    for _ in range(21):
        _job(user, status=RunStatus.FAILED)
    _job(user)
    html = web.get(HISTORY + "?status=failed").content.decode()
    assert len(_rows(html)) == 20 and "page 1 of 2" in html
    assert 'href="?status=failed&amp;page=2"' in html
    assert len(_rows(web.get(HISTORY + "?status=failed&page=2").content.decode())) == 1


def test_a_finished_job_shows_its_photo_and_depth_thumbnails(web, cached_small, run_jobs):
    post_photo(web, run_jobs)
    job = DepthJob.objects.get()
    html = web.get(HISTORY).content.decode()
    thumbs = re.findall(r'<td class="thumb"><img src="([^"]+)"', html)
    assert thumbs == [reverse("inference:job_input", args=[job.pk]),
                      reverse("inference:job_file", args=[job.pk, "png"])]
    for url in thumbs:
        response = web.get(url)
        assert response.status_code == 200 and response["Content-Type"].startswith("image/")


# --- run again -----------------------------------------------------------------------------------


def run_again(client, job, model="DPT_Hybrid"):
    return client.post(reverse("inference:job_run_again", args=[job.pk]), {"model": model})


@pytest.mark.slow
def test_run_again_makes_a_new_job_from_the_same_photo(web, cached_small, run_jobs, user):
    post_photo(web, run_jobs, colormap="viridis", outputs=["png", "npy"])
    first = DepthJob.objects.get()
    page = web.get(reverse("inference:job_detail", args=[first.pk])).content.decode()
    assert 'action="/jobs/%s/run-again"' % first.pk in page and '<option value="DPT_Hybrid">' in page
    assert '<option value="MiDaS_small">' not in page.split('id="run-again"')[1]  # not the model it ran with
    response = run_again(web, first)
    second = DepthJob.objects.exclude(pk=first.pk).get()
    assert response.status_code == 302 and response["Location"] == reverse("inference:job_detail", args=[second.pk])
    assert (second.model_name, second.owner, second.image_sha256, second.outputs, second.colormap,
            second.fov_degrees) == ("DPT_Hybrid", user, first.image_sha256, first.outputs, "viridis",
                                    first.fov_degrees)
    first.refresh_from_db()
    assert first.status == RunStatus.SUCCEEDED and first.model_name == "MiDaS_small"


def test_run_again_is_for_the_owner_and_staff_only(client, small_model, user, other_user, staff):
    job = _job(user, status=RunStatus.SUCCEEDED)
    client.force_login(other_user)
    assert run_again(client, job).status_code == 404
    assert "run-again" not in client.get(reverse("inference:job_detail", args=[job.pk])).content.decode()
    client.force_login(staff)
    assert run_again(client, job).status_code == 302
    assert DepthJob.objects.filter(owner=staff, model_name="DPT_Hybrid").count() == 1


def test_run_again_refuses_active_jobs_and_unknown_models_with_a_message(web, small_model, user):
    queued = _job(user)
    response = run_again(web, queued)
    assert response.status_code == 409 and "still queued" in response.content.decode()
    done = _job(user, status=RunStatus.SUCCEEDED)
    response = run_again(web, done, model="NoSuchNet")
    assert response.status_code == 400 and "unknown model" in response.content.decode()
    assert DepthJob.objects.count() == 2


def test_run_again_needs_the_csrf_token(small_model, user):
    job = _job(user, status=RunStatus.SUCCEEDED)
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    assert run_again(client, job).status_code == 403
    assert DepthJob.objects.count() == 1


def test_anonymous_run_again_keeps_to_the_session_quota_and_throttle(client, small_model, settings, monkeypatch,
                                                                     run_jobs):
    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    post_photo(client, run_jobs)
    job = DepthJob.objects.get()
    DepthJob.objects.filter(pk=job.pk).update(status=RunStatus.FAILED)
    assert run_again(Client(), job).status_code == 404  # a stranger holding the link may look, not spend
    settings.DEPTHSITE_ANON_MAX_JOBS = 1
    response = run_again(client, job)
    assert response.status_code == 429 and "anonymous quota reached" in response.content.decode()
    settings.DEPTHSITE_ANON_MAX_JOBS = 10
    monkeypatch.setitem(settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES", {"uploads": "2/hour", "writes": "9/hour"})
    from rest_framework.settings import api_settings

    api_settings.reload()
    try:
        # The upload and the attempt refused for the quota were both counted: the uploads rate is per client.
        response = run_again(client, job)
    finally:
        monkeypatch.undo()
        api_settings.reload()
    assert response.status_code == 429 and "too many uploads" in response.content.decode()
    assert DepthJob.objects.count() == 1


@pytest.mark.browser
@pytest.mark.slow
def test_history_in_the_browser_shows_thumbnails_and_runs_again(transactional_db, live_server, cached_small,
                                                                 django_user_model, request):
    user = django_user_model.objects.create_user("dora", password="pw-dora-12345")
    with_client = Client()
    with_client.force_login(user)
    job = depth_job_create(image=upload(), owner=user)
    from inference.services.job_runs import depth_job_run

    depth_job_run(job=job)
    session = with_client.cookies["sessionid"].value
    browser = request.getfixturevalue("browser")
    context = browser.new_context()
    context.add_cookies([{"name": "sessionid", "value": session, "url": live_server.url}])
    page = context.new_page()
    page.goto(live_server.url + HISTORY + "?status=succeeded")
    page.wait_for_function("""() => {
      const imgs = [...document.querySelectorAll('td.thumb img')];
      return imgs.length === 2 && imgs.every(img => img.complete && img.naturalWidth > 0);
    }""", timeout=30_000)
    page.click(f'a[href="/jobs/{job.pk}/"]')
    page.select_option('#run-again select[name=model]', "DPT_Hybrid")
    page.click('#run-again button[type=submit]')
    page.wait_for_function(f"() => location.pathname.startsWith('/jobs/') && !location.pathname.includes('{job.pk}')",
                           timeout=30_000)
    new_id = page.url.rstrip("/").rsplit("/", 1)[1]
    context.close()
    again = off_the_loop(lambda: DepthJob.objects.get(pk=new_id))
    assert again.model_name == "DPT_Hybrid" and again.image_sha256 == job.image_sha256
