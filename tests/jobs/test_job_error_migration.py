"""Jobs that failed before errors became fixed sentences (inference.services.job_runs.error_for) may still hold the
raw text of a server error (a cache path, a mirror's URL with its password, a setting, build output), read by
whoever holds the job's id: inference 0012 rewrites those errors to the sentence of their code."""
from __future__ import annotations

import importlib

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from depthsite.choices import RunStatus
from inference.choices import JobErrorCode
from inference.models import DepthJob
from inference.services import job_runs

MIGRATION = ("inference", "0012_redact_job_errors")
BEFORE = ("inference", "0011_session_key_digest")
migration = importlib.import_module(f"inference.migrations.{MIGRATION[1]}")
FIELDS = {"image": "uploads/x.jpg", "image_sha256": "0" * 64, "image_size": 1, "model_name": "DPT_Large",
          "colormap": "inferno"}
MIRROR = "https://alice:s3cret@mirror.internal.example/weights"
CACHE = "/var/cache/depthsite/models/DPT_Large"

DOWNLOAD = ("the model's weights could not be downloaded; an administrator can see why on the models page and retry "
            "the download")
WEIGHTS = "the model's cached weights are unusable; an administrator must check them (manage.py models verify)"
OFFLINE = ("DPT_Large is not cached on this node and the site is offline, so it cannot be downloaded; submit the "
           "photo again with another model, or ask the operator to import it")
IMAGE = "the uploaded image cannot be read: the image is damaged and cannot be decoded"
OUT_OF_MEMORY = "out of memory while processing this image; try a smaller image or a smaller model"
GONE = "the model DPT_Large no longer exists in the registry; submit the photo again with another model"
DISABLED = "the model DPT_Large was disabled after this job was submitted; submit the photo again with another model"
PREPARE = "cannot prepare the image for MiDaS_small: the image is 1x70000, too thin to resize"

