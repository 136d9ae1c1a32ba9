"""The depth job: one uploaded photo's trip through a worker, kept as our own row for watching, retrying and audit."""
from __future__ import annotations

import uuid
from pathlib import PurePosixPath

from django.conf import settings
from django.db import models
from django.utils import timezone

from depthsite.choices import RunStatus
from inference.choices import JobErrorCode


def upload_path(job: "DepthJob", filename: str) -> str:
    """uploads/<yyyy>/<mm>/<uuid><ext>: never the client's name, so nothing it sends lands in a path."""
    suffix = PurePosixPath(filename).suffix.lower()[:8]
    return f"uploads/{timezone.now():%Y/%m}/{uuid.uuid4().hex}{suffix}"


class DepthBatch(models.Model):
    """Several photos sent at once (files or a zip): one DepthJob each, watched and downloaded together."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)  # reachable by id, like a job
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE,
                              related_name="depth_batches", help_text="Empty for anonymous uploads.")
    session_key = models.CharField(max_length=40, blank=True, db_index=True,
                                   help_text="The anonymous uploader's session.")
    client_address = models.CharField(max_length=64, blank=True,
                                      help_text="The anonymous uploader's address (an IPv6 /64).")
    created_at = models.DateTimeField(auto_now_add=True)
    model = models.ForeignKey("models_registry.RegisteredModel", null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="depth_batches")
    model_name = models.CharField(max_length=64, help_text="The canonical model name, kept if the model goes.")
    outputs = models.JSONField(default=list, help_text="Output formats of every job, in canonical order.")
    colormap = models.CharField(max_length=16)
    fov_degrees = models.FloatField(default=60.0)
    archive_name = models.CharField(max_length=255, blank=True, help_text="The zip the client sent, if any.")
    skipped = models.JSONField(default=list, blank=True,
                               help_text="Archive members not made into jobs: [{name, reason}].")

    class Meta:
        ordering = ["-created_at"]
        verbose_name_plural = "depth batches"

    def __str__(self) -> str:
        return f"depth batch {self.short_id} ({self.model_name})"

    @property
    def short_id(self) -> str:
        return self.id.hex[:8]


class DepthJob(models.Model):
    # A random UUID: job pages and anonymous API reads are reachable by id, so ids must not be guessable.
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE,
                              related_name="depth_jobs", help_text="Empty for anonymous uploads.")
    session_key = models.CharField(max_length=40, blank=True, db_index=True,
                                   help_text="The anonymous uploader's session, for their history page.")
    client_address = models.CharField(max_length=64, blank=True, db_index=True,
                                      help_text="The anonymous uploader's address (an IPv6 /64), for quotas.")

    image = models.FileField(upload_to=upload_path, max_length=255)
    image_name = models.CharField(max_length=255, blank=True, help_text="The file name the client sent.")
    image_sha256 = models.CharField(max_length=64)
    pixels_sha256 = models.CharField(max_length=64, blank=True,
                                     help_text="sha256 of the decoded, upright RGB pixels the network saw (with their "
                                               "size): the key of result reuse, whatever file format carried them.")
    image_size = models.BigIntegerField(help_text="Bytes of the upload.")
    image_format = models.CharField(max_length=16, blank=True)
    image_width = models.PositiveIntegerField(null=True, blank=True, help_text="Upright width in pixels.")
    image_height = models.PositiveIntegerField(null=True, blank=True, help_text="Upright height in pixels.")
    image_alpha = models.BooleanField(null=True, blank=True,
                                      help_text="Whether the photo carried transparency (dropped), read once at upload; "
                                                "empty for jobs made before 0013.")
    input_preview = models.CharField(max_length=255, blank=True,
                                     help_text="An upright PNG of a photo browsers cannot show, made once by the "
                                               "worker (relative to MEDIA_ROOT).")

    model = models.ForeignKey("models_registry.RegisteredModel", null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="depth_jobs")
    model_name = models.CharField(max_length=64, help_text="The canonical model name, kept if the model goes.")
    outputs = models.JSONField(default=list, help_text="Output formats wanted, in canonical order.")
    colormap = models.CharField(max_length=16)
    fov_degrees = models.FloatField(default=60.0, help_text="Horizontal field of view the .ply point cloud assumes.")

    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.QUEUED, db_index=True)
    error = models.TextField(blank=True)
    error_code = models.CharField(max_length=32, choices=JobErrorCode.choices, blank=True)
    attempts = models.PositiveIntegerField(default=0, help_text="Times a worker started this job.")
    worker = models.CharField(max_length=255, blank=True, help_text="node:pid:start of the process running it.")

    created_at = models.DateTimeField(auto_now_add=True)
    queued_at = models.DateTimeField(default=timezone.now, help_text="Last time a task was queued for it.")
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True,
                                       help_text="While running: the worker renews this; past it, the worker is dead.")

    load_ms = models.FloatField(null=True, blank=True, help_text="Getting the network (0 when already warm).")
    inference_ms = models.FloatField(null=True, blank=True)
    result_files = models.JSONField(default=dict, blank=True,
                                    help_text="{output format: path relative to MEDIA_ROOT}.")
    results_bytes = models.BigIntegerField(default=0, help_text="Bytes of the result files (and input preview).")
    depth_min = models.FloatField(null=True, blank=True)
    depth_max = models.FloatField(null=True, blank=True)
    semantics = models.CharField(max_length=128, blank=True)
    weights_sha256 = models.CharField(max_length=64, blank=True, db_index=True)
    weights_format = models.CharField(max_length=16, blank=True)
    device = models.CharField(max_length=32, blank=True)
    dtype = models.CharField(max_length=16, blank=True, default="", db_default="",
                             help_text="The number format the network ran in: float32, or the 16-bit float "
                                       "DEPTHSITE_FP16 chose; empty for jobs from before it was recorded.")
    batch = models.ForeignKey(DepthBatch, null=True, blank=True, on_delete=models.SET_NULL, related_name="jobs",
                              help_text="The batch this photo came in, if any.")
    reused_from = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="reused_by",
                                    help_text="The earlier job whose result files were copied.")

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["owner", "-created_at"]),
            models.Index(fields=["session_key", "-created_at"]),
            models.Index(fields=["pixels_sha256", "weights_sha256"]),
        ]

    def __str__(self) -> str:
        return f"depth job {self.short_id} ({self.model_name}, {self.status})"

    @property
    def short_id(self) -> str:
        return self.id.hex[:8]

    @property
    def is_active(self) -> bool:
        return self.status in RunStatus.ACTIVE

    @property
    def is_terminal(self) -> bool:
        return self.status in RunStatus.TERMINAL

    def start(self, *, worker: str) -> None:
        self.status = RunStatus.RUNNING
        self.worker = worker
        self.attempts += 1
        self.started_at = timezone.now()
        self.finished_at = None
        self.error = ""
        self.error_code = ""

    def finish(self, *, result_files: dict[str, str], depth_min: float, depth_max: float, semantics: str,
               weights_sha256: str, weights_format: str, device: str, load_ms: float | None,
               inference_ms: float | None, reused_from: "DepthJob | None" = None, dtype: str = "") -> None:
        self.status = RunStatus.SUCCEEDED
        self.lease_until = None
        self.result_files = result_files
        self.depth_min = depth_min
        self.depth_max = depth_max
        self.semantics = semantics
        self.weights_sha256 = weights_sha256
        self.weights_format = weights_format
        self.device = device
        self.dtype = dtype
        self.load_ms = load_ms
        self.inference_ms = inference_ms
        self.reused_from = reused_from
        self.finished_at = timezone.now()

    def fail(self, error: str, code: str = JobErrorCode.INTERNAL) -> None:
        self.status = RunStatus.FAILED
        self.lease_until = None
        self.error = error
        self.error_code = code
        self.finished_at = timezone.now()

    def requeue(self) -> None:
        """Back to the queue, keeping its attempts (a re-run resets them itself)."""
        self.status = RunStatus.QUEUED
        self.worker = ""
        self.lease_until = None
        self.queued_at = timezone.now()
        self.finished_at = None
