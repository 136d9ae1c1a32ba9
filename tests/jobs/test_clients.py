"""Clients that lie: spoofed X-Forwarded-For, anonymous quotas and expiry, and staging folders of killed workers."""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.test import RequestFactory
from django.urls import reverse
from django.utils import timezone
from django_q.models import Schedule
from rest_framework.test import APIClient

from inference.api.permissions import UploadThrottle
from depthsite.choices import RunStatus
from inference.models import DepthJob
from inference import worker as worker_module
from inference.media import RESULTS_DIR
from inference.services.job_recovery import depth_jobs_expire, results_staging_sweep
from inference.services.job_results import results_folder
from inference.services.job_runs import depth_job_run
from inference.services.jobs import depth_job_create, results_bytes_bound
from inference.sessions import session_digest
from inference.tasks import depth_jobs_expire_task, depth_jobs_recover_task
from models_registry.api.throttling import SettingsScopedRateThrottle, client_address
from depthsite.testing import images
from tests.support.migrated import migrated_schedule
from tests.jobs.conftest import upload

pytestmark = pytest.mark.django_db
LIST = "/api/predictions/"


def request_from(remote: str, forwarded: str | None = None):
    extra = {"REMOTE_ADDR": remote}
    if forwarded is not None:
        extra["HTTP_X_FORWARDED_FOR"] = forwarded
    return RequestFactory().post("/", **extra)


# --- the client address --------------------------------------------------------------------------


@pytest.mark.parametrize("proxies, remote, forwarded, expected", [
    (0, "203.0.113.7", "1.2.3.4", "203.0.113.7"),  # no proxy trusted: the header is ignored
    (0, "203.0.113.7", None, "203.0.113.7"),
    (1, "10.0.0.2", "1.2.3.4, 198.51.100.9", "198.51.100.9"),  # one proxy: what it appended
    (2, "10.0.0.2", "1.2.3.4, 198.51.100.9, 10.0.0.1", "198.51.100.9"),
    (2, "10.0.0.2", "198.51.100.9", "198.51.100.9"),  # fewer hops than proxies: the leftmost
    (1, "10.0.0.2", "not-an-address", "10.0.0.2"),  # garbage never becomes an identity
    (1, "10.0.0.2", "", "10.0.0.2"),
    (0, "2001:db8:1:2:aaaa::1", None, "2001:db8:1:2::/64"),  # one IPv6 customer line is one address
    (0, "::ffff:192.0.2.1", None, "192.0.2.1"),
])
def test_client_address(settings, proxies, remote, forwarded, expected):
    settings.DEPTHSITE_TRUSTED_PROXIES = proxies
    assert client_address(request_from(remote, forwarded)) == expected


def test_ipv6_addresses_of_one_line_share_an_identity(settings):
    one = client_address(request_from("2001:db8:1:2::1"))
    assert one == client_address(request_from("2001:db8:1:2:ffff:ffff:ffff:ffff"))
    assert one != client_address(request_from("2001:db8:1:3::1"))


@pytest.mark.parametrize("throttle", [UploadThrottle, SettingsScopedRateThrottle])
def test_every_throttle_counts_by_the_client_address(throttle, settings):
    settings.DEPTHSITE_TRUSTED_PROXIES = 0
    assert throttle().get_ident(request_from("203.0.113.7", "1.1.1.1")) == "203.0.113.7"
    settings.DEPTHSITE_TRUSTED_PROXIES = 1
    assert throttle().get_ident(request_from("10.0.0.2", "1.1.1.1")) == "1.1.1.1"


def _rates(settings, uploads: str):
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK,
                               "DEFAULT_THROTTLE_RATES": {"uploads": uploads, "writes": "1000/hour"}}


def test_spoofed_forwarded_headers_do_not_escape_the_upload_throttle(small_model, settings):
    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    _rates(settings, "3/hour")
    codes = []
    for n in range(6):
        # a fresh client (no session cookie) and a different forged header every time, from one address
        response = APIClient().post(LIST, {"image": upload()}, format="multipart",
                                    REMOTE_ADDR="203.0.113.7", HTTP_X_FORWARDED_FOR=f"10.9.{n}.{n}")
        codes.append(response.status_code)
    assert codes == [202, 202, 202, 429, 429, 429]
    # Another address has its own allowance.
    other = APIClient().post(LIST, {"image": upload()}, format="multipart", REMOTE_ADDR="203.0.113.8")
    assert other.status_code == 202


def test_behind_a_trusted_proxy_clients_are_told_apart(small_model, settings):
    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    settings.DEPTHSITE_TRUSTED_PROXIES = 1
    _rates(settings, "1/hour")
    first = APIClient().post(LIST, {"image": upload()}, format="multipart", REMOTE_ADDR="10.0.0.1",
                             HTTP_X_FORWARDED_FOR="198.51.100.1")
    second = APIClient().post(LIST, {"image": upload()}, format="multipart", REMOTE_ADDR="10.0.0.1",
                              HTTP_X_FORWARDED_FOR="forged, 198.51.100.2")
    again = APIClient().post(LIST, {"image": upload()}, format="multipart", REMOTE_ADDR="10.0.0.1",
                             HTTP_X_FORWARDED_FOR="forged-again, 198.51.100.1")
    assert (first.status_code, second.status_code, again.status_code) == (202, 202, 429)
    assert DepthJob.objects.get(pk=first.json()["id"]).client_address == "198.51.100.1"


