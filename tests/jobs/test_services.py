"""Depth job services with tasks inline: create, run, reuse, errors users can act on, idempotency, recovery."""
from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from django.conf import settings
from django.utils import timezone
from PIL import Image

from depthsite.choices import RunStatus
from inference.choices import JobErrorCode
from inference.exceptions import ImageError, ImageTooLargeError, InferenceError
from inference.models import DepthJob
from inference import pipeline
from inference.services import job_runs
from inference.services import jobs as job_services
from inference.services.job_recovery import depth_jobs_recover
from inference.services.job_runs import depth_job_run
from inference.services.jobs import depth_job_create, depth_job_delete, depth_job_rerun
from inference import worker as worker_module
from inference.worker import worker_alive, worker_id
from inference.writers import read_pfm, read_png16
from models_registry.models import WeightDownload
from depthsite.exceptions import ConflictError, TooLargeError, InvalidRequestError
from depthsite.testing import images
from tests.jobs.conftest import upload

pytestmark = pytest.mark.django_db


def media(relative: str) -> Path:
    return Path(settings.MEDIA_ROOT) / relative


def create(run_jobs, **kwargs) -> DepthJob:
    kwargs.setdefault("image", upload())
    with run_jobs():
        job = depth_job_create(**kwargs)
    job.refresh_from_db()
    return job


def queued_job(**kwargs) -> DepthJob:
    """A job saved and stored but not run: the commit callbacks (the enqueue) are discarded."""
    kwargs.setdefault("image", upload())
    return depth_job_create(**kwargs)


# --- create ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_create_stores_the_upload_and_runs_to_success(cached_small, user, run_jobs):
    job = create(run_jobs, image=upload(images.jpeg(96, 72), "My Photo.JPG"), model="midas_small",
                 outputs=["npy", "png", "png16", "pfm", "side"], colormap="viridis", owner=user)
    assert job.status == RunStatus.SUCCEEDED, job.error
    assert job.owner == user and job.model_name == "MiDaS_small" and job.colormap == "viridis"
    assert job.outputs == ["png", "png16", "npy", "pfm", "side"]  # canonical order
    assert job.image.name.startswith("uploads/") and job.image.name.endswith(".jpg")
    assert "My Photo" not in job.image.name  # the client's name never reaches a path
    assert job.image_name == "My Photo.JPG" and (job.image_width, job.image_height) == (96, 72)
    assert len(job.image_sha256) == 64 and job.image_size == media(job.image.name).stat().st_size
    assert job.attempts == 1 and job.started_at and job.finished_at >= job.started_at
    assert job.load_ms is not None and job.inference_ms > 0
    assert job.weights_sha256 == cached_small.sha256 and job.weights_format == "pt"
    assert "inverse depth" in job.semantics
    assert set(job.result_files) == {"png", "png16", "npy", "pfm", "side"}
    for rel in job.result_files.values():
        assert rel.startswith(f"results/{job.pk}/") and media(rel).is_file()
    depth = np.load(media(job.result_files["npy"]))
    assert depth.shape == (72, 96) and depth.dtype == np.float32
    assert depth.min() == pytest.approx(job.depth_min) and depth.max() == pytest.approx(job.depth_max)
    np.testing.assert_allclose(read_pfm(media(job.result_files["pfm"])), depth)
    np.testing.assert_allclose(read_png16(media(job.result_files["png16"])), depth, atol=float(np.ptp(depth) or 1) / 60000)
    with Image.open(media(job.result_files["side"])) as side:
        assert side.size == (96 * 2 + 8, 72)
    # nothing half-written is left beside the results
    assert not [p for p in media("results").iterdir() if p.name.startswith(".tmp-")]


def test_create_defaults_to_a_colour_png(cached_small, run_jobs):
    job = create(run_jobs)
    assert job.status == RunStatus.SUCCEEDED and list(job.result_files) == ["png"]
    assert job.owner is None and job.session_key == ""


