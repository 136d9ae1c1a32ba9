"""A job's error is read by whoever holds its id (anonymous uploaders included): only errors written for users keep
their words; disk, configuration and other server errors become a fixed sentence, their text stays in the log."""
from __future__ import annotations

import errno

import logging
import re
from pathlib import Path

import pytest

from depthsite.choices import RunStatus
from depthsite.exceptions import (
    ConflictError,
    DigestMismatchError,
    DiskFullError,
    InvalidRequestError,
    LicenseError,
    NotFoundError,
    OfflineError,
)
from inference.choices import JobErrorCode
from inference.exceptions import InferenceError, OutOfMemoryError, RuntimeArtifactError
from inference.models import DepthJob
from inference.services import job_runs
from inference.services.job_runs import depth_job_run, error_for
from inference.services.jobs import depth_job_create
from models_registry import cachefs
from models_registry.services.records import weights_unavailable_now
from tests.jobs.conftest import upload

pytestmark = pytest.mark.django_db
CACHE_PATH = "/var/cache/depthsite/models/DPT_Large"
MIRROR = "https://alice:s3cret@mirror.internal.example/weights"
# A server path: a slash followed by a name (the sentences' own "and/or"-free wording has none).
PATH = re.compile(r"/[\w.-]+")


def _fails_with(monkeypatch, exc: BaseException) -> DepthJob:
    """A queued job whose weights resolution (the download, the conversion) raises `exc`, run once."""
    def raising(**kwargs):
        raise exc

    # inference.pipeline binds weights_use when first imported: imported here under the patch, it would keep the
    # raising stand-in for every later test of the process (the predict command's, for one).
    import inference.pipeline  # noqa: F401

    monkeypatch.setattr("models_registry.services.resolve.weights_use", raising)
    job = depth_job_create(image=upload(), session_key="s" * 40)
    depth_job_run(job=job)
    job.refresh_from_db()
    assert job.status == RunStatus.FAILED
    return job


def test_disk_full_in_a_download_stores_a_fixed_sentence_and_logs_the_path(small_model, monkeypatch, caplog):
    detail = (f"not enough free disk space to download DPT_Large: 1.3 GB to write plus a 256.0 MB margin, but only "
              f"12.0 MB free on the disk of {CACHE_PATH}; free some space (optimize the cache to a smaller size) "
              "or set DEPTHSITE_CACHE_DIR to a bigger disk")
    with caplog.at_level(logging.WARNING, logger="inference.services.job_runs"):
        job = _fails_with(monkeypatch, DiskFullError(detail, extra={"kind": "disk_full", "path": CACHE_PATH}))
    assert job.error == job_runs.ERROR_DISK_FULL and "disk space" in job.error
    assert CACHE_PATH not in job.error and not PATH.search(job.error) and "DEPTHSITE_" not in job.error
    assert job.error_code == JobErrorCode.INTERNAL
    # The operator's log has the whole text, with the job's id.
    assert CACHE_PATH in caplog.text and str(job.pk) in caplog.text and "DiskFullError" in caplog.text


def test_a_real_disk_full_download_inside_a_job_does_not_reach_the_job(small_model, monkeypatch, settings, tmp_path,
                                                                       caplog):
    # The real path: a job downloads its model from a file:// mirror, and the disk check refuses.
    mirror = tmp_path / "private-mirror"
    mirror.mkdir()
    (mirror / small_model.file_name).write_bytes(b"\0" * 4096)
    settings.DEPTHSITE_MODEL_MIRROR = mirror.as_uri()
    monkeypatch.setattr(cachefs, "disk_free", lambda path: 1)
    job = depth_job_create(image=upload(), session_key="s" * 40)
    with caplog.at_level(logging.WARNING):
        depth_job_run(job=job)
    job.refresh_from_db()
    assert job.status == RunStatus.FAILED and job.error == job_runs.ERROR_DISK_FULL, job.error
    assert str(tmp_path) not in job.error and str(settings.DEPTHSITE_CACHE_DIR) not in job.error
    assert not PATH.search(job.error)
    assert "free on the disk of" in caplog.text  # the detail is logged