# --- anonymous quotas ----------------------------------------------------------------------------


def test_the_anonymous_job_quota_holds_per_address_and_per_session(small_model, settings):
    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    settings.DEPTHSITE_ANON_MAX_JOBS = 2
    codes = [APIClient().post(LIST, {"image": upload()}, format="multipart", REMOTE_ADDR="203.0.113.7").status_code
             for _ in range(3)]
    assert codes == [202, 202, 429]
    refused = APIClient().post(LIST, {"image": upload()}, format="multipart", REMOTE_ADDR="203.0.113.7")
    body = refused.json()
    assert refused.status_code == 429 and body["extra"]["kind"] == "quota_jobs"
    assert "anonymous quota" in body["message"] and "DEPTHSITE_ANON_MAX_JOBS" in body["message"]
    # One session moving between addresses is still one session.
    session = APIClient()
    for address in ("198.51.100.1", "198.51.100.2"):
        assert session.post(LIST, {"image": upload()}, format="multipart", REMOTE_ADDR=address).status_code == 202
    assert session.post(LIST, {"image": upload()}, format="multipart",
                        REMOTE_ADDR="198.51.100.3").status_code == 429
    assert DepthJob.objects.count() == 4


def test_the_anonymous_byte_quota_counts_uploads_and_results(small_model, settings, user):
    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    size = len(images.jpeg())
    # A queued job counts at the most its outputs can take; a finished one at what it stored.
    pending = results_bytes_bound(outputs=["png"], width=96, height=72, image_format="JPEG")
    settings.DEPTHSITE_ANON_MAX_BYTES = 3 * size + pending
    first = depth_job_create(image=upload(), session_key="s1", client_address="203.0.113.7")
    DepthJob.objects.filter(pk=first.pk).update(status=RunStatus.SUCCEEDED, results_bytes=size)
    depth_job_create(image=upload(), session_key="s2", client_address="203.0.113.7")
    with pytest.raises(Exception) as caught:
        depth_job_create(image=upload(), session_key="s3", client_address="203.0.113.7")
    assert caught.value.status == 429 and caught.value.extra["kind"] == "quota_bytes"
    # Signed-in users have no anonymous quota.
    depth_job_create(image=upload(), owner=user, client_address="203.0.113.7")


def test_the_web_form_shows_the_quota_as_a_form_error(client, small_model, settings):
    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    settings.DEPTHSITE_ANON_MAX_JOBS = 1
    fields = {"model": "MiDaS_small", "colormap": "inferno", "outputs": ["png"]}
    assert client.post(reverse("inference:upload"), {"image": upload(), **fields}).status_code == 302
    response = client.post(reverse("inference:upload"), {"image": upload(), **fields})
    assert response.status_code == 429 and "anonymous quota reached" in response.content.decode()
    assert DepthJob.objects.count() == 1


# --- expiry --------------------------------------------------------------------------------------


def test_anonymous_jobs_expire_with_their_files(small_model, settings, user, run_jobs):
    settings.DEPTHSITE_ANON_RETENTION = 7 * 86400
    key = session_digest("s1")  # as upload_session_key stores it
    old = depth_job_create(image=upload(), session_key=key)
    recent = depth_job_create(image=upload(), session_key=key)
    owned = depth_job_create(image=upload(), owner=user)
    week_ago = timezone.now() - timedelta(days=7, minutes=1)
    DepthJob.objects.filter(pk__in=[old.pk, owned.pk]).update(created_at=week_ago)
    folder = Path(settings.MEDIA_ROOT) / results_folder(job_id=old.pk)
    folder.mkdir(parents=True)
    (folder / "depth.png").write_bytes(b"x" * 100)
    upload_file = Path(settings.MEDIA_ROOT) / old.image.name
    assert upload_file.is_file()
    with run_jobs():
        outcome = depth_jobs_expire()
    assert outcome["jobs"] == 1 and outcome["bytes"] >= 100 + old.image_size
    assert set(DepthJob.objects.values_list("pk", flat=True)) == {recent.pk, owned.pk}
    assert not upload_file.exists() and not folder.exists()
    with run_jobs():
        assert depth_jobs_expire_task() == "deleted 0 anonymous job(s), 0 bytes, 0 empty batch(es)"


def test_the_expiry_schedule_exists():
    schedule = migrated_schedule("0005_anonymous_jobs_expire_schedule")
    assert schedule.name == "depth-jobs-expire-anonymous"
    assert schedule.func == "inference.tasks.depth_jobs_expire_task" and schedule.repeats == -1
    assert schedule.schedule_type == Schedule.MINUTES and schedule.minutes == 60
    module, name = schedule.func.rsplit(".", 1)
    assert callable(getattr(__import__(module, fromlist=[name]), name))


# --- staging folders of killed workers -----------------------------------------------------------