# (code, stored error, what the migration leaves): every row is a failed job.
CASES = [
    # Server detail in any code: a URL, a setting, a traceback, an OSError's text, an absolute path.
    (JobErrorCode.OFFLINE, f"DPT_Large is not cached on this node and DEPTHSITE_OFFLINE is set, so nothing is "
                           f"downloaded. Copy dpt_large.pt from a machine that has it (released at {MIRROR}/w.pt)",
     OFFLINE),
    (JobErrorCode.DOWNLOAD, f"{MIRROR}/w.pt: HTTP 401", DOWNLOAD),
    (JobErrorCode.WEIGHTS, f"{CACHE}/w.pt is not a PyTorch checkpoint (starts with b'<html>')", WEIGHTS),
    (JobErrorCode.IMAGE, "the uploaded image cannot be read: the image is damaged and cannot be decoded ([Errno 5] "
                         "Input/output error)", IMAGE),
    (JobErrorCode.IMAGE, "the uploaded image cannot be read: the image is damaged and cannot be decoded (cannot "
                         "read '/srv/depthsite/media/uploads/2026/x.jpg')", IMAGE),
    (JobErrorCode.OUT_OF_MEMORY, "Traceback (most recent call last):\n  File \"estimator.py\", line 3\nMemoryError",
     OUT_OF_MEMORY),
    (JobErrorCode.TIMEOUT, "the job took longer than the 600 s job timeout (DEPTHSITE_JOB_TIMEOUT)",
     job_runs.ERROR_GENERIC),
    (JobErrorCode.MODEL, "MiDaS_small has no download URL; set DEPTHSITE_MODEL_MIRROR or import a local copy",
     job_runs.ERROR_CONFIGURATION),
    (JobErrorCode.MODEL, "DPT_Large is licensed CC-BY-NC-4.0 (non-commercial), which this deployment does not "
                         "accept: DEPTHSITE_ACCEPTED_LICENSES is MIT", job_runs.ERROR_LICENSE),
    (JobErrorCode.INTERNAL, f"not enough free disk space: only 12.0 MB free on the disk of {CACHE}",
     job_runs.ERROR_GENERIC),
    # A model error that is not the model-gone wording came from the registry or the configuration.
    (JobErrorCode.MODEL, "no cached file of DPT_Large can be loaded", job_runs.ERROR_CONFIGURATION),
    # An internal error that is none of the sentences written for uploaders held an exception's own text.
    (JobErrorCode.INTERNAL, "DPT_Large.pt already exists and overwriting it was not asked for", job_runs.ERROR_GENERIC),
    (JobErrorCode.INTERNAL, "RuntimeError: ONNX export failed: Unsupported operator aten::upsample",
     job_runs.ERROR_GENERIC),
    # An older release's device error names the setting's value and the hardware: the device sentence.
    (JobErrorCode.INTERNAL, "device cuda:1 was asked for but CUDA is not available on this machine",
     job_runs.ERROR_DEVICE),
    (JobErrorCode.INTERNAL, "unknown device 'tpu:7' (use cpu, cuda or cuda:N)", job_runs.ERROR_DEVICE),
    (JobErrorCode.INTERNAL, "device type meta is not supported", job_runs.ERROR_DEVICE),
    # download_failed, weights and offline get only fixed sentences today: any other text is an older release's
    # raw one (a host and port, a relative or UNC path, a file: URL, a cached file's last error), whatever it holds.
    (JobErrorCode.DOWNLOAD, "DPT_Large could not be downloaded: mirror.internal:8443 refused the connection",
     DOWNLOAD),
    (JobErrorCode.DOWNLOAD, "DPT_Large could not be downloaded: [fd00::5]:8443 did not answer", DOWNLOAD),
    (JobErrorCode.DOWNLOAD, "DPT_Large could not be downloaded: HTTP 401 Unauthorized", DOWNLOAD),
    (JobErrorCode.WEIGHTS, "var/cache/depthsite/models/DPT_Large/w.pt is not a PyTorch checkpoint", WEIGHTS),
    (JobErrorCode.WEIGHTS, "\\\\srv\\share\\models\\w.pt is truncated", WEIGHTS),
    (JobErrorCode.WEIGHTS, "the checkpoint is truncated (12 of 400 MB)", WEIGHTS),
    (JobErrorCode.OFFLINE, "no cached file of DPT_Large is usable (last error: file:models/w.pt is empty)", OFFLINE),
    (JobErrorCode.OFFLINE, "no cached file of DPT_Large is usable (last error: the digest does not match)", OFFLINE),
    # An unreadable image keeps its words unless they hold a path or a host (relative, UNC, file:, host:port, IPv6).
    (JobErrorCode.IMAGE, "the uploaded image cannot be read: cannot identify image file "
                         "'var/cache/depthsite/media/x.jpg'", IMAGE),
    (JobErrorCode.IMAGE, "the uploaded image cannot be read: cannot open uploads/x.jpg", IMAGE),
    (JobErrorCode.IMAGE, "the uploaded image cannot be read: cannot open \\\\srv\\media\\x.jpg", IMAGE),
    (JobErrorCode.IMAGE, "the uploaded image cannot be read: cannot open file:x.jpg", IMAGE),
    (JobErrorCode.IMAGE, "the uploaded image cannot be read: storage.internal:9000 answered 503", IMAGE),
    (JobErrorCode.IMAGE, "the uploaded image cannot be read: [fd00::5]:9000 answered 503", IMAGE),
    # "cannot prepare the image for ...": one line of plain words is kept, a path or a build's output is not.
    (JobErrorCode.INTERNAL, "cannot prepare the image for MiDaS_small: see var/cache/depthsite/build.log",
     job_runs.ERROR_GENERIC),
    (JobErrorCode.INTERNAL, "cannot prepare the image for MiDaS_small: resize failed\n  File \"transforms.py\", "
                            "line 3", job_runs.ERROR_GENERIC),
    # Written for the uploader: kept.
    (JobErrorCode.MODEL, GONE, GONE),
    (JobErrorCode.MODEL, DISABLED, DISABLED),
    (JobErrorCode.INTERNAL, PREPARE, PREPARE),
    (JobErrorCode.IMAGE, "the uploaded image cannot be read: not an image in an accepted format: photos must be "
                         "JPEG, PNG, WebP, GIF, BMP or TIFF", None),
    (JobErrorCode.IMAGE, "the uploaded image cannot be read: the image is truncated and cannot be decoded", None),
    (JobErrorCode.IMAGE, "the uploaded image cannot be read: the image is 8000x6000 (48 megapixels), over the limit "
                         "of 40 megapixels", None),
    (JobErrorCode.IMAGE, "the uploaded image cannot be read: the image (48 megapixels) is over the limit of 40 "
                         "megapixels", None),
    (JobErrorCode.IMAGE, "the uploaded image cannot be read: the file is empty (0 bytes)", None),
    (JobErrorCode.IMAGE, "the uploaded image cannot be read: the file is missing", None),
    (JobErrorCode.IMAGE, "the uploaded image cannot be read: the job has no stored image", None),
    (JobErrorCode.IMAGE, "the uploaded image cannot be read: the image has no pixels", None),
    (JobErrorCode.IMAGE, "the job's uploaded image is gone, so it cannot run again; upload the photo again", None),
    (JobErrorCode.INTERNAL, "cannot prepare the image for DPT_Large: expected a uint8 RGB array of shape (H, W, 3), "
                            "got float32 (1, 2)", None),
    (JobErrorCode.INTERNAL, "cannot prepare the image for DPT_Large: unsupported interpolation 'lanczos'", None),
    (JobErrorCode.OUT_OF_MEMORY, "out of memory running DPT_Large on a 8000x6000 image; try a smaller image and/or "
                                 "a smaller model", None),  # a slash inside a word is no path
    (JobErrorCode.TIMEOUT, "the job took longer than the 600 s job timeout; try a smaller image or model", None),
    (JobErrorCode.INTERRUPTED, "the worker running this job stopped 3 time(s) before it finished (killed, out of "
                               "memory, or over the 600 s job timeout); try a smaller image or a smaller model", None),
    # The sentences themselves are left as they are (the migration can run again).
    (JobErrorCode.INTERNAL, job_runs.ERROR_GENERIC, None),
    (JobErrorCode.INTERNAL, job_runs.ERROR_DISK_FULL, None),
    (JobErrorCode.INTERNAL, job_runs.ERROR_DEVICE, None),
    (JobErrorCode.INTERNAL, "the server could not run this job (error internal: ConflictError); the details are in "
                            "the worker's log: re-running it may help, otherwise tell the site's administrator", None),
    (JobErrorCode.MODEL, job_runs.ERROR_CONFIGURATION, None),
    (JobErrorCode.MODEL, job_runs.ERROR_LICENSE, None),
    (JobErrorCode.DOWNLOAD, job_runs.ERROR_DOWNLOAD_CHECK, None),
    (JobErrorCode.DOWNLOAD, DOWNLOAD, None),
    (JobErrorCode.WEIGHTS, WEIGHTS, None),
    (JobErrorCode.OFFLINE, OFFLINE, None),
    (JobErrorCode.OFFLINE, OFFLINE.replace("DPT_Large", "Depth-Anything-V2.Small+1"), None),
    (JobErrorCode.OFFLINE, OFFLINE.replace("DPT_Large", "the model"), None),
]