def test_a_bad_mirror_setting_is_not_quoted_to_the_uploader(small_model, settings, caplog):
    # download_url refuses the setting and quotes it (without the password) for the operator.
    settings.DEPTHSITE_MODEL_MIRROR = MIRROR.replace("https://", "ftp://")
    job = depth_job_create(image=upload(), session_key="s" * 40)
    with caplog.at_level(logging.WARNING):
        depth_job_run(job=job)
    job.refresh_from_db()
    assert job.status == RunStatus.FAILED and job.error == job_runs.ERROR_CONFIGURATION, job.error
    assert "mirror.internal.example" not in job.error and "DEPTHSITE_MODEL_MIRROR" not in job.error
    assert "s3cret" not in job.error and not PATH.search(job.error)
    assert job.error_code == JobErrorCode.MODEL
    assert "DEPTHSITE_MODEL_MIRROR" in caplog.text and str(job.pk) in caplog.text


@pytest.mark.parametrize("exc, sentence, code", [
    (DiskFullError(f"no space left on the device holding {CACHE_PATH} while writing w.safetensors; free some "
                   "space", extra={"path": CACHE_PATH}), job_runs.ERROR_DISK_FULL, JobErrorCode.INTERNAL),
    (InvalidRequestError(f"DEPTHSITE_MODEL_MIRROR='{MIRROR}' is not an http(s):// base URL or a file:// folder"),
     job_runs.ERROR_CONFIGURATION, JobErrorCode.MODEL),
    (NotFoundError("MiDaS_small has no download URL; set DEPTHSITE_MODEL_MIRROR or import a local copy"),
     job_runs.ERROR_CONFIGURATION, JobErrorCode.MODEL),
    (LicenseError("the licence CC-BY-NC-4.0 of DPT_Large is not in DEPTHSITE_ACCEPTED_LICENSES=MIT"),
     job_runs.ERROR_LICENSE, JobErrorCode.MODEL),
    (DigestMismatchError(f"{MIRROR}/w.pt gave 10 bytes but the pinned file has 12", extra={"url": MIRROR}),
     job_runs.ERROR_DOWNLOAD_CHECK, JobErrorCode.DOWNLOAD),
    # A shortage of the moment while loading: not the class name, not "tell the administrator"; try again.
    (weights_unavailable_now("the weights of MiDaS_small [pt]", errno.EMFILE, model="MiDaS_small"),
     job_runs.ERROR_BUSY, JobErrorCode.INTERNAL),
])
def test_server_errors_become_a_fixed_sentence_per_kind(exc, sentence, code):
    assert error_for(exc) == (sentence, code)


@pytest.mark.parametrize("exc", [
    ConflictError(f"{CACHE_PATH}/w.pt already exists and overwriting it was not asked for"),
    DigestMismatchError(f"{CACHE_PATH}/w.pt.part changed on disk while it was being checked"),
    RuntimeArtifactError(f"writing the ONNX artifact of DPT_Large failed: [Errno 28] {CACHE_PATH}/x.onnx"),
])
def test_any_other_server_error_gets_a_generic_sentence_with_its_code(exc):
    message, code = error_for(exc)
    assert code == JobErrorCode.INTERNAL and "(error internal: " in message and type(exc).__name__ in message
    assert CACHE_PATH not in message and not PATH.search(message)


def test_offline_says_what_to_do_without_the_operators_instructions():
    exc = OfflineError("MiDaS_small is not cached on this node and DEPTHSITE_OFFLINE is set, so nothing is "
                       "downloaded. Copy midas_v21_small_256.pt from a machine that has it (released at "
                       "https://token:x@intranet.example/w.pt) and import it (or point DEPTHSITE_MODEL_MIRROR at a "
                       "file:// folder that holds it)", extra={"kind": "offline", "model": "MiDaS_small"})
    message, code = error_for(exc)
    assert code == JobErrorCode.OFFLINE and message.startswith("MiDaS_small is not cached")
    assert "intranet.example" not in message and "DEPTHSITE_" not in message and "file://" not in message