@pytest.mark.parametrize("kwargs, field, text", [
    ({"model": "no-such-model"}, "model", "unknown model 'no-such-model'"),
    ({"outputs": ["png", "jpeg"]}, "outputs", "unknown output format 'jpeg'"),
    ({"outputs": []}, None, None),  # empty means the default, not an error
    ({"colormap": "rainbow"}, "colormap", "unknown colormap 'rainbow'"),
])
def test_create_validates_options(small_model, kwargs, field, text):
    if field is None:
        assert queued_job(**kwargs).outputs == ["png"]
        return
    with pytest.raises(InvalidRequestError) as caught:
        queued_job(**kwargs)
    assert caught.value.status == 400 and caught.value.extra["field"] == field and text in caught.value.message
    assert not DepthJob.objects.exists()


def test_create_refuses_a_disabled_model(small_model):
    small_model.enabled = False
    small_model.save()
    with pytest.raises(InvalidRequestError, match="disabled") as caught:
        queued_job(model="MiDaS_small")
    assert caught.value.extra["field"] == "model"


def test_create_refuses_too_many_bytes_and_pixels(small_model, settings):
    settings.DEPTHSITE_MAX_UPLOAD_BYTES = 1000
    with pytest.raises(TooLargeError) as caught:
        queued_job(image=upload(images.jpeg(200, 150)))
    assert caught.value.status == 413 and caught.value.extra["field"] == "image"
    settings.DEPTHSITE_MAX_UPLOAD_BYTES = 10**7
    settings.DEPTHSITE_MAX_IMAGE_PIXELS = 100 * 100
    with pytest.raises(ImageTooLargeError) as caught:
        queued_job(image=upload(images.jpeg(200, 150)))
    assert caught.value.status == 413
    assert not DepthJob.objects.exists()
    assert not media("uploads").exists() or not any(media("uploads").rglob("*.*"))


def test_create_refuses_what_is_not_a_photo(small_model):
    with pytest.raises(ImageError, match="not an image") as caught:
        queued_job(image=upload(b"GIF89a but not really", "x.gif"))
    assert caught.value.status == 400 and caught.value.extra["field"] == "image"
    assert not DepthJob.objects.exists()