def _apps():
    return MigrationExecutor(connection).loader.project_state(MIGRATION).apps


def _rows() -> list[tuple[DepthJob, str]]:
    """One failed job per case, with the error the migration should leave."""
    return [(DepthJob.objects.create(status=RunStatus.FAILED, error=error, error_code=code, **FIELDS),
             error if expected is None else expected) for code, error, expected in CASES]


def _errors() -> dict:
    return dict(DepthJob.objects.values_list("pk", "error"))


@pytest.mark.django_db
def test_failed_jobs_holding_server_detail_get_the_sentence_of_their_code():
    rows = _rows()
    migration.job_errors_redact(_apps(), connection.schema_editor())
    stored = _errors()
    for (job, expected), (code, before, _) in zip(rows, CASES):
        assert stored[job.pk] == expected, (code, before)
    # Codes are kept: an API client that branches on them sees no change.
    codes = dict(DepthJob.objects.values_list("pk", "error_code"))
    assert [codes[job.pk] for job, _ in rows] == [code for code, _, _ in CASES]
    # Run again (or after a later release's own sentences): nothing changes.
    migration.job_errors_redact(_apps(), connection.schema_editor())
    assert _errors() == stored


@pytest.mark.parametrize(("code", "error", "expected"), CASES)
def test_the_rule_case_by_case(code, error, expected):
    # The same cases one by one (the test above stops at the first): what is left, and that it is left as it is.
    left = error if expected is None else expected
    assert migration.redacted(error, str(code), FIELDS["model_name"]) == left
    assert migration.redacted(left, str(code), FIELDS["model_name"]) == left