def _staging(job_id, age_seconds: float) -> Path:
    root = Path(settings.MEDIA_ROOT) / RESULTS_DIR
    folder = root / f".tmp-{job_id}-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    (folder / "depth.png").write_bytes(b"half")
    then = time.time() - age_seconds
    os.utime(folder, (then, then))
    return folder


def test_the_recovery_sweeps_staging_folders_of_killed_workers(small_model, settings):
    old = 3 * 3600
    gone_job = _staging(uuid.uuid4(), old)  # its job was deleted
    failed = depth_job_create(image=upload(), session_key="s")
    DepthJob.objects.filter(pk=failed.pk).update(status=RunStatus.FAILED)
    failed_job = _staging(failed.pk, old)
    fresh = _staging(uuid.uuid4(), 10)  # a write may still be going on
    odd = _staging("not-a-uuid", old)

    live = depth_job_create(image=upload(), session_key="s")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        worker = f"{settings.DEPTHSITE_NODE}:{sleeper.pid}:{worker_module._process_start(sleeper.pid)}"
        DepthJob.objects.filter(pk=live.pk).update(status=RunStatus.RUNNING, worker=worker, attempts=1,
                                                   started_at=timezone.now())
        running = _staging(live.pk, old)
        finished = Path(settings.MEDIA_ROOT) / RESULTS_DIR / str(failed.pk)
        finished.mkdir()  # a final results folder is never a staging one
        os.utime(finished, (time.time() - old, time.time() - old))

        message = depth_jobs_recover_task()
        assert message.endswith("swept 3 staging folder(s)"), message
        assert not gone_job.exists() and not failed_job.exists() and not odd.exists()
        assert fresh.exists() and running.exists() and finished.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # Once its worker is gone, the live job's folder goes too.
    assert results_staging_sweep() == [running.name]
    assert not running.exists() and fresh.exists()


# --- what a job's error tells whoever holds its id -----------------------------------------------


def test_a_failed_download_does_not_put_server_paths_in_the_job_error(small_model, run_jobs, settings, tmp_path):
    mirror = tmp_path / "secret-mirror-folder"
    mirror.mkdir()
    settings.DEPTHSITE_MODEL_MIRROR = mirror.as_uri()
    with run_jobs():
        job = depth_job_create(image=upload(), session_key="s")
    job.refresh_from_db()
    assert job.status == RunStatus.FAILED and job.error_code == "download_failed"
    assert "could not be downloaded" in job.error
    assert "secret-mirror-folder" not in job.error and str(tmp_path) not in job.error


# --- the web form reads no body it will refuse ---------------------------------------------------


def _form_post(client, remote: str = "203.0.113.7"):
    from django.test.client import encode_multipart

    from tests.api.test_import_authorises_first import CountingStream

    boundary = "form-boundary"
    body = encode_multipart(boundary, {"image": upload(images.jpeg(640, 480)), "model": "MiDaS_small",
                                       "colormap": "inferno", "outputs": ["png"]})
    stream = CountingStream(body)
    response = client.generic("POST", reverse("inference:upload"), body,
                              content_type=f"multipart/form-data; boundary={boundary}",
                              **{"wsgi.input": stream, "REMOTE_ADDR": remote})
    return response, stream


def test_the_web_form_reads_no_byte_of_a_body_it_refuses(client, small_model, settings):
    settings.DEPTHSITE_PUBLIC_UPLOADS = False
    refused, stream = _form_post(client)
    assert refused.status_code == 302 and "/accounts/login/" in refused["Location"]
    assert stream.bytes_read == 0

    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    _rates(settings, "1/hour")
    accepted, stream = _form_post(client)
    assert accepted.status_code == 302 and stream.bytes_read == len(stream.getvalue())
    throttled, stream = _form_post(client)
    assert throttled.status_code == 429 and "too many uploads" in throttled.content.decode()
    assert stream.bytes_read == 0
    assert DepthJob.objects.count() == 1


def test_the_public_upload_page_does_not_name_the_mirror(client, small_model, settings, staff):
    settings.DEPTHSITE_PUBLIC_UPLOADS = True
    settings.DEPTHSITE_OFFLINE = False
    for mirror in ("https://user:hunter2@mirror.internal.example/weights", "ftp://hunter2@mirror.internal.example/"):
        settings.DEPTHSITE_MODEL_MIRROR = mirror
        page = client.get(reverse("inference:upload")).content.decode()
        assert 'value="MiDaS_small"' in page
        assert "mirror.internal.example" not in page and "hunter2" not in page, mirror
    client.force_login(staff)
    assert "mirror.internal.example" in client.get(reverse("inference:upload")).content.decode()


def test_a_missing_upload_does_not_put_the_media_path_in_the_job_error(small_model, run_jobs, settings):
    job = depth_job_create(image=upload(), session_key="s")
    (Path(settings.MEDIA_ROOT) / job.image.name).unlink()
    depth_job_run(job=job)
    job.refresh_from_db()
    assert job.status == RunStatus.FAILED and "the file is missing" in job.error
    assert str(settings.MEDIA_ROOT) not in job.error and "uploads/" not in job.error