def test_job_is_queued_only_when_the_transaction_commits(small_model, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        job = queued_job()
    assert len(callbacks) == 1
    job.refresh_from_db()
    assert job.status == RunStatus.QUEUED and job.attempts == 0


# --- weights ---------------------------------------------------------------------------------------


def test_a_job_resolves_its_weights_once(cached_small, run_jobs, settings, monkeypatch):
    # Result reuse and the estimator read the one resolved file: no second resolution (nor a download).
    from models_registry.services import resolve

    settings.DEPTHSITE_REUSE_RESULTS = True
    real_resolve = resolve.weights_resolve
    resolved = []

    def counting_resolve(**kwargs):
        resolved.append(kwargs["model"].name)
        return real_resolve(**kwargs)

    monkeypatch.setattr(resolve, "weights_resolve", counting_resolve)
    job = create(run_jobs)
    assert job.status == RunStatus.SUCCEEDED, job.error
    assert resolved == ["MiDaS_small"]


def test_a_cached_file_that_does_not_load_is_marked_and_the_job_runs_on_the_next(cached_small, run_jobs, settings):
    from models_registry import cachefs
    from models_registry.choices import Health
    from models_registry.services.export import weight_convert

    settings.DEPTHSITE_REUSE_RESULTS = True
    h5 = weight_convert(model=cached_small.model, fmt="h5")
    cachefs.absolute(cached_small.path).write_bytes(b"")  # damaged behind the registry's back
    job = create(run_jobs)
    assert job.status == RunStatus.SUCCEEDED, job.error
    assert job.weights_format == "h5" and job.weights_sha256 == h5.sha256
    cached_small.refresh_from_db()
    assert cached_small.health == Health.CORRUPT and "0 bytes" in cached_small.health_reason


# --- reuse -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_same_image_weights_and_options_reuse_the_result(cached_small, run_jobs, settings):
    settings.DEPTHSITE_REUSE_RESULTS = True
    data = images.jpeg(80, 60)
    first = create(run_jobs, image=upload(data), outputs=["png", "npy"])
    second = create(run_jobs, image=upload(data, "again.jpg"), outputs=["npy", "png"])
    assert second.status == RunStatus.SUCCEEDED and second.reused_from == first
    assert second.inference_ms is None and second.load_ms is None
    assert second.depth_min == first.depth_min and second.weights_sha256 == first.weights_sha256
    for fmt in ("png", "npy"):
        mine, theirs = media(second.result_files[fmt]), media(first.result_files[fmt])
        assert mine != theirs and mine.read_bytes() == theirs.read_bytes()
    # each job owns its files: deleting the first leaves the second whole
    with run_jobs():
        depth_job_delete(job=first)
    assert all(media(rel).is_file() for rel in second.result_files.values())
    second.refresh_from_db()
    assert second.reused_from is None and second.status == RunStatus.SUCCEEDED


@pytest.mark.slow
def test_the_same_pixels_in_another_file_format_reuse_the_result(cached_small, run_jobs, settings):
    # Reuse is keyed by the decoded pixels, not the file's bytes: PNG and TIFF of one picture are one result,
    # and a one-pixel change is another picture.
    settings.DEPTHSITE_REUSE_RESULTS = True
    picture = Image.fromarray(images.photo_array(80, 60))
    as_png, as_tiff = images.encode(picture, "PNG"), images.encode(picture, "TIFF")
    assert as_png != as_tiff
    first = create(run_jobs, image=upload(as_png, "photo.png", "image/png"))
    second = create(run_jobs, image=upload(as_tiff, "photo.tiff", "image/tiff"))
    assert first.image_sha256 != second.image_sha256
    assert second.pixels_sha256 == first.pixels_sha256 != ""
    assert second.status == RunStatus.SUCCEEDED and second.reused_from == first
    changed = np.array(picture)
    changed[0, 0] ^= 1
    third = create(run_jobs, image=upload(images.encode(Image.fromarray(changed), "PNG"), "other.png", "image/png"))
    assert third.pixels_sha256 != first.pixels_sha256 and third.reused_from is None and third.inference_ms


@pytest.mark.slow
def test_a_16_bit_result_is_reused_only_where_16_bit_floats_are_accepted(cached_small, run_jobs, settings):
    settings.DEPTHSITE_REUSE_RESULTS = True
    data = images.jpeg(80, 60)
    first = create(run_jobs, image=upload(data))
    assert first.dtype == "float32" and first.reused_from is None
    DepthJob.objects.filter(pk=first.pk).update(dtype="bfloat16")  # as a DEPTHSITE_FP16 worker on AMX records it
    settings.DEPTHSITE_FP16 = True
    accepting = create(run_jobs, image=upload(data))
    assert accepting.reused_from_id == first.pk and accepting.dtype == "bfloat16"
    settings.DEPTHSITE_FP16 = False
    full = create(run_jobs, image=upload(data))
    assert full.reused_from is None and full.inference_ms > 0 and full.dtype == "float32"
    again = create(run_jobs, image=upload(data))
    assert again.reused_from_id == full.pk and again.dtype == "float32"
    # Jobs from before the format was recorded (CUDA float16 ones among them) are computed again, then reused.
    DepthJob.objects.filter(pk__in=[full.pk, again.pk]).update(dtype="")
    recomputed = create(run_jobs, image=upload(data))
    assert recomputed.reused_from is None and recomputed.dtype == "float32"
    assert create(run_jobs, image=upload(data)).reused_from_id == recomputed.pk


@pytest.mark.slow
def test_other_options_or_disabled_reuse_compute_again(cached_small, run_jobs, settings):
    data = images.jpeg(80, 60)
    first = create(run_jobs, image=upload(data))
    other_colormap = create(run_jobs, image=upload(data), colormap="gray")
    other_outputs = create(run_jobs, image=upload(data), outputs=["png", "npy"])
    settings.DEPTHSITE_REUSE_RESULTS = False
    same_but_off = create(run_jobs, image=upload(data))
    for job in (other_colormap, other_outputs, same_but_off):
        assert job.status == RunStatus.SUCCEEDED and job.reused_from is None and job.inference_ms > 0
    assert first.reused_from is None


# --- errors users can act on -------------------------------------------------------------------------


def test_uncached_model_offline_fails_with_what_to_do(small_model, run_jobs, settings):
    settings.DEPTHSITE_OFFLINE = True
    job = create(run_jobs)
    assert job.status == RunStatus.FAILED and job.error_code == JobErrorCode.OFFLINE
    assert "not cached" in job.error and "import it" in job.error
    assert job.finished_at and job.attempts == 1


def test_failed_download_says_so(small_model, run_jobs, settings, tmp_path):
    settings.DEPTHSITE_MODEL_MIRROR = (tmp_path / "empty-mirror").as_uri()
    (tmp_path / "empty-mirror").mkdir()
    job = create(run_jobs)
    assert job.status == RunStatus.FAILED, job.error
    assert job.error_code == JobErrorCode.DOWNLOAD
    assert "could not be downloaded" in job.error
    # The job says what failed; the download's own row says why, for an administrator.
    download = WeightDownload.objects.get(model=small_model)
    assert download.status == RunStatus.FAILED and "has no file midas_v21_small_256.pt" in download.error


@pytest.mark.parametrize("raised", ["cpu", "cuda"])
def test_out_of_memory_is_reported_as_such(cached_small, run_jobs, monkeypatch, raised):
    # The network really runs out of memory: on CPU it asks torch's allocator for a petabyte (which refuses
    # with its own RuntimeError); on CUDA torch raises its OutOfMemoryError type (raised here: no GPU).
    import torch

    from inference.nets.midas import MidasNet

    def oom(self, x):
        if raised == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return torch.empty(1 << 50, dtype=torch.uint8)

    monkeypatch.setattr(MidasNet, "forward", oom)
    job = create(run_jobs)
    assert job.status == RunStatus.FAILED and job.error_code == JobErrorCode.OUT_OF_MEMORY
    assert "smaller image" in job.error


def test_unexpected_error_fails_the_job_with_a_generic_message(cached_small, run_jobs, monkeypatch, caplog):
    def boom(**kwargs):
        raise KeyError("secret internal detail")

    monkeypatch.setattr(pipeline, "write_outputs", boom)
    job = create(run_jobs)
    assert job.status == RunStatus.FAILED and job.error_code == JobErrorCode.INTERNAL
    assert job.error == job_runs.ERROR_GENERIC and "secret" not in job.error
    assert "secret internal detail" in caplog.text  # the traceback is in the log
    assert not media(f"results/{job.pk}").exists()


def test_an_upload_that_vanished_fails_clearly(cached_small, run_jobs):
    job = queued_job()
    media(job.image.name).unlink()
    depth_job_run(job=job)
    job.refresh_from_db()
    assert job.status == RunStatus.FAILED and job.error_code == JobErrorCode.IMAGE
    assert "cannot be read" in job.error


# --- idempotent deliveries ---------------------------------------------------------------------------


def test_a_redelivered_task_of_a_finished_job_does_nothing(cached_small, run_jobs, monkeypatch):
    job = create(run_jobs)
    before = (job.attempts, job.finished_at, dict(job.result_files))
    monkeypatch.setattr("inference.estimator.estimator_get", lambda **kw: pytest.fail("must not run again"))
    depth_job_run(job=job)
    job.refresh_from_db()
    assert (job.attempts, job.finished_at, dict(job.result_files)) == before


def test_a_job_running_in_a_live_worker_is_left_alone(cached_small, monkeypatch):
    job = queued_job()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = f"{settings.DEPTHSITE_NODE}:{sleeper.pid}:{worker_module._process_start(sleeper.pid)}"
        DepthJob.objects.filter(pk=job.pk).update(status=RunStatus.RUNNING, worker=alive, attempts=1,
                                                  started_at=timezone.now())
        job.refresh_from_db()
        assert worker_alive(worker=alive, started_at=job.started_at)
        depth_job_run(job=job)
        job.refresh_from_db()
        assert job.status == RunStatus.RUNNING and job.worker == alive and job.attempts == 1
        assert depth_jobs_recover() == {"requeued": [], "failed": []}
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not worker_alive(worker=alive, started_at=job.started_at)


def dead_worker() -> str:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return f"{settings.DEPTHSITE_NODE}:{process.pid}:1"


def test_a_job_whose_worker_died_is_run_again(cached_small):
    job = queued_job()
    DepthJob.objects.filter(pk=job.pk).update(status=RunStatus.RUNNING, worker=dead_worker(), attempts=1,
                                              started_at=timezone.now())
    job.refresh_from_db()
    depth_job_run(job=job)
    job.refresh_from_db()
    assert job.status == RunStatus.SUCCEEDED and job.attempts == 2 and job.worker == worker_id()


def test_a_job_that_keeps_losing_its_worker_fails_with_the_reason(cached_small, settings):
    settings.Q_CLUSTER = {**settings.Q_CLUSTER, "max_attempts": 2}
    job = queued_job()
    DepthJob.objects.filter(pk=job.pk).update(status=RunStatus.RUNNING, worker=dead_worker(), attempts=2,
                                              started_at=timezone.now())
    job.refresh_from_db()
    depth_job_run(job=job)
    job.refresh_from_db()
    assert job.status == RunStatus.FAILED and job.error_code == JobErrorCode.INTERRUPTED
    assert "stopped 2 time(s)" in job.error and "smaller image" in job.error


def test_other_nodes_workers_count_as_alive_until_the_timeout_passes(settings):
    settings.Q_CLUSTER = {**settings.Q_CLUSTER, "timeout": 100}
    now = timezone.now()
    assert worker_alive(worker="elsewhere:123:456", started_at=now - timedelta(seconds=120))
    assert not worker_alive(worker="elsewhere:123:456", started_at=now - timedelta(seconds=200))
    assert not worker_alive(worker="", started_at=now)
    assert not worker_alive(worker=worker_id(), started_at=now)  # this process asks: its attempt is over


def test_concurrent_deliveries_claim_a_job_once(cached_small):
    job = queued_job()
    first, second = DepthJob.objects.get(pk=job.pk), DepthJob.objects.get(pk=job.pk)
    assert job_runs._claim(first, worker_id())
    assert not job_runs._claim(second, "other:1:1")
    assert DepthJob.objects.get(pk=job.pk).attempts == 1


# --- recovery --------------------------------------------------------------------------------------


def test_recovery_requeues_dead_workers_jobs_and_fails_exhausted_ones(cached_small, run_jobs, settings):
    settings.Q_CLUSTER = {**settings.Q_CLUSTER, "max_attempts": 2}
    retry = queued_job()
    exhausted = queued_job()
    DepthJob.objects.filter(pk=retry.pk).update(status=RunStatus.RUNNING, worker=dead_worker(), attempts=1)
    DepthJob.objects.filter(pk=exhausted.pk).update(status=RunStatus.RUNNING, worker=dead_worker(), attempts=2)
    with run_jobs():
        outcome = depth_jobs_recover()
    assert outcome == {"requeued": [str(retry.pk)], "failed": [str(exhausted.pk)]}
    retry.refresh_from_db()
    exhausted.refresh_from_db()
    assert retry.status == RunStatus.SUCCEEDED and retry.attempts == 2
    assert exhausted.status == RunStatus.FAILED and exhausted.error_code == JobErrorCode.INTERRUPTED


def test_recovery_requeues_jobs_queued_past_the_retry_window(cached_small, run_jobs):
    stale = queued_job()
    fresh = queued_job()
    DepthJob.objects.filter(pk=stale.pk).update(queued_at=timezone.now() - timedelta(seconds=settings.Q_CLUSTER["retry"] + 5))
    with run_jobs():
        outcome = depth_jobs_recover()
    assert outcome["requeued"] == [str(stale.pk)]
    stale.refresh_from_db()
    fresh.refresh_from_db()
    assert stale.status == RunStatus.SUCCEEDED and fresh.status == RunStatus.QUEUED


def test_recovery_schedule_is_installed():
    from tests.support.migrated import migrated_schedule

    schedule = migrated_schedule("0002_depth_jobs_recover_schedule")
    assert schedule.name == "depth-jobs-recover"
    assert schedule.func == "inference.tasks.depth_jobs_recover_task" and schedule.repeats == -1


# --- delete and re-run -------------------------------------------------------------------------------


def test_delete_removes_the_row_and_every_file(cached_small, run_jobs):
    job = create(run_jobs, outputs=["png", "npy"])
    upload_path, results = media(job.image.name), media(f"results/{job.pk}")
    assert upload_path.is_file() and results.is_dir()
    with run_jobs():
        outcome = depth_job_delete(job=job)
    assert outcome["bytes"] > 0
    assert not DepthJob.objects.filter(pk=job.pk).exists()
    assert not upload_path.exists() and not results.exists()


def test_a_job_deleted_while_running_leaves_no_files(cached_small, run_jobs, monkeypatch):
    job = queued_job()
    real = pipeline.write_outputs

    def delete_midway(**kwargs):
        written = real(**kwargs)
        with run_jobs():
            DepthJob.objects.filter(pk=job.pk).delete()
        return written

    monkeypatch.setattr(pipeline, "write_outputs", delete_midway)
    depth_job_run(job=DepthJob.objects.get(pk=job.pk))
    assert not DepthJob.objects.filter(pk=job.pk).exists()
    assert not media(f"results/{job.pk}").exists()


def test_rerun_queues_a_finished_job_again(cached_small, run_jobs, monkeypatch):
    from inference.estimator import DepthEstimator

    def oom(self, image):
        raise InferenceError("out of memory running MiDaS_small")

    monkeypatch.setattr(DepthEstimator, "predict", oom)
    job = create(run_jobs)
    assert job.status == RunStatus.FAILED
    monkeypatch.undo()
    with run_jobs():
        depth_job_rerun(job=job)
    job.refresh_from_db()
    assert job.status == RunStatus.SUCCEEDED and job.attempts == 1 and job.error == ""


def test_rerun_refuses_an_active_job(small_model):
    job = queued_job()
    with pytest.raises(ConflictError, match="already queued"):
        depth_job_rerun(job=job)


def test_worker_identity_names_node_pid_and_start():
    node, pid, start = worker_id().rsplit(":", 2)
    assert node == settings.DEPTHSITE_NODE and int(pid) == os.getpid()
    assert start == worker_module._process_start(os.getpid())


@pytest.fixture
def recording_broker(monkeypatch):
    """Enqueues go through django-q2's real enqueue (not the tests' inline run) to a broker that keeps what it
    is given: .pushed (the packages), .made (brokers built), .broker (its class)."""
    import django_q.brokers
    from django_q.tasks import Conf

    made, pushed = [], []

    class Broker:
        list_key = "depthsite"

        def enqueue(self, task):
            pushed.append(task)
            return f"task-{len(pushed)}"

    def get_broker(*args):
        made.append(1)
        return Broker()

    monkeypatch.setattr(django_q.brokers, "get_broker", get_broker)
    monkeypatch.setattr(Conf, "SYNC", False)
    monkeypatch.setattr(job_services, "_brokers", {})
    return SimpleNamespace(made=made, pushed=pushed, broker=Broker)


def test_enqueues_of_one_process_share_one_broker_connection_and_write_nothing(small_model, recording_broker,
                                                                             django_assert_num_queries):
    """A broker per enqueue opened a new Redis connection per job; one per process is enough. The enqueue
    writes nothing back: the task's id was stored on the row (one more UPDATE and commit per upload) and
    nothing read it."""
    from django_q.signing import SignedPackage

    jobs = [job_services.depth_job_create(image=upload()) for _ in range(3)]
    with django_assert_num_queries(0):
        for job in jobs:
            job_services.depth_job_enqueue(job.pk)
    assert len(recording_broker.pushed) == 3 and len(recording_broker.made) == 1
    tasks = [SignedPackage.loads(package) for package in recording_broker.pushed]
    assert [task["args"] for task in tasks] == [(str(job.pk),) for job in jobs]  # the id only
    assert [task["name"] for task in tasks] == [f"depth-{job.pk}" for job in jobs]  # how a failure is found


def test_a_depth_task_leaves_no_success_record_but_a_failure_is_kept(small_model, recording_broker):
    """The job row records the outcome: django-q2's monitor wrote a success record (and pruned old ones) for
    every job on the database the web server and the worker write to."""
    from django_q.models import Failure, Success
    from django_q.monitor import save_task
    from django_q.signing import SignedPackage

    job_services.depth_job_enqueue(job_services.depth_job_create(image=upload()).pk)
    task = SignedPackage.loads(recording_broker.pushed[0])
    now = timezone.now()
    # "sync": the monitor's save without its reconnect, which would close the test's database connection.
    done = {**task, "started": now, "stopped": now, "cluster": "test", "sync": True}
    save_task({**done, "result": "succeeded", "success": True}, recording_broker.broker())
    assert not Success.objects.exists()
    save_task({**done, "result": "Traceback ...", "success": False}, recording_broker.broker())
    assert Failure.objects.filter(id=task["id"]).exists()