def test_errors_written_for_the_uploader_keep_their_words(small_model, monkeypatch):
    about_the_image = "cannot prepare the image for MiDaS_small: the image is 1x70000, too thin to resize"
    job = _fails_with(monkeypatch, InferenceError(about_the_image))
    assert job.error == about_the_image and job.error_code == JobErrorCode.INTERNAL
    oom = "out of memory running MiDaS_small on a 8000x6000 image; try a smaller image or a smaller model"
    assert error_for(OutOfMemoryError(oom)) == (oom, JobErrorCode.OUT_OF_MEMORY)
    # An InferenceError about the server's device is its configuration, not the uploader's image.
    device = InferenceError("device cuda:1 was asked for but CUDA is not available on this machine",
                            extra={"field": "device"})
    assert error_for(device) == (job_runs.ERROR_DEVICE, JobErrorCode.INTERNAL)


@pytest.mark.parametrize("name", ["tpu:7", "meta", "cuda:1"])
def test_the_servers_device_setting_is_not_quoted_to_the_uploader(small_model, monkeypatch, caplog, name):
    from inference.runtime.eager import device_select
    import torch

    if name.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("CUDA is there: cuda:1 is a device this machine may have")
    with pytest.raises(InferenceError) as caught:
        device_select(name)
    with caplog.at_level(logging.WARNING, logger="inference.services.job_runs"):
        job = _fails_with(monkeypatch, caught.value)
    assert job.error == job_runs.ERROR_DEVICE and name not in job.error and "CUDA" not in job.error
    assert job.error_code == JobErrorCode.INTERNAL
    assert name in caplog.text and str(job.pk) in caplog.text  # the operator's log says which device


def test_a_decoder_error_naming_a_file_is_not_quoted(monkeypatch, caplog):
    # Pillow's decoders raise OSError, whose text may name the file it read from (a server path, for the worker).
    from PIL import ImageFile

    from inference.exceptions import ImageError
    from inference.images import image_check, image_open
    from depthsite.testing import images

    def failing(self, *args, **kwargs):
        raise OSError(f"[Errno 5] Input/output error: '{CACHE_PATH}/uploads/x.jpg'")

    monkeypatch.setattr(ImageFile.ImageFile, "load", failing)
    for read in (image_check, image_open):
        with caplog.at_level(logging.INFO, logger="inference.images"), pytest.raises(ImageError) as caught:
            read(images.png())
        message, code = error_for(caught.value)
        assert code == JobErrorCode.IMAGE and message.startswith("the uploaded image cannot be read: ")
        assert "damaged" in message and CACHE_PATH not in message and not PATH.search(message)
        assert "Errno" not in message and "Errno" not in caught.value.message
        assert CACHE_PATH in caplog.text  # the detail is logged
        caplog.clear()


def test_a_model_gone_after_upload_still_says_so(small_model):
    job = depth_job_create(image=upload(), session_key="s" * 40)
    small_model.enabled = False
    small_model.save(update_fields=["enabled"])
    job = DepthJob.objects.get(pk=job.pk)  # as a worker loads it
    depth_job_run(job=job)
    job.refresh_from_db()
    assert job.error_code == JobErrorCode.MODEL and "was disabled after this job was submitted" in job.error


def test_a_bad_image_is_still_described_to_its_uploader(small_model, settings):
    job = depth_job_create(image=upload(), session_key="s" * 40)
    media = Path(settings.MEDIA_ROOT) / job.image.name
    media.write_bytes(media.read_bytes()[:200])  # truncated
    depth_job_run(job=job)
    job.refresh_from_db()
    assert job.error_code == JobErrorCode.IMAGE and job.error.startswith("the uploaded image cannot be read: ")
    assert "truncated" in job.error or "damaged" in job.error