@pytest.mark.django_db
def test_only_failed_jobs_are_touched():
    running = DepthJob.objects.create(status=RunStatus.RUNNING, error=f"{CACHE} (left by an earlier attempt)",
                                      error_code="", **FIELDS)
    succeeded = DepthJob.objects.create(status=RunStatus.SUCCEEDED, **FIELDS)
    migration.job_errors_redact(_apps(), connection.schema_editor())
    assert DepthJob.objects.get(pk=running.pk).error == running.error
    assert DepthJob.objects.get(pk=succeeded.pk).error == ""


@pytest.mark.django_db
def test_an_offline_job_without_a_model_name_says_the_model():
    job = DepthJob.objects.create(status=RunStatus.FAILED, error_code=JobErrorCode.OFFLINE,
                                  error="is not cached and DEPTHSITE_OFFLINE is set", **{**FIELDS, "model_name": ""})
    migration.job_errors_redact(_apps(), connection.schema_editor())
    assert DepthJob.objects.get(pk=job.pk).error.startswith("the model is not cached on this node")


@pytest.mark.django_db
def test_the_migration_works_in_batches(monkeypatch):
    monkeypatch.setattr(migration, "BATCH", 2)
    jobs = [DepthJob.objects.create(status=RunStatus.FAILED, error=f"{CACHE}/{n}.pt is damaged",
                                    error_code=JobErrorCode.WEIGHTS, **FIELDS) for n in range(5)]
    jobs.append(DepthJob.objects.create(status=RunStatus.FAILED, error=GONE, error_code=JobErrorCode.MODEL, **FIELDS))
    migration.job_errors_redact(_apps(), connection.schema_editor())
    assert [DepthJob.objects.get(pk=job.pk).error for job in jobs] == [WEIGHTS] * 5 + [GONE]


def test_the_sentences_are_those_the_workers_store_today():
    # The migration keeps its own copy (a later change of the sentences must not change what ran here); today
    # they are the same words as job_runs stores, so an old job and a new one read alike.
    assert migration.SENTENCES[JobErrorCode.DOWNLOAD] == job_runs.ERROR_DOWNLOAD == DOWNLOAD
    assert migration.SENTENCES[JobErrorCode.WEIGHTS] == job_runs.ERROR_WEIGHTS == WEIGHTS
    assert migration.SENTENCES[JobErrorCode.OUT_OF_MEMORY] == job_runs.ERROR_OUT_OF_MEMORY
    assert migration.ERROR_GENERIC == job_runs.ERROR_GENERIC
    assert migration.ERROR_CONFIGURATION == job_runs.ERROR_CONFIGURATION
    assert migration.ERROR_LICENSE == job_runs.ERROR_LICENSE
    assert migration.ERROR_DEVICE == job_runs.ERROR_DEVICE
    assert migration.ERROR_DOWNLOAD_CHECK == job_runs.ERROR_DOWNLOAD_CHECK
    assert migration.offline_sentence("DPT_Large") == OFFLINE


@pytest.mark.django_db(transaction=True)
def test_the_real_migration_rewrites_old_errors_on_the_way_forward():
    executor = MigrationExecutor(connection)
    leaves = executor.loader.graph.leaf_nodes()
    executor.migrate([BEFORE])  # 0012 unapplied (its reverse changes nothing)
    OldJob = executor.loader.project_state(BEFORE).apps.get_model("inference", "DepthJob")
    leaked = OldJob.objects.create(status=RunStatus.FAILED, error=f"{MIRROR}/w.pt: HTTP 401",
                                   error_code=JobErrorCode.DOWNLOAD, **FIELDS)
    kept = OldJob.objects.create(status=RunStatus.FAILED, error=GONE, error_code=JobErrorCode.MODEL, **FIELDS)
    executor = MigrationExecutor(connection)
    executor.migrate(leaves)
    executor.loader.build_graph()
    assert executor.migration_plan(leaves) == []  # today's schema again, for the tests after this one
    assert DepthJob.objects.get(pk=leaked.pk).error == DOWNLOAD
    assert DepthJob.objects.get(pk=kept.pk).error == GONE
